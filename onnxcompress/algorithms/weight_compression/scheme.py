"""The arithmetic of weight-only compression: the levels, scales and zero-points of one 2-D table.

A table comes oriented as [channels, K]: one row per output channel (an embedding's row), K the reduction axis
(an embedding's features); the planner orients it and back. Values are quantized in blocks of `block` values along
K (`block == K`: one scale per channel):

    symmetric:  s = clip · w* / low,                          q = clamp(round(w / s), low, high),   w ≈ s · q
    asymmetric: s = clip · (max w − min w) / (high − low),    z = clamp(round(−clip · min w / s)),  w ≈ s · (q − z)

where w* is the block's value of largest magnitude, with its sign: it maps exactly onto the wider end of the grid
(−8 of −8..7; the scale is negative when w* is positive), so every level is used, as ONNX Runtime's own blockwise
quantizer does. `clip` is 1 (round to nearest, data-free) unless an importance hₖ per input feature is given (E[xₖ²]
of the activation the table multiplies). Then each block minimises E = Σₖ hₖ (wₖ − ŵₖ)², the output error it adds
when features are uncorrelated, in two steps:

    clipping search:   the clipping factor from `CLIP_GRID` with the smallest E (AWQ's clipping search)
    scale estimation:  `REFITS` times, the scale that minimises E for the levels held fixed,
                       s = Σ h w (q − z) / Σ h (q − z)², then the levels re-rounded on it; each step is kept
                       only where it lowers E
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from onnxcompress.config import WeightMode


@dataclass(frozen=True)
class Levels:
    """The integer grid of one mode."""

    dtype: type
    low: int
    high: int
    symmetric: bool


LEVELS: dict[WeightMode, Levels] = {
    WeightMode.INT8: Levels(np.int8, -128, 127, symmetric=True),
    WeightMode.INT4_SYM: Levels(ml_dtypes.int4, -8, 7, symmetric=True),
    WeightMode.INT4_ASYM: Levels(ml_dtypes.uint4, 0, 15, symmetric=False),
}

#: Clipping factors the data-aware search tries on each block's range (1 is round-to-nearest).
CLIP_GRID = np.linspace(1.0, 0.5, 11, dtype=np.float32)

#: Least-squares scale refits after the clipping search (each: refit the scale, re-round the levels).
REFITS = 2

#: Values compressed at once: bounds the temporary float arrays of a large table to ~16 MB each.
_CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class Compressed:
    """One oriented table: `levels` [channels, K], `scale` and `zero_point` [channels, K / block]."""

    levels: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    block: int
    #: ‖W − Ŵ‖² / ‖W‖², weighted per input feature by the importance when one was given.
    relative_error: float

    def dequantized(self) -> np.ndarray:
        levels = self.levels.astype(np.float32).reshape(self.scale.shape[0], self.scale.shape[1], self.block)
        if self.zero_point is not None:
            levels -= self.zero_point.astype(np.float32)[..., None]
        return (levels * self.scale[..., None]).reshape(self.levels.shape)


def compress_table(table: np.ndarray, mode: WeightMode, block: int, importance: np.ndarray | None = None
                   ) -> Compressed:
    """Quantize the oriented `table` [channels, K] in blocks of `block` values (which must divide K);
    `importance` [K] weighs each input feature's error and turns on the clipping search."""
    channels, k = table.shape
    if k % block:
        raise ValueError(f"block {block} does not divide the reduction axis ({k})")
    levels = LEVELS[mode]
    weights = None if importance is None else np.asarray(importance, np.float32).reshape(k // block, block)
    rows = max(1, _CHUNK_VALUES // max(k, 1))
    parts = [_compress_rows(np.ascontiguousarray(table[start:start + rows], np.float32), levels, block, weights)
             for start in range(0, channels, rows)]
    error = sum(p[3] for p in parts)
    reference = sum(p[4] for p in parts)
    return Compressed(
        levels=np.concatenate([p[0] for p in parts]), scale=np.concatenate([p[1] for p in parts]),
        zero_point=None if levels.symmetric else np.concatenate([p[2] for p in parts]), block=block,
        relative_error=float(error / reference) if reference > 0 else 0.0)


def rounding_error(table: np.ndarray, mode: WeightMode, block: int, importance: np.ndarray) -> float:
    """Σₖ importanceₖ (wₖ − ŵₖ)² of the oriented `table` [channels, K] rounded to nearest in blocks of `block`
    (no clipping search): what activation-aware scaling compares its candidate scales by."""
    channels, k = table.shape
    levels = LEVELS[mode]
    weighting = np.asarray(importance, np.float32).reshape(1, k // block, block)
    rows, total = max(1, _CHUNK_VALUES // max(k, 1)), 0.0
    for start in range(0, channels, rows):
        blocks = np.ascontiguousarray(table[start:start + rows], np.float32).reshape(-1, k // block, block)
        q, scale, zero = _quantize(blocks, _ranges(blocks, levels), levels, 1.0)
        total += float((weighting * (blocks - _dequantize(q, scale, zero)) ** 2).sum(dtype=np.float64))
    return total


def _compress_rows(rows: np.ndarray, levels: Levels, block: int, weights: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Levels, scales, zero-points, weighted squared error and weighted squared norm of some rows."""
    blocks = rows.reshape(rows.shape[0], -1, block)
    weighting = np.ones((1, 1, block), np.float32) if weights is None else weights[None]
    ranges = _ranges(blocks, levels)
    clip = np.float32(1.0)
    if weights is not None:  # each block's clipping factor with the least error, the first of equals
        errors = [(weighting * (blocks - _dequantize(*_quantize(blocks, ranges, levels, c))) ** 2).sum(axis=-1)
                  for c in CLIP_GRID]
        clip = CLIP_GRID[np.argmin(np.stack(errors), axis=0)]
    q, scale, zero = _quantize(blocks, ranges, levels, clip)
    best = [q, scale, zero, (weighting * (blocks - _dequantize(q, scale, zero)) ** 2).sum(axis=-1)]
    if weights is not None:
        for _ in range(REFITS):
            _refit(blocks, levels, weighting, best)
    q, scale, zero, error = best
    return (q.reshape(rows.shape).astype(levels.dtype), scale.astype(np.float32), zero.astype(levels.dtype),
            float(error.sum(dtype=np.float64)), float((weighting * blocks ** 2).sum(dtype=np.float64)))


def _keep_better(best: list[np.ndarray], q: np.ndarray, scale: np.ndarray, zero: np.ndarray, error: np.ndarray
                 ) -> None:
    """Replace, block by block, the levels, scale and zero-point in `best` where `error` is lower."""
    better = error < best[3]
    best[0] = np.where(better[..., None], q, best[0])
    best[1] = np.where(better, scale, best[1])
    best[2] = np.where(better, zero, best[2])
    best[3] = np.minimum(error, best[3])


def _refit(blocks: np.ndarray, levels: Levels, weighting: np.ndarray, best: list[np.ndarray]) -> None:
    """One scale-estimation step on `best`: the weighted least-squares scale for its levels (zero-points held),
    then the levels re-rounded on that scale; each candidate replaces a block's values where its error is lower."""
    q, _, zero, _ = best
    offsets = q - zero[..., None]
    energy = (weighting * offsets ** 2).sum(axis=-1)
    fitted = (weighting * blocks * offsets).sum(axis=-1) / np.where(energy > 0, energy, 1.0)
    scale = np.where((energy > 0) & (fitted != 0), fitted, best[1]).astype(np.float32)
    for levels_on_scale in (q, np.clip(np.round(blocks / scale[..., None]) + zero[..., None], levels.low, levels.high)):
        error = (weighting * (blocks - _dequantize(levels_on_scale, scale, zero)) ** 2).sum(axis=-1)
        _keep_better(best, levels_on_scale, scale, zero, error)


def _ranges(blocks: np.ndarray, levels: Levels) -> tuple[np.ndarray, ...]:
    """What each block's scale derives from: its value of largest magnitude (symmetric), or its min and max."""
    if levels.symmetric:
        return (np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0],)
    return blocks.min(axis=-1), blocks.max(axis=-1)


def _quantize(blocks: np.ndarray, ranges: tuple[np.ndarray, ...], levels: Levels, clip: np.ndarray | float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levels, scale and zero-point of each block at clipping factor `clip` (one, or one per block)."""
    if levels.symmetric:
        scale = clip * ranges[0] / levels.low
        zero = np.zeros_like(scale)
    else:
        low, high = clip * ranges[0], clip * ranges[1]
        scale = (high - low) / (levels.high - levels.low)
    scale = np.where(scale != 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale gives levels 0
    if not levels.symmetric:
        zero = np.clip(np.round(-low / scale), levels.low, levels.high)
    q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], levels.low, levels.high)
    return q, scale, zero


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return (q - zero[..., None]) * scale[..., None]
