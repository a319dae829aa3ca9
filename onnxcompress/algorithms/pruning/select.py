"""Which channels each prunable group keeps, for a target fraction of filters or of MACs.

Ranking `uniform`: every group loses the same fraction of its channels, the least important first (ties: the
later channel goes first). Ranking `global`: channels compete across groups by their importance divided by their
group's mean importance (criteria scale with filter size, so raw scores do not compare across layers); every
channel below one threshold goes. Either way a group keeps at least `min_width` channels (all, if it has fewer),
rounded up to a multiple of `channel_multiple`; a group that grouped convolutions split into equal runs loses as
many channels in each run; after a channel shuffle, channels go by orbits (the same index in every run: the
shuffle then keeps their order), as many from each block a grouped convolution reads.

One strength in [0, 1] drives both rankings (the fraction, or the threshold as a share of the largest normalized
score), and the smallest strength that meets the target is searched by bisection: for `filters` targets under
global ranking, the share of all filters removed; for `flops`, the share of the model's MACs, after which groups
get width steps back while the target still holds. A target beyond what pruning every group to `min_width`
removes is an error that says what can be reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxcompress.algorithms.pruning.channels import ChannelAnalysis
from onnxcompress.algorithms.pruning.macs import LayerCost
from onnxcompress.config import PruningRanking, PruningTargetKind
from onnxcompress.errors import PruningError

#: Kept channels (sorted indices) per channel space.
Keep = dict[int, np.ndarray]
#: Bisection steps of the strength search: it is found to 2⁻²⁰.
_SEARCH_STEPS = 20


@dataclass(frozen=True)
class Widths:
    """How narrow a pruned group may get: at least `minimum` channels (all, if it has fewer), a multiple of
    `multiple` (kernels run full SIMD lanes) unless that would keep them all."""

    minimum: int
    multiple: int = 1

    def kept(self, channels: int, fraction: float) -> int:
        return self.allowed(channels, channels - int(np.floor(fraction * channels)))

    def allowed(self, channels: int, kept: int) -> int:
        """The width a group of `channels` keeps when `kept` of them are wanted."""
        kept = max(kept, min(channels, self.minimum))
        return min(channels, -(-kept // self.multiple) * self.multiple)


def select_channels(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray], costs: Sequence[LayerCost],
                    target: float, kind: PruningTargetKind, ranking: PruningRanking,
                    widths: Widths) -> tuple[Keep, float]:
    """Kept channels per space for `target` of `kind`, and the strength that gives them (the fraction of filters
    under uniform ranking)."""
    prune = _pruner(analysis, importance, ranking, widths)
    if kind is PruningTargetKind.FLOPS:
        before = total_macs(costs)

        def macs_removed(keep: Keep) -> float:
            return 1 - total_macs(costs, keep) / before

        keep, strength = _weakest(prune, macs_removed, target, "MAC", widths)
        return _widen_back(analysis, importance, keep, widths, lambda k: macs_removed(k) >= target), strength
    if ranking is PruningRanking.UNIFORM:
        return prune(target), target
    channels = sum(analysis.groups[i].channels for i in importance)

    def filters_removed(keep: Keep) -> float:
        return 1 - sum(len(keep[analysis.groups[i].spaces[0]]) for i in importance) / channels

    return _weakest(prune, filters_removed, target, "filter", widths)


def _pruner(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray], ranking: PruningRanking,
            widths: Widths) -> Callable[[float], Keep]:
    """Kept channels as a function of the strength (0 keeps everything, 1 prunes every group to its minimum)."""
    if ranking is PruningRanking.UNIFORM:
        return lambda strength: keep_for_fraction(analysis, importance, strength, widths)
    normalized = {i: scores / (scores.mean() or 1.0) for i, scores in importance.items()}
    top = max(float(scores.max()) for scores in normalized.values())

    def prune(strength: float) -> Keep:
        if strength >= 1.0:  # everything below the largest score: every group at its minimum
            return keep_for_fraction(analysis, importance, 1.0, widths)
        counts = {i: widths.allowed(analysis.groups[i].channels, int(np.count_nonzero(scores >= strength * top)))
                  for i, scores in normalized.items()}
        return keep_for_counts(analysis, importance, counts)
    return prune


def _weakest(prune: Callable[[float], Keep], removed: Callable[[Keep], float], target: float, what: str,
             widths: Widths) -> tuple[Keep, float]:
    """The kept channels of the smallest strength that removes at least `target` (bisection)."""
    strongest = prune(1.0)
    if removed(strongest) < target:
        raise PruningError(f"a {target:.0%} {what} reduction cannot be reached: pruning every prunable group to "
                           f"{widths.minimum} channels removes {removed(strongest):.1%} of the {what}s")
    low, high = 0.0, 1.0
    for _ in range(_SEARCH_STEPS):
        middle = (low + high) / 2
        if removed(prune(middle)) >= target:
            high = middle
        else:
            low = middle
    return prune(high), high


def keep_for_fraction(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray], fraction: float,
                      widths: Widths) -> Keep:
    """Kept channels per space (sorted) when each group in `importance` (by group index) loses `fraction`."""
    counts = {index: widths.kept(analysis.groups[index].channels, fraction) for index in importance}
    return keep_for_counts(analysis, importance, counts)


def keep_for_counts(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray],
                    counts: Mapping[int, int]) -> Keep:
    """Kept channels per space (sorted) when group `index` keeps at least `counts[index]` channels, the most
    important, as its grouped convolutions and shuffles allow."""
    keep: Keep = {}
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


def total_macs(costs: Sequence[LayerCost], keep: Keep | None = None) -> int:
    return sum(cost.macs(keep) for cost in costs)


def _widen_back(analysis: ChannelAnalysis, importance: Mapping[int, np.ndarray], keep: Keep,
                widths: Widths, enough: Callable[[Keep], bool]) -> Keep:
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
