"""The Python API: the same operations as the CLI, on ModelProtos or paths.

    import onnxcompress
    quantized = onnxcompress.quantize("model.onnx", "calib.npz", preset="mixed")   # -> onnx.ModelProto
    onnxcompress.save_model(quantized, "model.int8.onnx")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress.algorithms.pruning.oneshot import PruneResult, prune_model
from onnxcompress.algorithms.quantization.mixed_precision import (
    MixedPrecisionResult,
    choose_weight_bits,
    four_bit_drops,
    four_bit_hawq_costs,
    hessian_weights,
    initializer_bytes,
    weight_macs,
)
from onnxcompress.algorithms.quantization.partial import QuantizerUnit, UnitKind, apply_partial, quantizer_units
from onnxcompress.algorithms.quantization.ptq import INT4_OPSET, QuantizationPlan, export_graph, plan_quantization
from onnxcompress.algorithms.sparsity.oneshot import SparsifyResult, sparsify_model
from onnxcompress.algorithms.weight_compression.oneshot import WeightCompressionResult, compress_model, plan_compression
from onnxcompress.config import (
    BiasCorrection,
    BitCriterion,
    FinetuneConfig,
    PruneConfig,
    QuantizationConfig,
    SparsifyConfig,
    UnitRanking,
    WeightCompressionConfig,
)
from onnxcompress.data import calibration_batches, count_samples, model_inputs, read_npz
from onnxcompress.errors import ConfigError, DatasetError, EvaluationError
from onnxcompress.evaluation.accuracy_control import ControlResult, control_accuracy
from onnxcompress.evaluation.cache import ScoreCache
from onnxcompress.evaluation.hessian import Loss, hessian_traces
from onnxcompress.evaluation.metrics import BUILTIN, EvalSet, resolve_metric
from onnxcompress.evaluation.noise import noise_ranking
from onnxcompress.evaluation.parallel import make_evaluator
from onnxcompress.evaluation.speed import speed_cost
from onnxcompress.evaluation.sensitivity import SensitivityReport, quantizer_candidates, quantizer_sensitivity
from onnxcompress.models import sample_for_model
from onnxcompress.packaging.manifest import COMPRESSION_METADATA
from onnxcompress.runtime.model_io import load_model, save_model, upgrade_opset

ModelLike = onnx.ModelProto | str | os.PathLike

#: Calibration samples the noise ranking of accuracy control runs the float model on.
NOISE_SAMPLES = 16
#: Evaluation samples (whole batches, at least this many) the Hessian criterion's gradients are taken on: the
#: trace ranks weights long before it settles, and each probe costs two gradient passes over them.
HESSIAN_SAMPLES = 32

if TYPE_CHECKING:
    from onnxcompress.training.loss import LossBuilder
    from onnxcompress.training.trainer import FinetuneResult, MetricFunction


def quantize(model: ModelLike, dataset: Any = None, config: QuantizationConfig | None = None, *,
             progress: bool = True, **options: Any) -> onnx.ModelProto:
    """Post-training INT8 quantization; returns the quantized model (QDQ form, INT8 weights).

    `dataset` is a folder of .npy feeds, an .npz of per-input arrays, an iterable of input dicts or an ONNX Runtime
    CalibrationDataReader; it may be omitted for the bundled sample models. `options` are QuantizationConfig
    fields (e.g. preset="mixed", subset_size=100) and override `config`. The input model is never modified.
    """
    config = _merge(config, options)
    proto, plan = _plan_quantization(model, dataset, config, progress)
    quantized = apply_partial(plan, proto, in_place=True)
    record_compression(quantized, [{"algorithm": "quantization", **config.model_dump(mode="json")}])
    return quantized


def quantize_with_accuracy_control(model: ModelLike, dataset: Any = None, config: QuantizationConfig | None = None,
                                   *, metric: str | Callable[[str], object], max_drop: float, eval_data: Any = None,
                                   ranking: UnitRanking | str = UnitRanking.AUTO, workers: int | None = None,
                                   ray_address: str | None = None, cache: bool = True, speed: bool = True,
                                   progress: bool = True, **options: Any) -> ControlResult:
    """`quantize`, then the fewest quantizer units returned to float that keep the metric within `max_drop` of the
    float model's (`evaluation/accuracy_control.py`). `metric` is top1, cosine, sqnr (these score `eval_data`, an
    .npz with an array per model input and, for top1, `labels`), `FILE.py:FUNC` or a callable taking a model
    path; higher is better. `ranking` (`config.UnitRanking`) says how the units are ranked. Candidates are scored
    in `workers` local processes (default: one per core) or on the Ray cluster at `ray_address`
    (`evaluation/parallel.py`); the result does not depend on where. With `cache`, scores measured before for the
    same model, data, settings and metric (`sensitivity`) are reused (`evaluation/cache.py`). With `speed`, what
    the float units (if any) cost in latency is measured on the first calibration sample (`evaluation/speed.py`)."""
    config = _merge(config, options)
    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else _copy(model)
    data = _eval_set(eval_data, proto)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-reference-") as tmp:
        reference = save_model(proto, Path(tmp) / "fp32.onnx")
        resolved = resolve_metric(metric, data, reference)  # a bad metric fails before the calibration pass
        ranking = _ranking(ranking, metric)
        proto, plan = _plan_quantization(model, dataset, config, progress, proto=proto)
        order = weights = None
        if ranking is UnitRanking.NOISE:
            weights = _unit_noise(plan, proto, model, dataset)
            order = list(weights)
        store = _score_cache(model, _calibration_source(model, dataset), config, metric, eval_data) if cache else None
        candidates = quantizer_candidates(plan, proto)
        with contextlib.closing(make_evaluator(workers, ray_address)) as evaluator:
            result = control_accuracy(candidates, resolved, max_drop, order=order, weights=weights,
                                      evaluator=evaluator, store=store, progress=progress)
        if speed and result.float_units:
            sample = _first_sample(_calibration_source(model, dataset), proto)
            result = dataclasses.replace(result, speed=speed_cost(candidates, result.float_units, sample,
                                                                  progress=progress))
    record_compression(result.model, [{"algorithm": "quantization", **config.model_dump(mode="json"),
                                       "accuracy_control": {"max_drop": max_drop,
                                                            "float_units": list(result.labels)}}])
    return result


def sensitivity(model: ModelLike, dataset: Any = None, config: QuantizationConfig | None = None, *,
                metric: str | Callable[[str], object], eval_data: Any = None, workers: int | None = None,
                ray_address: str | None = None, cache: bool = True, four_bit: bool = False, hessian: bool = False,
                progress: bool = True, **options: Any) -> SensitivityReport:
    """`quantize`'s plan, then the metric with each quantizer unit alone in float and the noise each adds
    (`evaluation/sensitivity.py`, `evaluation/noise.py`); with `four_bit`, the metric drop of each weight alone in
    4 bits too; with `hessian`, each weight's average Hessian trace and HAWQ-v2 cost of 4 bits
    (`evaluation/hessian.py`, on the evaluation samples as `quantize_mixed_precision` takes them). `metric`,
    `eval_data`, `workers`, `ray_address` and `cache` as in `quantize_with_accuracy_control`, whose search then
    reuses these scores."""
    config = _merge(config, options)
    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else _copy(model)
    if four_bit or hessian:
        proto = upgrade_opset(proto, INT4_OPSET)
    data = _eval_set(eval_data, proto)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-reference-") as tmp:
        reference = save_model(proto, Path(tmp) / "fp32.onnx")
        resolved = resolve_metric(metric, data, reference)
        proto, plan = _plan_quantization(model, dataset, config, progress, proto=proto)
        noise = _unit_noise(plan, proto, model, dataset)
        store = _score_cache(model, _calibration_source(model, dataset), config, metric, eval_data) if cache else None
        with contextlib.closing(make_evaluator(workers, ray_address)) as evaluator:
            report = quantizer_sensitivity(plan, proto, resolved, evaluator=evaluator, store=store,
                                           progress=progress)
            units = {u.index: u for u in quantizer_units(plan) if u.kind is UnitKind.WEIGHT}
            drops = {}
            if four_bit:
                drops = {units[i]: drop for i, drop in four_bit_drops(
                    plan, proto, resolved, report.quantized_score, evaluator=evaluator, store=store,
                    progress=progress).items()}
        second_order = {}
        if hessian:
            traces, costs = _hawq_costs(plan, proto, data, reference, progress)
            nodes = {n.name: n for n in plan.graph.nodes}
            second_order = {units[i]: (traces[nodes[c.node].inputs[c.port].name], costs[c.node])
                            for i, c in enumerate(plan.weights)}
    return dataclasses.replace(report, noise=noise, four_bit_drop=drops, hessian=second_order)


def _unit_noise(plan: QuantizationPlan, proto: onnx.ModelProto, model: ModelLike, dataset: Any
                ) -> dict[QuantizerUnit, float]:
    """Each unit's quantization noise on the first calibration samples, noisiest first."""
    feeds = calibration_batches(_default_dataset(model) if dataset is None else dataset, model_inputs(proto),
                                subset_size=NOISE_SAMPLES, batch_size=1)
    return {u.unit: u.noise for u in noise_ranking(plan, proto, feeds)}


def _eval_set(eval_data: Any, proto: onnx.ModelProto) -> EvalSet | None:
    if eval_data is None:
        return None
    arrays = read_npz(eval_data) if isinstance(eval_data, (str, os.PathLike)) else dict(eval_data)
    return EvalSet.from_arrays(arrays, [spec.name for spec in model_inputs(proto)])


def _ranking(ranking: UnitRanking | str, metric: Any) -> UnitRanking:
    """The ranking `auto` stands for: the metric for the built-in metrics (fast), the noise for others."""
    ranking = UnitRanking(ranking)
    if ranking is UnitRanking.AUTO:
        return UnitRanking.METRIC if isinstance(metric, str) and metric in BUILTIN else UnitRanking.NOISE
    return ranking


def _calibration_source(model: ModelLike, dataset: Any) -> Any:
    """The calibration data a quantization of `model` reads: `dataset`, or a bundled sample's own."""
    return _default_dataset(model) if dataset is None and not isinstance(model, onnx.ModelProto) else dataset


def _score_cache(model: ModelLike, source: Any, config: QuantizationConfig | WeightCompressionConfig, metric: Any,
                 eval_data: Any) -> ScoreCache:
    """The score cache of this model, calibration data (`source`), settings and metric (in memory only when one
    cannot be named)."""
    def named(item: Any) -> Path | None:
        return Path(item) if isinstance(item, (str, os.PathLike)) and Path(item).exists() else None

    if isinstance(metric, str) and metric in BUILTIN:
        metric_parts: list[Any] = [metric, named(eval_data)]
    elif isinstance(metric, str):
        file, _, function = metric.rpartition(":")
        metric_parts = [named(file), function]
    else:
        metric_parts = [None]  # a Python callable has no name a later run could match
    return ScoreCache.keyed([None if isinstance(model, onnx.ModelProto) else named(model), named(source),
                             type(config).__name__, config.model_dump_json(), *metric_parts])


def quantize_mixed_precision(model: ModelLike, dataset: Any = None, config: QuantizationConfig | None = None, *,
                             max_size: float | None = None, max_bit_complexity: float | None = None,
                             metric: str | Callable[[str], object] = "cosine", eval_data: Any = None,
                             criterion: BitCriterion | str = BitCriterion.METRIC, workers: int | None = None,
                             ray_address: str | None = None, progress: bool = True,
                             **options: Any) -> MixedPrecisionResult:
    """`quantize` with per-layer weight bits from {8, 4}: the weights whose 4 bits cost the least `metric` per byte
    (or bit operation) saved go to 4 bits (stored as INT4, opset 21) until the initializers are at most `max_size`
    × the FP32 model's, or the bit complexity (Σ MACs × weight bits × activation bits, at the first calibration
    sample's shapes) at most `max_bit_complexity` × the all-INT8 model's (one of the two;
    `algorithms/quantization/mixed_precision.py`). `metric`, `workers` and `ray_address` as in
    `quantize_with_accuracy_control`; without `eval_data`, the cosine to the FP32 outputs is measured on up to
    128 samples of `dataset` when it is an .npz. `criterion` (`config.BitCriterion`) says how a weight's 4 bits are
    costed: measured by the metric, or predicted from Hessian traces on the evaluation samples (`_hessian_batches`
    says of which loss)."""
    criterion = BitCriterion(criterion)
    config = _merge(config, options)
    if (max_size is None) == (max_bit_complexity is None):
        raise ConfigError("mixed precision takes one budget: max_size or max_bit_complexity")
    if max_size is not None and not 0 < max_size <= 1:
        raise ConfigError(f"max_size must be in (0, 1] (a fraction of the FP32 model's size), got {max_size}")
    if max_bit_complexity is not None and not 0 < max_bit_complexity <= 1:
        raise ConfigError(f"max_bit_complexity must be in (0, 1] (a fraction of the all-INT8 model's), got "
                          f"{max_bit_complexity}")
    loaded = load_model(model) if not isinstance(model, onnx.ModelProto) else _copy(model)
    float_bytes = initializer_bytes(loaded)
    proto = upgrade_opset(loaded, INT4_OPSET)
    data = _eval_set(eval_data, proto)
    calibration = dataset if dataset is not None else _default_dataset(model)
    if data is None and isinstance(calibration, (str, os.PathLike)) and str(calibration).endswith(".npz"):
        data = _eval_set({k: v[:128] for k, v in read_npz(calibration).items()}, proto)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-reference-") as tmp:
        reference = save_model(loaded, Path(tmp) / "fp32.onnx")
        resolved = resolve_metric(metric, data, reference)
        # Top-1 on a few hundred samples ties most single-weight changes; the outputs' cosine ranks them.
        ranking = resolve_metric("cosine", data, reference) if metric == "top1" else resolved
        proto, plan = _plan_quantization(model, dataset, config, progress, proto=proto)
        predicted = None
        if criterion is BitCriterion.HESSIAN:
            predicted = _hawq_costs(plan, proto, data, reference, progress)[1]
        macs = None
        if max_bit_complexity is not None:
            sample = _first_sample(calibration, proto)
            if sample is None:
                raise DatasetError("the bit complexity counts MACs at the first calibration sample's shapes, which a "
                                   "one-shot iterator no longer has: pass a file, a folder or a list")
            macs = weight_macs(plan, proto, sample)
        with contextlib.closing(make_evaluator(workers, ray_address)) as evaluator:
            result = choose_weight_bits(plan, proto, resolved, max_size, float_bytes=float_bytes,
                                        max_bit_complexity=max_bit_complexity, macs=macs, ranking=ranking,
                                        predicted=predicted, evaluator=evaluator, progress=progress)
    record_compression(result.model, [{"algorithm": "quantization", **config.model_dump(mode="json"),
                                       "mixed_precision": {"max_size": max_size,
                                                           "max_bit_complexity": max_bit_complexity,
                                                           "criterion": criterion.value,
                                                           "four_bit": list(result.four_bit)}}])
    return result


def _hawq_costs(plan: QuantizationPlan, proto: onnx.ModelProto, data: EvalSet | None, reference: Path,
                progress: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Each quantized weight's average Hessian trace (by initializer) and HAWQ-v2 cost of 4 bits (by node)."""
    batches, loss = _hessian_batches(data, reference)
    traces = hessian_traces(export_graph(plan.graph, proto), batches, hessian_weights(plan), loss=loss,
                            progress=progress)
    return traces, four_bit_hawq_costs(plan, traces)


def _hessian_batches(data: EvalSet | None, reference: Path) -> tuple[list[tuple[dict[str, Any], Any]], Loss]:
    """The first `HESSIAN_SAMPLES` evaluation samples and the loss the Hessian is taken of: cross-entropy with their
    labels, or with the float model's top-1 where the data has none and the first output is [batch, classes ≥ 2]
    logits; otherwise the squared error to the float model's first output."""
    if data is None:
        raise DatasetError("the Hessian criterion needs evaluation samples: pass --eval-data or an .npz as --data")
    session = None if data.labels is not None else ort.InferenceSession(str(reference),
                                                                         providers=["CPUExecutionProvider"])
    batches, taken, loss = [], 0, "cross_entropy"
    for feeds in data.feeds:
        count = min(len(next(iter(feeds.values()))), HESSIAN_SAMPLES - taken)
        if count <= 0:
            break
        feeds = {name: array[:count] for name, array in feeds.items()}
        if session is None:
            targets = np.asarray(data.labels[taken:taken + count], np.int64)
        else:
            output = session.run(None, feeds)[0]
            if not np.issubdtype(output.dtype, np.floating):
                raise EvaluationError(f"the Hessian criterion differentiates the model's first output, which is "
                                      f"{output.dtype}: it needs labels (top-1) or a float output")
            if taken == 0 and (output.ndim != 2 or output.shape[1] < 2):  # one logit has no cross-entropy
                loss = "mse"
            targets = output.argmax(1).astype(np.int64) if loss == "cross_entropy" else output
        batches.append((feeds, targets))
        taken += count
    return batches, loss


def _plan_quantization(model: ModelLike, dataset: Any, config: QuantizationConfig, progress: bool, *,
                       proto: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, QuantizationPlan]:
    """The model (a private copy, or `proto` when the caller loaded one) and its post-training quantization
    plan, calibrated on `dataset`."""
    if proto is None:
        proto = load_model(model) if not isinstance(model, onnx.ModelProto) else _copy(model)
    if config.four_bit_storage:
        proto = upgrade_opset(proto, INT4_OPSET)
    dataset = _default_dataset(model) if dataset is None else dataset
    inputs = model_inputs(proto)

    def batches(subset_size: int = config.subset_size):
        return calibration_batches(dataset, inputs, subset_size=subset_size, batch_size=config.batch_size)

    total = count_samples(dataset, inputs, config.subset_size)
    second_pass = None
    if config.bias_correction is BiasCorrection.FULL:
        second_pass = batches(min(config.subset_size, config.bias_correction_subset_size))
    smoothing_pass = batches() if config.effective_smooth_quant_alpha is not None else None
    if (second_pass or smoothing_pass) and not _reiterable(dataset):
        raise DatasetError("full bias correction and SmoothQuant read the data twice; pass a list, a file or a "
                           "folder, not a one-shot iterator")
    plan = plan_quantization(proto, batches(), config, total=total, progress=progress, second_pass=second_pass,
                             batches_for_smoothing=smoothing_pass)
    return proto, plan


def _one_shot_inputs(model: ModelLike, dataset: Any, config: SparsifyConfig | PruneConfig
                     ) -> tuple[onnx.ModelProto, Any, int | None]:
    """The model (a private copy) and, with `dataset`, its calibration batches and their count."""
    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else _copy(model)
    if dataset is None:
        return proto, None, None
    inputs = model_inputs(proto)
    batches = calibration_batches(dataset, inputs, subset_size=config.subset_size, batch_size=config.batch_size)
    return proto, batches, count_samples(dataset, inputs, config.subset_size)


def sparsify(model: ModelLike, dataset: Any = None, config: SparsifyConfig | None = None, *, progress: bool = True,
             **options: Any) -> SparsifyResult:
    """One-shot magnitude sparsity: zero the `level` least important weights of every Conv/Gemm/MatMul.

    With `dataset` (calibration data as for `quantize`), each sparse layer's bias absorbs the mean output shift the
    zeros cause. `options` are SparsifyConfig fields (e.g. level=0.5) and override `config`. The result holds the
    model and the sparsity per layer.
    """
    if options:
        config = SparsifyConfig.build({**(config.model_dump() if config else {}), **options})
    config = config or SparsifyConfig()
    proto, batches, total = _one_shot_inputs(model, dataset, config)
    result = sparsify_model(proto, config, batches, total=total, progress=progress)
    record_compression(result.model, [{"algorithm": "magnitude_sparsity", "one_shot": True,
                                       **config.model_dump(mode="json")}])
    return result


def prune(model: ModelLike, dataset: Any = None, config: PruneConfig | None = None, *, progress: bool = True,
          **options: Any) -> PruneResult:
    """One-shot filter pruning: remove the `target` fraction of filters (or of MACs, `target_kind="flops"`) with
    the lowest importance, from every group of channels that can lose them together, and every slice that
    depends on them.

    With `dataset` (calibration data as for `quantize`), the layers after pruned channels absorb those channels'
    mean contribution in their biases. `options` are PruneConfig fields and override `config`. The result holds
    the model, MACs and weights per layer before and after, and each channel group's outcome.
    """
    if options:
        config = PruneConfig.build({**(config.model_dump() if config else {}), **options})
    config = config or PruneConfig()
    proto, batches, total = _one_shot_inputs(model, dataset, config)
    result = prune_model(proto, config, batches, total=total, progress=progress)
    record_compression(result.model, [{"algorithm": "filter_pruning", "one_shot": True,
                                       **config.model_dump(mode="json")}])
    return result


def compress_weights(model: ModelLike, dataset: Any = None, config: WeightCompressionConfig | None = None, *,
                     progress: bool = True, **options: Any) -> WeightCompressionResult:
    """Weight-only compression of the MatMul/Gemm/Gather tables: INT8 per channel, or blockwise INT4 with the
    most sensitive tables in INT8 (`ratio`); activations stay float.

    Without `dataset` the levels are rounded to nearest; with it (calibration data as for `quantize`), each block's
    clipping and scale minimise the output error its input features' E[x²] predicts, and in the 4-bit modes the
    tables take AWQ's activation-aware scales where they fold upstream (`activation_scaling`). `options` are
    WeightCompressionConfig fields (e.g. mode="int4_sym", group_size=64) and override `config`. The result holds the model and what each
    table became; `result.save(path)` writes it (streaming what stayed in the input's external data).
    """
    if options:
        config = WeightCompressionConfig.build({**(config.model_dump() if config else {}), **options})
    config = config or WeightCompressionConfig()
    # A file's external data stays where it is: tables are read one at a time, the rest streamed when saving.
    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    proto = _copy(model) if source is None else load_model(source, lazy_external_data=True)
    batches, total = _weight_batches(proto, dataset, config)
    result = compress_model(proto, config, batches, total=total, progress=progress, source=source)
    record_compression(result.model, [{"algorithm": "weight_compression", "data_aware": dataset is not None,
                                       **config.model_dump(mode="json"),
                                       "scaled_activations": list(result.scaled_activations)}])
    return result


def compress_weights_with_accuracy_control(model: ModelLike, dataset: Any = None,
                                           config: WeightCompressionConfig | None = None, *,
                                           metric: str | Callable[[str], object], max_drop: float,
                                           eval_data: Any = None, ranking: UnitRanking | str = UnitRanking.AUTO,
                                           workers: int | None = None, ray_address: str | None = None,
                                           cache: bool = True, speed: bool = True, progress: bool = True,
                                           **options: Any) -> WeightControlResult:
    """`compress_weights` in a 4-bit mode, then the fewest 4-bit tables moved to INT8 that keep the metric within
    `max_drop` of the FP32 model's. `metric`, `eval_data`, `workers`, `ray_address` and `cache` as in
    `quantize_with_accuracy_control`; the noise ranking orders the tables by their 4-bit error (weighted by
    E[x²] of their input features when `dataset` is given); `speed` as there (on the first sample of `dataset`,
    else of `eval_data`, else random inputs). The result holds the search and the compression."""
    if options:
        config = WeightCompressionConfig.build({**(config.model_dump() if config else {}), **options})
    config = config or WeightCompressionConfig()
    if not config.mode.four_bit:
        raise ConfigError(f"accuracy control for weight compression moves 4-bit tables to INT8; mode "
                          f"{config.mode.value} has none (use int4_sym or int4_asym)")
    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    proto = _copy(model) if source is None else load_model(source, lazy_external_data=True)
    data = _eval_set(eval_data, proto)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-reference-") as tmp:
        reference = source.absolute() if source is not None else save_model(proto, Path(tmp) / "fp32.onnx")
        resolved = resolve_metric(metric, data, reference)  # a bad metric fails before the statistics pass
        ranking = _ranking(ranking, metric)
        batches, total = _weight_batches(proto, dataset, config)
        planned = plan_compression(proto, config, batches, total=total, progress=progress, source=source)
        candidates = dataclasses.replace(planned.candidates(), reference=reference)
        order = weights = None
        if ranking is UnitRanking.NOISE:
            errors = {layer.node: layer.relative_error for layer in planned.plan.layers if layer.mode.four_bit}
            order = sorted(errors, key=lambda node: -errors[node])
            weights = errors
        store = _score_cache(model, dataset, config, metric, eval_data) if cache else None
        with contextlib.closing(make_evaluator(workers, ray_address)) as evaluator:
            control = control_accuracy(candidates, resolved, max_drop, order=order, weights=weights,
                                       evaluator=evaluator, store=store, progress=progress)
        if speed and control.float_units:
            sample = _first_sample(dataset, proto) if dataset is not None else _first_eval_sample(data)
            control = dataclasses.replace(control, speed=speed_cost(candidates, control.float_units, sample,
                                                                    progress=progress))
    compressed = planned.apply(control.float_units)
    record_compression(compressed.model, [{"algorithm": "weight_compression", "data_aware": dataset is not None,
                                           **config.model_dump(mode="json"),
                                           "scaled_activations": list(compressed.scaled_activations),
                                           "accuracy_control": {"max_drop": max_drop,
                                                                "int8_tables": list(control.labels)}}])
    return WeightControlResult(control, compressed)


@dataclasses.dataclass(frozen=True)
class WeightControlResult:
    """What `compress_weights_with_accuracy_control` searched (`control`: the tables moved to INT8 and the scores)
    and made (`compression`: each table's precision; `compression.save(path)` writes the model)."""

    control: ControlResult[str]
    compression: WeightCompressionResult


def _first_sample(dataset: Any, proto: onnx.ModelProto) -> dict[str, Any] | None:
    """The first calibration sample; None for a one-shot iterator, which the calibration pass has used up (the
    speed measurement then runs on random inputs)."""
    if not _reiterable(dataset):
        return None
    return next(iter(calibration_batches(dataset, model_inputs(proto), subset_size=1, batch_size=1)))


def _first_eval_sample(data: EvalSet | None) -> dict[str, Any] | None:
    return None if data is None or not data.feeds else {name: array[:1] for name, array in data.feeds[0].items()}


def _weight_batches(proto: onnx.ModelProto, dataset: Any, config: WeightCompressionConfig
                    ) -> tuple[Any, int | None]:
    if dataset is None:
        return None, None
    inputs = model_inputs(proto)
    return (calibration_batches(dataset, inputs, subset_size=config.subset_size, batch_size=config.batch_size),
            count_samples(dataset, inputs, config.subset_size))


def finetune(model: ModelLike, train: Any = None, val: Any = None, config: FinetuneConfig | None = None, *,
             checkpoint_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
             loss: LossBuilder | None = None, metric: MetricFunction | None = None) -> FinetuneResult:
    """Compress `model` with the configured algorithms and fine-tune it; the result holds the deployable model.

    `train`/`val` are labelled data (an .npz or .npy folder with the model inputs plus `labels`, a `(feeds,
    labels)` pair, or an iterable of batched pairs); the bundled samples bring their own. `loss` replaces the
    task loss by a graph builder `(graph, logits, labels) -> scalar tensor`, `metric` the top-1 metric by a
    function `(logits, labels) -> float` (higher is better). Checkpoints go to `checkpoint_dir`; `resume`
    continues the run found there.
    """
    from onnxcompress.training.trainer import Trainer

    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else _copy(model)
    bundled = sample_for_model(model) if not isinstance(model, onnx.ModelProto) else None
    if train is None or val is None:
        if bundled is None:
            raise DatasetError("fine-tuning needs training and validation data (only the bundled samples bring "
                               "their own)")
        train = bundled.train_path if train is None else train
        val = bundled.test_path if val is None else val
    config = config or FinetuneConfig()
    trainer = Trainer(proto, train, val, config, Path(checkpoint_dir), resume=resume, progress=progress, loss=loss,
                      metric=metric)
    result = trainer.run()
    record_compression(result.model, [algorithm.model_dump(mode="json") for algorithm in config.compression])
    return result


def record_compression(model: onnx.ModelProto, settings: list[dict[str, Any]]) -> None:
    """Store the settings that made `model` in its metadata, where `package` (and anyone) can read them."""
    entries = [p for p in model.metadata_props if p.key != COMPRESSION_METADATA]
    del model.metadata_props[:]
    model.metadata_props.extend(entries)
    model.metadata_props.add(key=COMPRESSION_METADATA, value=json.dumps(settings, sort_keys=True))


def _merge(config: QuantizationConfig | None, options: dict[str, Any]) -> QuantizationConfig:
    if config is None:
        return QuantizationConfig.build(options, source="options")
    if not options:
        return config
    return QuantizationConfig.build({**config.model_dump(), **options}, source="options")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _default_dataset(model: ModelLike) -> Path:
    bundled = sample_for_model(model) if not isinstance(model, onnx.ModelProto) else None
    if bundled is None:
        raise DatasetError("no calibration data given: pass a folder of .npy files, an .npz or an iterable of "
                           "input dicts (only the bundled sample models bring their own)")
    return bundled.calibration_path


def _reiterable(dataset: Any) -> bool:
    return isinstance(dataset, (str, os.PathLike, list, tuple)) or hasattr(dataset, "__len__")
