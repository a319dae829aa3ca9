"""Honest latency / throughput benchmarks of ONNX models on OpenVINO (CPU) and ONNX Runtime (CPU).

Why it is built this way:

* The machines we measure on are shared and noisy, so absolute numbers drift between runs. Every variant is
  therefore compiled first and then measured *interleaved*: in each round every variant runs for
  `round_seconds`, and results are medians across rounds. Ratios (speed-ups) are only computed between
  measurements of the same report, i.e. the same run.
* On CPUs with AVX512-BF16/AMX, OpenVINO runs "FP32" models in bf16 unless `INFERENCE_PRECISION_HINT=f32`.
  Comparing an INT8 model against that silent bf16 baseline (or only against f32) misleads, so every model
  is measured with each requested precision variant and the variant is part of the label:
  `ov-f32` (hint f32) and `ov-default` (no hint: whatever the plugin picks, recorded in the environment).
  For a QDQ model the hint does not touch the INT8 layers (they stay u8/i8); it only decides whether the
  layers left in float run in f32 or bf16. The `kernels` field records what the heavy layers really ran in.
* Variant labels are `<model>/<backend>/<mode>`, e.g. `int8/ov-default/latency`, `fp32/ort/latency`,
  `fp32/ov-f32/throughput`.
* With a sparse weights rate, every OpenVINO variant gets a twin compiled with
  CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE (`int8/ov-default-sparse/latency`), measured in the same rounds. OpenVINO
  uses it only on AMX CPUs and only for INT8 FullyConnected layers, so the report says which layers could use it
  and, on a CPU without AMX, that the twins are expected to measure the same.

Latency mode: one synchronous request (OpenVINO PERFORMANCE_HINT=LATENCY; ONNX Runtime InferenceSession with
ORT_ENABLE_ALL and default threads). Reported latency is the median / p90 of all timed inferences of all
rounds; fps is the median of the per-round throughput.
Throughput mode (OpenVINO only): AsyncInferQueue with OPTIMAL_NUMBER_OF_INFER_REQUESTS under
PERFORMANCE_HINT=THROUGHPUT; fps is the median of per-round completed-inferences x batch / wall time, latency
the per-request latency OpenVINO reports.
"""

from __future__ import annotations

import io
import math
import os
import platform
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import psutil
from tqdm.auto import tqdm

from onnxcompress.errors import BenchmarkError, OutputError
from onnxcompress.runtime.cpu import CpuFeatures, cpu_features
from onnxcompress.runtime.model_io import RuntimeSource, runtime_source
from onnxcompress.runtime.outputs import write_bytes_atomic
from onnxcompress.runtime.openvino import (
    HEAVY_LAYER_TYPES,
    SPARSE_WEIGHTS_PROPERTY,
    FullyConnectedWeights,
    compile_model,
    describe_sparse_weight_layers,
    runtime_precisions,
    sparse_weight_layers,
    sparse_weights_note,
)

__all__ = [
    "BenchmarkReport",
    "Measurement",
    "benchmark",
    "format_report",
    "plot_report",
]

LATENCY = "latency"
THROUGHPUT = "throughput"
ORT_BACKEND = "ort"
SPARSE_SUFFIX = "-sparse"
_DEFAULT_PRECISION = "default"  # "no INFERENCE_PRECISION_HINT": the plugin chooses (bf16 on this CPU)
_WARMUP_SECONDS = 0.5
#: An hour per round: longer (or infinite) rounds would never let a benchmark end.
MAX_ROUND_SECONDS = 3600.0


# ------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Measurement:
    """One variant's aggregated result. Times in milliseconds, throughput in samples (not requests) per second."""

    variant: str  # "<model>/<backend>/<mode>"
    model: str
    engine: str  # "openvino" | "onnxruntime"
    backend: str  # "ov-f32" | "ov-default" | "ov-<hint>" | "ort"
    precision: str  # OpenVINO precision variant ("f32", "default", ...) or "n/a" for ONNX Runtime
    mode: str  # "latency" | "throughput"
    batch: int
    median_ms: float
    p90_ms: float
    throughput_fps: float
    samples: int  # inferences timed over all rounds
    rounds: int
    infer_requests: int
    kernels: str  # runtime precisions of the heavy layers, e.g. "u8x3" or "bf16x3"; "" when unknown (ORT)
    sparse_weights_rate: float | None = None  # CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE of a "-sparse" variant


def _speedup(reference: Measurement, measured: Measurement) -> float:
    """>1 means `measured` is faster: latency ratio for latency rows, fps ratio for throughput rows."""
    if measured.mode == LATENCY:
        return reference.median_ms / measured.median_ms
    return measured.throughput_fps / reference.throughput_fps


@dataclass(frozen=True)
class BenchmarkReport:
    """All measurements of one interleaved run plus the settings and machine they were measured on."""

    measurements: tuple[Measurement, ...]
    batch: int
    rounds: int
    round_seconds: float
    environment: Mapping[str, str] = field(default_factory=dict)

    @property
    def variants(self) -> list[str]:
        return [m.variant for m in self.measurements]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(m.model for m in self.measurements))

    def get(self, variant: str) -> Measurement:
        for measurement in self.measurements:
            if measurement.variant == variant:
                return measurement
        raise KeyError(f"no variant {variant!r}; have {self.variants}")

    def find(self, model: str, backend: str, mode: str) -> Measurement | None:
        return next(
            (m for m in self.measurements if (m.model, m.backend, m.mode) == (model, backend, mode)), None
        )

    def ratios(self, baseline: str) -> dict[str, float]:
        """Speed-up of every variant relative to `baseline`, measured in this run only (>1 = faster).

        `baseline` is "<model>" (compare like with like: same backend and mode of that model),
        "<model>/<backend>" (e.g. "fp32/ov-f32": every row against that backend of the model, same mode) or a
        full variant label (only rows of that mode). Latency rows use the median-latency ratio, throughput
        rows the fps ratio. Rows without a matching reference are omitted.
        """
        model, backend, mode = (baseline.split("/") + [None, None])[:3]
        result: dict[str, float] = {}
        for measured in self.measurements:
            if mode is not None and measured.mode != mode:
                continue
            reference = self.find(model, backend or measured.backend, measured.mode)
            if reference is not None:
                result[measured.variant] = _speedup(reference, measured)
        if not result:
            raise KeyError(f"baseline {baseline!r} matches no measurement; variants: {self.variants}")
        return result

    def to_dict(self) -> dict:
        """JSON-ready dict (plain types only)."""
        return {
            "batch": self.batch,
            "rounds": self.rounds,
            "round_seconds": self.round_seconds,
            "environment": dict(self.environment),
            "measurements": [asdict(m) for m in self.measurements],
        }


# --------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _InputSpec:
    name: str
    dims: tuple[int | str | None, ...] | None  # int = static, str = symbolic name, None = unknown
    dtype: np.dtype


def _input_specs(path: Path) -> list[_InputSpec]:
    """Graph inputs (not initializers) with shapes and numpy dtypes; weights are not loaded."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
        raise BenchmarkError(f"cannot read ONNX model {path}: {exc}") from exc
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise BenchmarkError(f"{path.name}: input {value.name!r} is not a tensor; {_GIVE_INPUTS}")
        tensor = value.type.tensor_type
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                for d in tensor.shape.dim
            )
        specs.append(_InputSpec(value.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))))
    return specs


#: Largest generated random input; a model declaring a bigger static shape is refused before any allocation.
MAX_RANDOM_FEED_BYTES = 4 << 30
_GIVE_INPUTS = "give real inputs (`--inputs FILE.npz` on the command line, `inputs=` in Python)"


def _random_array(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        # 0/1 are valid token ids, attention masks and segment ids alike; real indices need `inputs=`.
        return rng.integers(0, 2, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def _concrete_shape(spec: _InputSpec, batch: int, model: str) -> tuple[int, ...]:
    if spec.dims is None:
        raise BenchmarkError(f"model {model!r}: input {spec.name!r} has no shape; {_GIVE_INPUTS}")
    shape = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int):
            shape.append(dim)
        elif axis == 0:
            shape.append(batch)
        else:
            raise BenchmarkError(
                f"model {model!r}: input {spec.name!r} has dynamic dimension {axis} ({dim or '?'}) besides the "
                f"batch; {_GIVE_INPUTS}"
            )
    if spec.dims and isinstance(spec.dims[0], int) and spec.dims[0] != batch:
        raise BenchmarkError(
            f"model {model!r}: input {spec.name!r} has a static batch of {spec.dims[0]} but batch={batch} was "
            f"requested; benchmark with batch={spec.dims[0]} or {_GIVE_INPUTS}"
        )
    size = math.prod(shape) * spec.dtype.itemsize
    if size > MAX_RANDOM_FEED_BYTES:
        raise BenchmarkError(
            f"model {model!r}: input {spec.name!r} of shape {list(shape)} needs {size / 2**30:.3g} GiB of data, over "
            f"the {MAX_RANDOM_FEED_BYTES / 2**30:.0f} GiB limit for generated inputs; {_GIVE_INPUTS}")
    return tuple(shape)


def _check_given(spec: _InputSpec, array: np.ndarray, batch: int, model: str) -> None:
    if array.dtype != spec.dtype:
        raise BenchmarkError(f"model {model!r}: input {spec.name!r} needs {spec.dtype}, got {array.dtype}")
    if spec.dims is None:
        return
    if len(spec.dims) != array.ndim:
        raise BenchmarkError(f"model {model!r}: input {spec.name!r} needs rank {len(spec.dims)}, got {array.shape}")
    for axis, (dim, size) in enumerate(zip(spec.dims, array.shape)):
        expected = dim if isinstance(dim, int) else (batch if axis == 0 else size)
        if size != expected:
            raise BenchmarkError(
                f"model {model!r}: input {spec.name!r} dimension {axis} must be {expected}, got {array.shape}"
            )


def _make_inputs(
    specs: Sequence[_InputSpec], batch: int, given: Mapping[str, np.ndarray] | None, model: str
) -> dict[str, np.ndarray]:
    """Feeds for one model: the caller's arrays (validated) or seeded random data of the model's shapes/dtypes."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        if given is not None:
            if spec.name not in given:
                raise BenchmarkError(f"model {model!r}: input {spec.name!r} is missing from `inputs`")
            array = np.ascontiguousarray(given[spec.name])
            _check_given(spec, array, batch, model)
        else:
            array = _random_array(_concrete_shape(spec, batch, model), spec.dtype, rng)
        feeds[spec.name] = array
    return feeds


# -------------------------------------------------------------------------------------------------- runners


@dataclass
class _Round:
    latencies_ms: list[float]
    inferences: int
    seconds: float


def _timed_loop(call: Callable[[], object], seconds: float) -> _Round:
    """Time `call` back to back until `seconds` have passed; at least once, so a slow model still yields a sample."""
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        t0 = time.perf_counter_ns()
        call()
        latencies.append((time.perf_counter_ns() - t0) / 1e6)
        if time.perf_counter() >= deadline:
            break
    return _Round(latencies, len(latencies), time.perf_counter() - start)


class _OvSyncRunner:
    """One InferRequest with input tensors bound once (ov.Tensor shares the numpy memory: no per-call copy)."""

    def __init__(self, compiled: ov.CompiledModel, feeds: Mapping[str, np.ndarray]) -> None:
        self._feeds = dict(feeds)  # keep the arrays alive: the tensors point into them
        self._request = compiled.create_infer_request()
        for name, array in self._feeds.items():
            self._request.set_tensor(name, ov.Tensor(array))

    def __call__(self, seconds: float) -> _Round:
        return _timed_loop(self._request.infer, seconds)


class _OvAsyncRunner:
    """AsyncInferQueue with the plugin's optimal request count, inputs bound once per request."""

    def __init__(self, compiled: ov.CompiledModel, feeds: Mapping[str, np.ndarray]) -> None:
        self._feeds = dict(feeds)
        self.requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(compiled, self.requests)
        for request in self._queue:
            for name, array in self._feeds.items():
                request.set_tensor(name, ov.Tensor(array))
        self._latencies: list[float] = []
        # Runs on OpenVINO worker threads; list.append is atomic under the GIL.
        self._queue.set_callback(lambda request, _userdata: self._latencies.append(request.latency))

    def __call__(self, seconds: float) -> _Round:
        self._latencies = []
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            self._queue.start_async()  # blocks while every request is busy
        self._queue.wait_all()
        elapsed = time.perf_counter() - start
        latencies = self._latencies
        return _Round(list(latencies), len(latencies), elapsed)


class _OrtRunner:
    def __init__(self, session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> None:
        self._session = session
        self._feeds = dict(feeds)

    def __call__(self, seconds: float) -> _Round:
        return _timed_loop(lambda: self._session.run(None, self._feeds), seconds)


@dataclass
class _Variant:
    label: str
    model: str
    engine: str
    backend: str
    precision: str
    mode: str
    run: Callable[[float], _Round]
    infer_requests: int = 1
    kernels: str = ""
    sparse_weights_rate: float | None = None
    #: The INT8 FullyConnected layers of a sparse variant's executed graph.
    sparse_layers: dict[str, FullyConnectedWeights] = field(default_factory=dict)
    rounds: list[_Round] = field(default_factory=list)


def _kernels(compiled: ov.CompiledModel) -> str:
    """Runtime precisions of the heavy layers, e.g. "u8x3" or "u8x2 bf16x1": shows what a hint really did."""
    counts = Counter(
        layer.runtime_precision for layer in runtime_precisions(compiled) if layer.layer_type in HEAVY_LAYER_TYPES
    )
    return " ".join(f"{precision}x{count}" for precision, count in counts.most_common())


def _backend(precision: str, sparse_weights_rate: float | None = None) -> str:
    return f"ov-{precision}" + ("" if sparse_weights_rate is None else SPARSE_SUFFIX)


def _openvino_variants(
    model: str, source: RuntimeSource, feeds: Mapping[str, np.ndarray], precisions: Sequence[str], mode: str,
    sparse_weights_rate: float | None,
) -> list[_Variant]:
    # Static shapes, as deployed: dynamic-shape kernels are slower and would skew the comparison with ORT.
    shapes = {name: array.shape for name, array in feeds.items()}
    rates = (None,) if sparse_weights_rate is None else (None, sparse_weights_rate)
    return [_openvino_variant(model, source, feeds, shapes, precision, mode, rate)
            for precision in precisions for rate in rates]


def _openvino_variant(
    model: str, source: RuntimeSource, feeds: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
    precision: str, mode: str, sparse_weights_rate: float | None,
) -> _Variant:
    hint = None if precision == _DEFAULT_PRECISION else precision
    backend = _backend(precision, sparse_weights_rate)
    label = f"{model}/{backend}/{mode}"
    try:
        compiled = compile_model(source, precision_hint=hint, performance_hint=mode.upper(), shapes=shapes,
                                 sparse_weights_rate=sparse_weights_rate)
        runner = _OvSyncRunner(compiled, feeds) if mode == LATENCY else _OvAsyncRunner(compiled, feeds)
    except BenchmarkError as exc:
        raise BenchmarkError(f"{label}: {exc.args[0]}") from exc
    except Exception as exc:  # noqa: BLE001 - binding tensors fails with RuntimeError on bad inputs
        raise BenchmarkError(f"{label}: {exc}") from exc
    return _Variant(
        label, model, "openvino", backend, precision, mode, runner,
        infer_requests=getattr(runner, "requests", 1), kernels=_kernels(compiled),
        sparse_weights_rate=sparse_weights_rate,
        sparse_layers={} if sparse_weights_rate is None else sparse_weight_layers(compiled),
    )


def _ort_variant(model: str, source: RuntimeSource, feeds: Mapping[str, np.ndarray]) -> _Variant:
    label = f"{model}/{ORT_BACKEND}/{LATENCY}"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the QDQ "consider pre-processing" chatter is not actionable here
    try:
        session = ort.InferenceSession(source.readable, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph types
        raise BenchmarkError(f"{label}: ONNX Runtime could not load the model: {exc}") from exc
    return _Variant(label, model, "onnxruntime", ORT_BACKEND, "n/a", LATENCY, _OrtRunner(session, feeds))


# ------------------------------------------------------------------------------------------------ benchmark


def check_timing(batch: int, rounds: int, round_seconds: float) -> None:
    """Refuse a batch, round count or round length no measurement can have (NaN and infinity included)."""
    if batch < 1 or rounds < 1 or not 0 < round_seconds <= MAX_ROUND_SECONDS:
        raise BenchmarkError(f"need batch >= 1, rounds >= 1, 0 < round_seconds <= {MAX_ROUND_SECONDS:g}; got "
                             f"{batch}, {rounds}, {round_seconds}")


def check_sparse_weights_rate(rate: float | None) -> None:
    """Refuse a rate outside (0, 1): OpenVINO rejects values outside [0, 1], 1 is its "off", and 0 would pack
    layers without a single zero weight."""
    if rate is None:
        return
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1:
        raise BenchmarkError(
            f"the sparse weights rate ({SPARSE_WEIGHTS_PROPERTY}) is the least fraction of zero weights a layer "
            f"needs to run sparse: a number with 0 < rate < 1 (1 turns sparse weights off); got {rate!r}")


def _validate_arguments(
    models: Mapping[str, str | os.PathLike[str]], batch: int, rounds: int, round_seconds: float,
    precisions: Sequence[str], include_ort: bool, sparse_weights_rate: float | None,
) -> dict[str, Path]:
    if not models:
        raise BenchmarkError("no models to benchmark")
    check_timing(batch, rounds, round_seconds)
    if not precisions and not include_ort:
        raise BenchmarkError("nothing to measure: no OpenVINO precisions and include_ort=False")
    check_sparse_weights_rate(sparse_weights_rate)
    if sparse_weights_rate is not None and not precisions:
        raise BenchmarkError("sparse weights are an OpenVINO setting, but no OpenVINO precision is measured")
    paths = {}
    for name, path in models.items():
        if not name or "/" in name:
            raise BenchmarkError(f"model label {name!r} must be non-empty and contain no '/'")
        paths[name] = Path(path)
        if not paths[name].is_file():
            raise BenchmarkError(f"model {name!r}: file not found: {path}")
    return paths


def _run_safely(variant: _Variant, seconds: float) -> _Round:
    try:
        return variant.run(seconds)
    except Exception as exc:  # noqa: BLE001 - any engine failure becomes one named error
        raise BenchmarkError(f"{variant.label}: inference failed: {exc}") from exc


def _measure(variants: Sequence[_Variant], rounds: int, round_seconds: float, progress: bool) -> None:
    """Warm every variant up, then interleave: each round runs every variant once, in a new order.

    The order is shuffled (seeded, so runs repeat) rather than fixed or rotated: with a fixed cycle each variant
    always runs right after the same neighbour, whose after-effects (a runtime's threads still spinning, caches
    filled with its weights) then land on it in every round. Measured here: in a fixed order, two files that later
    measured equal differed by 9% in OpenVINO latency.
    """
    for variant in variants:
        _run_safely(variant, min(_WARMUP_SECONDS, round_seconds))
    shuffler = random.Random(0)
    with tqdm(total=rounds * len(variants), desc="benchmark", unit="run", disable=not progress) as bar:
        for round_index in range(rounds):
            for variant in shuffler.sample(list(variants), len(variants)):
                bar.set_postfix_str(f"round {round_index + 1}/{rounds} {variant.label}")
                variant.rounds.append(_run_safely(variant, round_seconds))
                bar.update()


def _aggregate(variant: _Variant, batch: int) -> Measurement:
    latencies = np.concatenate([np.asarray(r.latencies_ms, dtype=np.float64) for r in variant.rounds])
    fps = [r.inferences * batch / r.seconds for r in variant.rounds if r.seconds > 0]
    return Measurement(
        variant=variant.label, model=variant.model, engine=variant.engine, backend=variant.backend,
        precision=variant.precision, mode=variant.mode, batch=batch,
        median_ms=float(np.median(latencies)) if latencies.size else math.nan,
        p90_ms=float(np.percentile(latencies, 90)) if latencies.size else math.nan,
        throughput_fps=float(np.median(fps)) if fps else math.nan,
        samples=int(sum(r.inferences for r in variant.rounds)), rounds=len(variant.rounds),
        infer_requests=variant.infer_requests, kernels=variant.kernels,
        sparse_weights_rate=variant.sparse_weights_rate,
    )


def _sparse_environment(variants: Sequence[_Variant], rate: float | None, cpu: CpuFeatures) -> dict[str, str]:
    """The rate and what it does on this CPU, for the JSON report and the text header."""
    if rate is None:
        return {}
    layers = {v.model: v.sparse_layers for v in variants if v.sparse_weights_rate is not None}
    return {"sparse_weights_rate": f"{rate:g}", "sparse_weights": sparse_weights_note(rate, cpu),
            "sparse_weights_layers": describe_sparse_weight_layers(layers)}


def _environment() -> dict[str, str]:
    return {
        **cpu_features().to_dict(),
        "logical_cores": str(psutil.cpu_count(logical=True)),
        "physical_cores": str(psutil.cpu_count(logical=False)),
        "openvino": ov.get_version(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def benchmark(
    models: Mapping[str, str | os.PathLike[str]],
    *,
    batch: int = 1,
    rounds: int = 5,
    round_seconds: float = 2.0,
    openvino_precisions: Sequence[str] = ("f32", "default"),
    include_ort: bool = True,
    include_throughput: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
    sparse_weights_rate: float | None = None,
) -> BenchmarkReport:
    """Measure each ONNX model (label -> path) on OpenVINO CPU and ONNX Runtime CPU, interleaved in rounds.

    Every model runs with every OpenVINO precision variant ("f32" = INFERENCE_PRECISION_HINT f32,
    "default" = no hint; other strings are passed as the hint), in latency mode and, if `include_throughput`,
    throughput mode; plus ONNX Runtime latency if `include_ort`. All variants are compiled before any timing.
    `inputs` (same arrays for every model) replaces random data; without it, a dynamic first dimension becomes
    `batch` and any other dynamic dimension raises BenchmarkError naming the input.
    `sparse_weights_rate` (0 < rate < 1) adds a "-sparse" twin of every OpenVINO variant compiled with
    CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE=rate; the environment's "sparse_weights" says what it does on this CPU.
    A full run takes about rounds x round_seconds x number of variants, plus compilation and warm-up.
    """
    paths = _validate_arguments(models, batch, rounds, round_seconds, openvino_precisions, include_ort,
                                sparse_weights_rate)
    # Build every feed first so a bad input fails before minutes of compilation.
    feeds = {name: _make_inputs(_input_specs(path), batch, inputs, name) for name, path in paths.items()}
    variants: list[_Variant] = []
    with ExitStack() as stack:
        # Each model is read and checked once; the runtimes get those bytes, never the path again.
        sources = {name: stack.enter_context(runtime_source(path)) for name, path in paths.items()}
        for name in paths:
            variants += _openvino_variants(name, sources[name], feeds[name], openvino_precisions, LATENCY,
                                           sparse_weights_rate)
            if include_ort:
                variants.append(_ort_variant(name, sources[name], feeds[name]))
        if include_throughput:
            for name in paths:
                variants += _openvino_variants(name, sources[name], feeds[name], openvino_precisions, THROUGHPUT,
                                               sparse_weights_rate)
    _measure(variants, rounds, round_seconds, progress)
    return BenchmarkReport(
        measurements=tuple(_aggregate(v, batch) for v in variants),
        batch=batch, rounds=rounds, round_seconds=round_seconds,
        environment={**_environment(), **_sparse_environment(variants, sparse_weights_rate, cpu_features())},
    )


# --------------------------------------------------------------------------------------------------- output


def _baseline_backends(report: BenchmarkReport, baseline: str) -> list[str]:
    model, _, backend = baseline.partition("/")
    if model not in report.models:
        raise BenchmarkError(f"baseline model {model!r} is not in the report (models: {report.models})")
    if backend:
        return [backend]
    # A sparse twin is compared with its dense variant in its own column, not used as a reference for every row.
    found = list(dict.fromkeys(m.backend for m in report.measurements
                               if m.model == model and not m.backend.endswith(SPARSE_SUFFIX)))
    # Reference order: forced f32 first, then the plugin default, other hints, ONNX Runtime last.
    return sorted(found, key=lambda b: (b != "ov-f32", b != "ov-default", b == ORT_BACKEND, b))


def _format_number(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_report(report: BenchmarkReport, baseline: str) -> str:
    """Fixed-width table: latency (ms), throughput (fps) and speed-ups against each backend of `baseline`.

    `baseline` is a model label ("fp32": one ratio column per backend of that model, e.g. "vs fp32/ov-f32" and
    "vs fp32/ov-default") or "<model>/<backend>" for a single column. Speed-ups compare rows of the same mode.
    """
    backends = _baseline_backends(report, baseline)
    model = baseline.partition("/")[0]
    env = report.environment
    lines = [
        f"Benchmark: batch {report.batch}, {report.rounds} interleaved rounds x {report.round_seconds:g} s per "
        f"variant; CPU {env.get('cpu', '?')} ({env.get('logical_cores', '?')} logical cores); "
        f"OpenVINO {env.get('openvino', '?')}, ONNX Runtime {env.get('onnxruntime', '?')}",
        f"ov-f32 = OpenVINO with INFERENCE_PRECISION_HINT=f32; ov-default = no hint (CPU plugin default: "
        f"{env.get('openvino_default_precision', '?')}); ort = ONNX Runtime CPU, ORT_ENABLE_ALL.",
        "kernels = runtime precision of the heavy layers (Convolution/FullyConnected/MatMul) x count.",
        _describe_cpu(env),
        *_describe_sparse_weights(env),
        "Speed-up vs <baseline variant>: baseline median latency / median latency (latency rows), "
        "fps / baseline fps (throughput rows); >1 is faster. Same run only.",
    ]
    sparse = any(m.backend.endswith(SPARSE_SUFFIX) for m in report.measurements)
    for mode in (LATENCY, THROUGHPUT):
        rows_of_mode = [m for m in report.measurements if m.mode == mode]
        if not rows_of_mode:
            continue
        header = ["variant", "kernels", "median ms", "p90 ms", "fps", "reqs"]
        header += [f"vs {model}/{backend}" for backend in backends] + (["vs dense twin"] if sparse else [])
        rows = [header]
        for m in rows_of_mode:
            row = [m.variant, m.kernels or "-", _format_number(m.median_ms, 3), _format_number(m.p90_ms, 3),
                   _format_number(m.throughput_fps, 1), str(m.infer_requests)]
            references = [report.find(model, backend, mode) for backend in backends]
            if sparse:
                references.append(_dense_twin(report, m))
            row += ["-" if reference is None else f"{_speedup(reference, m):.2f}x" for reference in references]
            rows.append(row)
        lines += ["", f"{mode} mode" + (" (sync, 1 request)" if mode == LATENCY else " (async queue)")]
        lines += _table(rows)
    return "\n".join(lines) + "\n"


def _dense_twin(report: BenchmarkReport, measurement: Measurement) -> Measurement | None:
    """The variant a "-sparse" measurement differs from only in the sparse weights setting."""
    if not measurement.backend.endswith(SPARSE_SUFFIX):
        return None
    return report.find(measurement.model, measurement.backend.removesuffix(SPARSE_SUFFIX), measurement.mode)


def _describe_sparse_weights(env: Mapping[str, str]) -> list[str]:
    if "sparse_weights_rate" not in env:
        return []
    return [f"ov-<precision>{SPARSE_SUFFIX} = the same with {SPARSE_WEIGHTS_PROPERTY}={env['sparse_weights_rate']}: "
            f"{env.get('sparse_weights', '?')}",
            "INT8 FullyConnected layers (the only ones sparse weights apply to): "
            f"{env.get('sparse_weights_layers', '?')}"]


def _describe_cpu(env: Mapping[str, str]) -> str:
    flags = ", ".join(f"{label} {'yes' if env.get(key) == 'True' else 'no'}" for label, key in (
        ("AVX2", "avx2"), ("AVX512", "avx512"), ("VNNI", "vnni"), ("AMX", "amx"), ("bf16", "bf16")))
    return f"CPU features: {flags}."


def _bar_colors(measurements: Sequence[Measurement]) -> list[str]:
    palette = {"ov-f32": "tab:blue", "ov-default": "tab:orange", ORT_BACKEND: "tab:green",
               f"ov-f32{SPARSE_SUFFIX}": "tab:cyan", f"ov-default{SPARSE_SUFFIX}": "tab:red"}
    return [palette.get(m.backend, "tab:purple") for m in measurements]


def plot_report(report: BenchmarkReport, path: str | os.PathLike[str]) -> Path:
    """Save a PNG with throughput (all variants) and latency (latency-mode variants) bars; written atomically."""
    # Figure + Agg canvas directly: never switches the global pyplot backend of the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = Path(path)
    measurements = list(report.measurements)
    latency_rows = [m for m in measurements if m.mode == LATENCY]
    height = 1.5 + 0.35 * max(len(measurements), 1)
    figure = Figure(figsize=(13, height), layout="constrained")
    FigureCanvasAgg(figure)
    ax_fps, ax_ms = figure.subplots(1, 2)
    ax_fps.barh([m.variant for m in measurements], [m.throughput_fps for m in measurements],
                color=_bar_colors(measurements))
    ax_fps.set_xlabel("throughput (samples/s, median of rounds)")
    ax_fps.invert_yaxis()
    ax_ms.barh([m.variant for m in latency_rows], [m.median_ms for m in latency_rows],
               xerr=[[0] * len(latency_rows), [max(m.p90_ms - m.median_ms, 0) for m in latency_rows]],
               color=_bar_colors(latency_rows))
    ax_ms.set_xlabel("latency ms (median, whisker to p90)")
    ax_ms.invert_yaxis()
    env = report.environment
    sparse = ""
    if "sparse_weights_rate" in env:
        sparse = f", -sparse = sparse weights rate {env['sparse_weights_rate']}" + (
            "" if env.get("amx") == "True" else " (no AMX: not used by OpenVINO)")
    figure.suptitle(f"batch {report.batch}, {report.rounds} rounds x {report.round_seconds:g} s, "
                    f"{env.get('cpu', '')}, OpenVINO default precision {env.get('openvino_default_precision', '?')}"
                    + sparse)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write plot {target}: {exc}") from exc
    return write_bytes_atomic(target, buffer.getvalue())
