"""Which channels each prunable group keeps, for a target fraction of filters or of MACs.

filters: every group loses the same fraction of its channels, the least important first (ties: the later
channel goes first), and keeps at least `min_width` (all of them when it has fewer); a group that grouped
convolutions split into equal runs loses as many channels in each run.
flops: the fraction of filters is searched (bisection) for the smallest one that removes the target fraction of
the model's MACs; a target beyond what pruning every group to `min_width` removes is an error that says what can
be reached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onnxcompress.algorithms.pruning.channels import ChannelAnalysis
from onnxcompress.algorithms.pruning.macs import LayerCost
from onnxcompress.errors import PruningError

#: Bisection steps of the flops search: the fraction is found to 2⁻²⁰.
_SEARCH_STEPS = 20


def keep_for_fraction(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray], fraction: float,
                      min_width: int) -> dict[int, np.ndarray]:
    """Kept channels per space (sorted) when each group in `importance` (by group index) loses `fraction`."""
    keep: dict[int, np.ndarray] = {}
    for index, scores in importance.items():
        group = analysis.groups[index]
        kept = max(group.channels - int(np.floor(fraction * group.channels)), min(group.channels, min_width))
        runs = group.partitions
        per_run, size = -(-kept // runs), group.channels // runs
        channels = []
        for run in range(runs):
            # Most important first; equal scores: the earlier channel stays.
            order = np.argsort(-scores[run * size:(run + 1) * size], kind="stable")
            channels.append(run * size + order[:per_run])
        keep.update({space: np.sort(np.concatenate(channels)) for space in group.spaces})
    return keep


def total_macs(costs: Sequence[LayerCost], keep: dict[int, np.ndarray] | None = None) -> int:
    return sum(cost.macs(keep) for cost in costs)


def keep_for_macs(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray], costs: Sequence[LayerCost],
                  target: float, min_width: int) -> tuple[dict[int, np.ndarray], float]:
    """Kept channels for the smallest uniform fraction of filters that removes `target` of the MACs, and that
    fraction."""
    before = total_macs(costs)

    def reduction(keep: dict[int, np.ndarray]) -> float:
        return 1 - total_macs(costs, keep) / before

    widest = keep_for_fraction(analysis, importance, 1.0, min_width)
    if reduction(widest) < target:
        raise PruningError(f"a {target:.0%} MAC reduction cannot be reached: pruning every prunable group to "
                           f"{min_width} channels removes {reduction(widest):.1%} of the MACs")
    low, high = 0.0, 1.0
    for _ in range(_SEARCH_STEPS):
        middle = (low + high) / 2
        if reduction(keep_for_fraction(analysis, importance, middle, min_width)) >= target:
            high = middle
        else:
            low = middle
    return keep_for_fraction(analysis, importance, high, min_width), high
