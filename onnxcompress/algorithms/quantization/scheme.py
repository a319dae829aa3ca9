"""Quantization arithmetic of the NNCF paper §4.1: level ranges (Table 1), symmetric and asymmetric parameters,
and the zero-point alignment that maps float zero to an exact integer.

ONNX's QuantizeLinear computes q = saturate(round(r / s) + z); the paper's symmetric `scale` (the top of the float
range) becomes s = scale / q_max, and its asymmetric (r_min, r_max) becomes s = (r_max - r_min) / (2^bits - 1),
z = -r_min / s after alignment.

Symmetric activations get signed levels (int8, zero-point 0) when their range goes below zero and unsigned ones
(uint8) otherwise. Where a compute op reads signed levels, post-training quantization stores them as uint8 with
zero-point 128, the same arithmetic in the form both runtimes' integer kernels prefer (see `ptq`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

# Ranges collapse to a tiny positive scale so that all-zero tensors still quantize (every value to zero).
_MIN_SCALE = np.float32(1e-12)


class Mode(str, enum.Enum):
    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


@dataclass(frozen=True)
class LevelRange:
    """Integer range [q_min, q_max] and the ONNX element type that holds it."""

    q_min: int
    q_max: int
    signed: bool


def weight_levels(bits: int = 8) -> LevelRange:
    """Weights: symmetric [-2^(b-1)+1, 2^(b-1)-1], e.g. [-127, 127] (Table 1)."""
    return LevelRange(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1, signed=True)


def activation_levels(bits: int = 8, *, signed: bool) -> LevelRange:
    """Activations: signed [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b - 1] (Table 1)."""
    if signed:
        return LevelRange(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, signed=True)
    return LevelRange(0, 2**bits - 1, signed=False)


@dataclass(frozen=True)
class QuantParams:
    """ONNX QuantizeLinear parameters: per-tensor (scalar arrays) or per-channel (1-D arrays along `axis`)."""

    scale: np.ndarray
    zero_point: np.ndarray
    levels: LevelRange
    axis: int | None = None


def symmetric_params(abs_max: np.ndarray, levels: LevelRange, axis: int | None = None) -> QuantParams:
    """Symmetric: zero-point 0, s = max|r| / q_max."""
    scale = np.maximum(np.asarray(abs_max, np.float32) / np.float32(levels.q_max), _MIN_SCALE).astype(np.float32)
    dtype = np.int8 if levels.signed else np.uint8
    return QuantParams(scale, np.zeros(scale.shape, dtype), levels, axis)


def align_zero_point(r_min: float, r_max: float, bits: int = 8) -> tuple[float, float]:
    """The paper's range tuning so that float zero lands exactly on an integer level.

    Widens [r_min, r_max] to contain zero, then moves one end so that -r_min / s is an integer, choosing the
    end whose move keeps the range narrower.
    """
    levels = 2**bits - 1
    low, high = min(float(r_min), 0.0), max(float(r_max), 0.0)
    if high - low <= 0.0:
        return 0.0, float(_MIN_SCALE) * levels
    zp = np.floor(-low * levels / (high - low))
    if zp in (0, levels):
        return low, high
    t = (zp - levels) / zp
    high_2 = t * low
    low_2 = high / t
    if high_2 - low > high - low_2:
        return low, high_2
    return low_2, high


def asymmetric_params(r_min: float, r_max: float, bits: int = 8) -> QuantParams:
    """Asymmetric uint8 parameters over the aligned range: s = (r_max - r_min) / (2^b - 1), z = -r_min / s."""
    low, high = align_zero_point(r_min, r_max, bits)
    levels = activation_levels(bits, signed=False)
    scale = np.float32(max((high - low) / levels.q_max, float(_MIN_SCALE)))
    zero_point = np.clip(np.round(-low / scale), levels.q_min, levels.q_max)
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, np.uint8), levels)


def activation_params(r_min: float, r_max: float, mode: Mode, bits: int = 8) -> QuantParams:
    """Parameters for an activation range: symmetric picks signed or unsigned levels by the sign of r_min."""
    return unified_activation_params([(r_min, r_max)], mode, bits)[0]


def unified_activation_params(ranges: list[tuple[float, float]], mode: Mode, bits: int = 8) -> list[QuantParams]:
    """Parameters for tensors that must share one scale (Concat, residual Add), one entry per range.

    Asymmetric: one aligned range, hence one step, for all; a member whose own range does not go below zero
    (a ReLU output) keeps zero-point 0 on that step. Symmetric: one step size from the joint range; each tensor
    keeps signed (int8) levels only if its own range goes below zero. Either way a ReLU output
    stays unsigned, which lets ONNX Runtime fold the ReLU into the integer kernel before it.
    """
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if mode is Mode.ASYMMETRIC:
        shared = asymmetric_params(low, high, bits)
        unsigned = QuantParams(shared.scale, np.zeros((), np.uint8), shared.levels)
        return [unsigned if r_min >= 0 else shared for r_min, _ in ranges]
    group_signed = low < 0
    levels = activation_levels(bits, signed=group_signed)
    abs_max = max(abs(low), abs(high)) if group_signed else high
    scale = np.maximum(np.float32(abs_max) / np.float32(levels.q_max), _MIN_SCALE).astype(np.float32)
    params = []
    for r_min, _ in ranges:
        signed = r_min < 0
        zero_point = np.zeros((), np.int8 if signed else np.uint8)
        params.append(QuantParams(scale, zero_point, activation_levels(bits, signed=signed)))
    return params


#: The largest sum of two same-sign weight levels whose products with u8 activations (up to 255) fit in int16:
#: 255 · 128 = 32640 ≤ 32767. Kernels that add products in pairs (`op_table.int16_pair_accumulation`) stay exact
#: when every output channel keeps its two largest positive and its two largest negative levels within it.
INT16_PAIR_BUDGET = 32767 // 255


def quantize_weight(weight: np.ndarray, axis: int, bits: int = 8, *, pair_budget: int | None = None,
                    pair_order: tuple[int, ...] | None = None) -> tuple[np.ndarray, QuantParams]:
    """Per-channel symmetric weight quantization along `axis`; returns the integer tensor and its parameters.

    With `pair_budget`, no two weight levels that an integer kernel adds up in one int16 may exceed the budget
    (same sign). `pair_order` names the kernel's pairs: the other axes of `weight` in the order it adds up the
    products, neighbours (2i, 2i + 1) of that flattened order forming a pair (`op_table.int16_pair_order`). A
    channel whose pairs fit keeps the full-range step; another gets the step that just fits its largest pair.
    Without `pair_order` any two weights of a channel may be paired, and such a channel gets levels within
    ±budget/2.
    """
    axis = axis % weight.ndim
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    abs_max = np.abs(weight).max(axis=reduce_axes) if reduce_axes else np.abs(weight)
    levels = weight_levels(bits)
    params = symmetric_params(abs_max, levels, axis=axis)
    if pair_budget is not None and 2 * levels.q_max > pair_budget:
        if pair_order is None:
            params = _fit_any_pair(weight, axis, params, pair_budget)
        else:
            params = _fit_kernel_pairs(weight, axis, pair_order, params, pair_budget)
    return _round_to_levels(weight, params), params


def _round_to_levels(weight: np.ndarray, params: QuantParams) -> np.ndarray:
    shape = [1] * weight.ndim
    shape[params.axis] = -1
    q = np.clip(np.round(weight / params.scale.reshape(shape)), params.levels.q_min, params.levels.q_max)
    return q.astype(np.int8)


def top_pairs(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel along `axis`: the two largest positive values and the two largest magnitudes of negative
    values (zero where a channel has fewer), each as an array [channels, 2] in descending order."""
    rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    return _top_two(np.maximum(rows, 0)), _top_two(np.maximum(-rows, 0))


def _top_two(rows: np.ndarray) -> np.ndarray:
    """The two largest values of each row (of a private, non-negative copy, which it edits): argmax and two maxima
    instead of a partition, several times faster on large weights."""
    channels = np.arange(rows.shape[0])
    first = rows.argmax(axis=1)
    top = rows[channels, first]
    rows[channels, first] = 0
    second = rows.max(axis=1) if rows.shape[1] > 1 else np.zeros_like(top)
    return np.stack([top, second], axis=1)


def top_pair_sums(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel along `axis`: the sum of the two largest positive values and of the two largest magnitudes of
    negative values."""
    positive, negative = top_pairs(values, axis)
    return positive.sum(axis=1), negative.sum(axis=1)


def _fit_any_pair(weight: np.ndarray, axis: int, params: QuantParams, budget: int) -> QuantParams:
    """Channels whose two largest same-sign levels fit within `budget` keep their full-range step; the others get
    levels within ±budget/2 (twice the step), so that no two of them add up to more, whatever the pairing."""
    positive, negative = top_pairs(weight.astype(np.float32, copy=False), axis)

    def rounded_pair(values: np.ndarray) -> np.ndarray:
        # Rounding is monotonic, so the rounded top pair is the rounded pair of top values.
        return np.minimum(np.round(values / params.scale[:, None]), params.levels.q_max).sum(axis=1)

    fits = np.maximum(rounded_pair(positive), rounded_pair(negative)) <= budget
    # The full-range step covers the channel's largest weight on q_max levels; budget/2 levels take it as well.
    half = (params.scale * np.float32(params.levels.q_max / (budget // 2))).astype(np.float32)
    return QuantParams(np.where(fits, params.scale, half).astype(np.float32), params.zero_point, params.levels, axis)


def kernel_pairs(values: np.ndarray, axis: int, order: tuple[int, ...]) -> np.ndarray:
    """`values` as [channels, pairs, 2]: the neighbours (2i, 2i + 1) of each channel in the kernel's order, the
    last one completed with a zero when a channel holds an odd number of weights."""
    rows = np.transpose(values, (axis, *order)).reshape(values.shape[axis], -1)
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), rows.dtype)], axis=1)
    return rows.reshape(rows.shape[0], -1, 2)


def largest_pair_sums(values: np.ndarray, axis: int, order: tuple[int, ...]) -> np.ndarray:
    """Per channel, the largest sum of a kernel pair's same-sign magnitudes (positive parts, or negative ones)."""
    pairs = kernel_pairs(values, axis, order)
    # Reductions of contiguous copies only: under qemu's AVX2 emulation NumPy reduces strided views wrongly.
    positive = np.maximum(pairs, 0).sum(axis=2).max(axis=1)
    negative = np.maximum(-pairs, 0).sum(axis=2).max(axis=1)
    return np.maximum(positive, negative)


def _fit_kernel_pairs(weight: np.ndarray, axis: int, order: tuple[int, ...], params: QuantParams,
                      budget: int) -> QuantParams:
    """The full-range step, or, where a channel's largest kernel pair needs it, the step that fits that pair on
    budget − 1 levels (rounding two weights adds at most one level)."""
    pair = largest_pair_sums(weight.astype(np.float32, copy=False), axis, order)
    tight = np.maximum(params.scale, (pair / np.float32(budget - 1)).astype(np.float32))
    return QuantParams(tight, params.zero_point, params.levels, axis)


def fake_quantize(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """Quantize then dequantize, exactly as QuantizeLinear → DequantizeLinear compute it."""
    shape = [1] * values.ndim
    if params.axis is not None:
        shape[params.axis] = -1
    scale = params.scale.reshape(shape) if params.axis is not None else params.scale
    zero = params.zero_point.astype(np.float32)
    zero = zero.reshape(shape) if params.axis is not None else zero
    stored = np.iinfo(params.zero_point.dtype)
    q = np.clip(np.round(values / scale) + zero, stored.min, stored.max)
    return ((q - zero) * scale).astype(np.float32)
