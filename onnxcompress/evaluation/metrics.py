"""Metrics: a model file in, one number out, higher is better.

Built in: `top1` (against the labels of the evaluation set), `cosine` (mean per-sample cosine similarity of every
output with the FP32 model's) and `sqnr` (dB of the FP32 outputs over the error). Custom: `FILE.py:FUNC`, where
`FUNC(model_path: str) -> float` runs the user's own pipeline; from Python, any such callable.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcompress.errors import ConfigError, DatasetError, EvaluationError, OnnxCompressError
from onnxcompress.runtime.model_io import runtime_source

Feed = Mapping[str, np.ndarray]
BUILTIN = ("top1", "cosine", "sqnr")


@dataclass(frozen=True)
class EvalSet:
    """Evaluation samples as feeds (each a batch; feeds may differ in shape, for dynamic models) and, for `top1`,
    one label per sample in feed order."""

    feeds: Sequence[Feed]
    labels: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], input_names: Sequence[str], *, batch_size: int = 64,
                    label_name: str = "labels") -> EvalSet:
        """Split arrays whose axis 0 enumerates samples (an .npz's contents) into batches of the model's inputs."""
        missing = [name for name in input_names if name not in arrays]
        if missing:
            raise DatasetError(f"evaluation data has no array for the model inputs {missing} "
                               f"(it has {sorted(arrays)})")
        count = len(arrays[input_names[0]])
        if any(len(arrays[name]) != count for name in input_names):
            raise DatasetError("evaluation arrays differ in their number of samples: "
                               + ", ".join(f"{name} {len(arrays[name])}" for name in input_names))
        feeds = [{name: arrays[name][start:start + batch_size] for name in input_names}
                 for start in range(0, count, batch_size)]
        labels = arrays.get(label_name)
        if labels is not None and len(labels) != count:
            raise DatasetError(f"'{label_name}' has {len(labels)} entries for {count} samples")
        return cls(feeds, None if labels is None else np.asarray(labels))


def run_outputs(model: str | os.PathLike, feeds: Sequence[Feed], *, threads: int | None = None
                ) -> list[list[np.ndarray]]:
    """Every output of `model` for each feed, in ONNX Runtime (on `threads` threads; default: its own choice)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        with runtime_source(model) as source:
            session = ort.InferenceSession(source.readable, options, providers=["CPUExecutionProvider"])
        return [session.run(None, dict(feed)) for feed in feeds]
    except OnnxCompressError:
        raise
    except Exception as error:  # ORT raises several unrelated types for models it cannot run
        raise EvaluationError(f"ONNX Runtime cannot run {model} on the evaluation data: {error}") from None


@dataclass
class OutputMetric:
    """A built-in metric; `cosine` and `sqnr` compare with the FP32 model's outputs, computed once."""

    name: str
    data: EvalSet
    reference_model: str | os.PathLike | None = None
    #: ONNX Runtime threads per scoring (None: its default, every core); worker processes take a share.
    threads: int | None = None
    _reference: list[list[np.ndarray]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in BUILTIN:
            raise ConfigError(f"unknown metric '{self.name}': use one of {', '.join(BUILTIN)} or FILE.py:FUNC")
        if self.name == "top1" and self.data.labels is None:
            raise DatasetError("metric top1 needs labels in the evaluation data (an array named 'labels')")
        if self.name != "top1" and self.reference_model is None:
            raise ConfigError(f"metric {self.name} compares with the FP32 model: give its path")

    def with_threads(self, threads: int) -> OutputMetric:
        """The same metric scoring on `threads` threads (for one of several worker processes)."""
        return OutputMetric(self.name, self.data, self.reference_model, threads)

    def __call__(self, model_path: str) -> float:
        outputs = run_outputs(model_path, self.data.feeds, threads=self.threads)
        if self.name == "top1":
            assert self.data.labels is not None
            predicted = np.concatenate([np.asarray(o[0]).reshape(len(o[0]), -1).argmax(axis=1) for o in outputs])
            return float((predicted == self.data.labels).mean())
        if self._reference is None:
            assert self.reference_model is not None
            self._reference = run_outputs(self.reference_model, self.data.feeds, threads=self.threads)
        pairs = [(r, o) for reference, output in zip(self._reference, outputs) for r, o in zip(reference, output)]
        return _cosine(pairs) if self.name == "cosine" else _sqnr(pairs)


def _cosine(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean over samples and outputs of the cosine similarity of each sample's output with the reference's."""
    values = []
    for reference, output in pairs:
        r = reference.astype(np.float64).reshape(len(reference), -1)
        o = output.astype(np.float64).reshape(len(output), -1)
        norms = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
        same = np.all(r == o, axis=1)  # two zero vectors are the same output
        values.append(np.where(same, 1.0, (r * o).sum(axis=1) / np.where(norms == 0, 1.0, norms)))
    return float(np.concatenate(values).mean())


def _sqnr(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r, _ in pairs)
    noise = sum(float(np.sum((r.astype(np.float64) - o) ** 2)) for r, o in pairs)
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


@dataclass(frozen=True)
class CustomMetric:
    """The user's `FUNC(model_path) -> float`; a failure inside it is reported with the user's own frames."""

    function: Callable[[str], object]
    name: str
    #: `FILE.py:FUNC` (absolute) when loaded from a file: a worker process imports it again from there.
    spec: str | None = None

    def __reduce__(self):
        if self.spec is not None:
            return load_custom_metric, (self.spec,)
        return CustomMetric, (self.function, self.name)

    def __call__(self, model_path: str) -> float:
        try:
            value = self.function(str(model_path))
        except Exception as error:  # the user's code: any failure is theirs, reported as such
            raise EvaluationError(f"metric {self.name} raised {type(error).__name__}: {error} "
                                  f"({_user_frames(error)})") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise EvaluationError(f"metric {self.name} returned {type(value).__name__} {value!r:.80}, not a number")
        if math.isnan(value):
            raise EvaluationError(f"metric {self.name} returned NaN for {model_path}")
        return float(value)


def _user_frames(error: BaseException) -> str:
    """The innermost frames of the user's traceback (this module's own frames left out)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename != __file__]
    return "; ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames[-3:]) or "no frames"


def load_custom_metric(spec: str) -> CustomMetric:
    """`FILE.py:FUNC` → the function, imported from that file; ConfigError when the file or function is missing
    or the file fails to import."""
    path_text, _, function_name = spec.rpartition(":")
    if not path_text or not function_name.isidentifier():
        raise ConfigError(f"custom metric '{spec}' must be FILE.py:FUNC")
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"metric file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"onnxcompress_user_metric_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"metric file {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's module: any failure on import is theirs
        raise ConfigError(f"metric file {path} failed to import: {type(error).__name__}: {error} "
                          f"({_user_frames(error)})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"metric file {path} defines no function {function_name} (it defines {defined})")
    return CustomMetric(function, f"{path.name}:{function_name}", f"{path.resolve()}:{function_name}")


Metric = Callable[[str], float]


def resolve_metric(spec: str | Callable[[str], object], data: EvalSet | None = None,
                   reference_model: str | os.PathLike | None = None) -> Metric:
    """A metric from a built-in name (with the evaluation data it needs), `FILE.py:FUNC`, or a callable."""
    if callable(spec):
        return CustomMetric(spec, getattr(spec, "__name__", "metric"))
    if spec in BUILTIN:
        if data is None:
            raise ConfigError(f"metric {spec} needs evaluation data (--eval-data)")
        return OutputMetric(spec, data, reference_model)
    if ":" in spec or spec.endswith(".py"):
        return load_custom_metric(spec)
    raise ConfigError(f"unknown metric '{spec}': use one of {', '.join(BUILTIN)} or FILE.py:FUNC")
