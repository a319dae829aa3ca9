"""The exception hierarchy: every error names the stage that failed and why.

The CLI turns any OnnxCompressError into a one-line message and a non-zero exit code; it reports anything else as
an InternalError (a bug), in one line unless `--debug` asks for the trace.
"""


class OnnxCompressError(Exception):
    """Base class. `stage` says which part of the pipeline failed; `exit_code` is what the CLI returns."""

    stage = "onnxcompress"
    exit_code = 2

    def __str__(self) -> str:
        return f"[{self.stage}] {super().__str__()}"


class ModelLoadError(OnnxCompressError):
    """The model file is missing, unreadable, not ONNX, truncated, or fails the ONNX checker."""

    stage = "load"


class UnsafeModelError(ModelLoadError):
    """The model points at external data outside its folder or through a symlink."""

    stage = "load"


class UnsupportedModelError(OnnxCompressError):
    """The model is valid ONNX but uses an opset or construct we cannot process."""

    stage = "load"


class ConfigError(OnnxCompressError):
    """Unknown config keys, impossible values, or an ignored-scope entry that matches nothing."""

    stage = "config"


class DatasetError(OnnxCompressError):
    """Calibration or training data that does not fit the model: names, shapes, dtypes, or no samples at all."""

    stage = "data"


class CalibrationError(OnnxCompressError):
    """Running the model to collect statistics failed."""

    stage = "calibration"


class SparsityError(OnnxCompressError):
    """Sparsity cannot apply to this model as configured (no weight it can mask)."""

    stage = "sparsity"


class PruningError(OnnxCompressError):
    """Filter pruning cannot apply to this model as configured (nothing prunable, a target out of reach)."""

    stage = "pruning"


class WeightCompressionError(OnnxCompressError):
    """Weight compression cannot apply to this model as configured (no table it can compress)."""

    stage = "compress-weights"


class OutputError(OnnxCompressError):
    """The output path is the input path, or cannot be written."""

    stage = "output"


class ExportError(OnnxCompressError):
    """Conversion to OpenVINO IR failed."""

    stage = "export"


class BenchmarkError(OnnxCompressError):
    """A model could not be compiled or run for benchmarking."""

    stage = "benchmark"


class EvaluationError(OnnxCompressError):
    """A model could not be run to compare or evaluate it: models that do not match, or a runtime refusing one."""

    stage = "evaluate"


class PackageError(OnnxCompressError):
    """A deployment package that cannot be made, or one whose manifest or files fail verification."""

    stage = "package"


class TrainingError(OnnxCompressError):
    """Fine-tuning on the private onnxruntime-training runtime failed: artifact generation, a step, or the worker."""

    stage = "training"


class CheckpointError(TrainingError):
    """A checkpoint folder to resume from is unreadable, or its files are not the ones its run recorded."""

    stage = "resume"


class TrainingRuntimeMissing(TrainingError):
    """The private onnxruntime-training runtime is not installed here, or cannot be on this machine."""


class InternalError(OnnxCompressError):
    """An unexpected exception: a bug in onnxcompress, not a problem with the input."""

    exit_code = 3

    def __init__(self, command: str, cause: BaseException) -> None:
        self.stage = command
        super().__init__(f"unexpected {type(cause).__name__}: {first_line(cause)} — this is a bug in onnxcompress; "
                         f"please report it with the output of `onnxcompress --debug {command} ...`")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message: runtimes append C++ locations and stack dumps."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
