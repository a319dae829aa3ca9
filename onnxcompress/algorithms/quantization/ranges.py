"""Turn collected statistics into a float range [r_min, r_max] for a quantizer, by the configured method.

- minmax: the extremes over all samples;
- mean_minmax: the mean over samples of each sample's extremes (robust to rare outliers);
- percentile: the given percentile of all values (and its mirror for the minimum), from a histogram;
- mse: the clipping range that minimises the expected quantize-dequantize error over the histogram.
"""

from __future__ import annotations

import enum

import numpy as np

from onnxcompress.algorithms.quantization.scheme import Mode, activation_params, fake_quantize
from onnxcompress.runtime.calibration import Histogram, Statistic, TensorStatistics


class RangeMethod(str, enum.Enum):
    MINMAX = "minmax"
    MEAN_MINMAX = "mean_minmax"
    PERCENTILE = "percentile"
    MSE = "mse"

    @property
    def statistic(self) -> Statistic:
        return Statistic.HISTOGRAM if self in (RangeMethod.PERCENTILE, RangeMethod.MSE) else Statistic.MIN_MAX


def estimate_range(stats: TensorStatistics, method: RangeMethod, *, mode: Mode, bits: int = 8,
                   percentile: float = 99.999) -> tuple[float, float]:
    if method is RangeMethod.MINMAX:
        return stats.min, stats.max
    if method is RangeMethod.MEAN_MINMAX:
        return stats.mean_min, stats.mean_max
    if method is RangeMethod.PERCENTILE:
        return _percentile_range(stats.histogram, percentile)
    return _mse_range(stats.histogram, mode, bits)


def _percentile_range(histogram: Histogram, percentile: float) -> tuple[float, float]:
    cumulative = np.cumsum(histogram.counts) / histogram.counts.sum()
    edges = histogram.edges
    low = edges[np.searchsorted(cumulative, 1.0 - percentile / 100.0)]
    high = edges[min(np.searchsorted(cumulative, percentile / 100.0) + 1, len(edges) - 1)]
    return float(min(low, 0.0) if histogram.low < 0 else max(low, 0.0)), float(high)


def _mse_range(histogram: Histogram, mode: Mode, bits: int) -> tuple[float, float]:
    edges = histogram.edges
    centers = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)
    weights = histogram.counts.astype(np.float64)
    occupied = np.nonzero(weights)[0]
    low, high = float(edges[occupied[0]]), float(edges[occupied[-1] + 1])
    best, best_error = (low, high), np.inf
    for shrink in np.linspace(0.2, 1.0, 81):
        candidate = (low * shrink, high * shrink)
        params = activation_params(*candidate, mode, bits)
        error = float(np.dot(weights, (fake_quantize(centers, params) - centers) ** 2))
        if error < best_error:
            best, best_error = candidate, error
    return best
