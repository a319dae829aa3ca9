"""Which channels each prunable group keeps, for a target fraction of filters or of MACs.

filters: every group loses the same fraction of its channels, the least important first (ties: the later
channel goes first), and keeps at least `min_width` (all of them when it has fewer), rounded up to a multiple of
`channel_multiple`; a group that grouped
convolutions split into equal runs loses as many channels in each run; after a channel shuffle, channels go by
orbits (the same index in every run: the shuffle then keeps their order), as many from each block a grouped
convolution reads.
flops: the fraction of filters is searched (bisection) for the smallest one that removes the target fraction of
the model's MACs, then groups get width steps back while the target still holds; a target beyond what pruning every group to `min_width` removes is an error that says what can
be reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxcompress.algorithms.pruning.channels import ChannelAnalysis
from onnxcompress.algorithms.pruning.macs import LayerCost
from onnxcompress.errors import PruningError

#: Bisection steps of the flops search: the fraction is found to 2⁻²⁰.
_SEARCH_STEPS = 20


@dataclass(frozen=True)
class Widths:
    """How narrow a pruned group may get: at least `minimum` channels (all, if it has fewer), a multiple of
    `multiple` (kernels run full SIMD lanes) unless that would keep them all."""

    minimum: int
    multiple: int = 1

    def kept(self, channels: int, fraction: float) -> int:
        kept = max(channels - int(np.floor(fraction * channels)), min(channels, self.minimum))
        return min(channels, -(-kept // self.multiple) * self.multiple)


def keep_for_fraction(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray], fraction: float,
                      widths: Widths) -> dict[int, np.ndarray]:
    """Kept channels per space (sorted) when each group in `importance` (by group index) loses `fraction`."""
    counts = {index: widths.kept(analysis.groups[index].channels, fraction) for index in importance}
    return keep_for_counts(analysis, importance, counts)


def keep_for_counts(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray],
                    counts: Mapping[int, int]) -> dict[int, np.ndarray]:
    """Kept channels per space (sorted) when group `index` keeps at least `counts[index]` channels, the most
    important, as its grouped convolutions and shuffles allow."""
    keep: dict[int, np.ndarray] = {}
    for index, scores in importance.items():
        group = analysis.groups[index]
        kept = counts[index]
        if group.orbits is not None:
            channels = _kept_orbits(scores, group.orbits, group.shuffled, kept)
        elif group.shuffled is not None:
            channels = _kept_per_run(scores[np.argsort(group.shuffled, kind="stable")], int(group.shuffled.max()) + 1,
                                     kept)
            channels = np.sort(np.argsort(group.shuffled, kind="stable")[channels])
        else:
            channels = _kept_per_run(scores, group.partitions, kept)
        keep.update({space: channels for space in group.spaces})
    return keep


def _kept_per_run(scores: np.ndarray, runs: int, kept: int) -> np.ndarray:
    """The most important channels, as many in each of `runs` equal runs (at least `kept` in all)."""
    per_run, size = -(-kept // runs), len(scores) // runs
    channels = []
    for run in range(runs):
        # Most important first; equal scores: the earlier channel stays.
        order = np.argsort(-scores[run * size:(run + 1) * size], kind="stable")
        channels.append(run * size + order[:per_run])
    return np.sort(np.concatenate(channels))


def _kept_orbits(scores: np.ndarray, orbits: np.ndarray, blocks: np.ndarray | None, kept: int) -> np.ndarray:
    """Channels of the most important orbits (summed importance), at least `kept` channels, as many orbits in each
    shuffled block."""
    count = int(orbits.max()) + 1
    orbit_scores = np.bincount(orbits, weights=scores, minlength=count)
    orbit_blocks = np.zeros(count, np.int64)
    if blocks is not None:
        orbit_blocks[orbits] = blocks
    kept_orbits = -(-kept // (len(scores) // count))
    block_count = int(orbit_blocks.max()) + 1
    per_block = -(-kept_orbits // block_count)
    chosen = [np.flatnonzero(orbit_blocks == b)[np.argsort(-orbit_scores[orbit_blocks == b], kind="stable")
                                                [:per_block]] for b in range(block_count)]
    return np.flatnonzero(np.isin(orbits, np.concatenate(chosen)))


def total_macs(costs: Sequence[LayerCost], keep: dict[int, np.ndarray] | None = None) -> int:
    return sum(cost.macs(keep) for cost in costs)


def keep_for_macs(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray], costs: Sequence[LayerCost],
                  target: float, widths: Widths) -> tuple[dict[int, np.ndarray], float]:
    """Kept channels for the smallest uniform fraction of filters that removes `target` of the MACs, and that
    fraction."""
    before = total_macs(costs)

    def reduction(keep: dict[int, np.ndarray]) -> float:
        return 1 - total_macs(costs, keep) / before

    widest = keep_for_fraction(analysis, importance, 1.0, widths)
    if reduction(widest) < target:
        raise PruningError(f"a {target:.0%} MAC reduction cannot be reached: pruning every prunable group to "
                           f"{widths.minimum} channels removes {reduction(widest):.1%} of the MACs")
    low, high = 0.0, 1.0
    for _ in range(_SEARCH_STEPS):
        middle = (low + high) / 2
        if reduction(keep_for_fraction(analysis, importance, middle, widths)) >= target:
            high = middle
        else:
            low = middle
    keep = keep_for_fraction(analysis, importance, high, widths)
    return _widen_back(analysis, importance, keep, widths, lambda k: reduction(k) >= target), high


def _widen_back(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray], keep: dict[int, np.ndarray],
                widths: Widths, enough: Callable[[dict[int, np.ndarray]], bool]) -> dict[int, np.ndarray]:
    """Give channels back, one width step of one group at a time (the narrowest groups first), while the target
    still holds: a uniform fraction overshoots when widths move in steps of `widths.multiple`."""
    counts = {index: len(keep[analysis.groups[index].spaces[0]]) for index in importance}
    order = sorted(counts, key=lambda index: counts[index] / analysis.groups[index].channels)
    for index in order:
        group = analysis.groups[index]
        step = math.lcm(widths.multiple, group.partitions, group.channels // (int(group.orbits.max()) + 1)
                        if group.orbits is not None else 1)
        while counts[index] + step <= group.channels:
            wider = keep_for_counts(analysis, importance, {**counts, index: counts[index] + step})
            if not enough(wider):
                break
            counts[index] += step
            keep = wider
    return keep
