"""Which weights sparsity masks, and the masks that zero the least important fraction of them.

Both fine-tuned and one-shot magnitude sparsity choose the zeros here. A level is met exactly: ⌊level · n⌉ weights
(of each layer, or of all masked layers together with a global threshold) are zeroed, ties broken by position, so
the measured sparsity of an exported model equals the reported level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.config import SparsityImportance, SparsityThreshold
from onnxcompress.errors import SparsityError
from onnxcompress.transforms.op_table import constant_weight, spec


@dataclass(frozen=True)
class SparsityTarget:
    """A weight sparsity masks: constant input `port` of `node`, the constant named `weight`."""

    node: str
    port: int
    weight: str
    size: int

    @property
    def mask(self) -> str:
        """Name of the mask parameter (node names are unique, and a node has one weight)."""
        return f"{self.node}.weight_mask"


def sparsity_targets(graph: gs.Graph, ignored: frozenset[str]) -> list[SparsityTarget]:
    """The float weights (two or more axes) of the ops the op table marks `sparsify_weight`, outside `ignored`."""
    targets = []
    for node in graph.nodes:
        weight = constant_weight(node)
        if not spec(node).sparsify_weight or node.name in ignored or weight is None:
            continue
        if weight.values.dtype == np.float32 and weight.values.ndim >= 2:
            targets.append(SparsityTarget(node.name, spec(node).weight_port, weight.name, int(weight.values.size)))
    if not targets:
        raise SparsityError("the model has no weight sparsity can mask (float Conv, ConvTranspose, Gemm or MatMul "
                            "weights outside the ignored scope)")
    return targets


def importance(weight: np.ndarray, kind: SparsityImportance) -> np.ndarray:
    """|w|, or |w| / ‖W‖₂ (normed_abs), flattened."""
    magnitude = np.abs(weight, dtype=np.float32).reshape(-1)
    if kind is SparsityImportance.NORMED_ABS:
        norm = np.linalg.norm(magnitude)
        return magnitude / norm if norm > 0 else magnitude
    return magnitude


def compute_masks(targets: list[SparsityTarget], weights: Mapping[str, np.ndarray], level: float,
                  kind: SparsityImportance, threshold: SparsityThreshold,
                  alive: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Masks (by mask name, float32 0/1 shaped like the weight) zeroing the `level` fraction of least important
    weights; `weights` maps each target's weight name to its current values. With `alive` (see `alive_elements`),
    the level counts only the live elements, and the others are zeroed as well."""
    live = [_live(t.mask, weights[t.weight].shape, alive) for t in targets]
    # Dead elements score below every live one (importance ≥ 0): they are zeroed on top of the level.
    scores = [np.where(flat, importance(weights[t.weight] * flat.reshape(weights[t.weight].shape), kind), -1.0)
              for t, flat in zip(targets, live)]
    if threshold is SparsityThreshold.GLOBAL:
        flat_masks = np.split(_keep(np.concatenate(scores), np.concatenate(live), level),
                              np.cumsum([s.size for s in scores])[:-1])
    else:
        flat_masks = [_keep(score, flat, level) for score, flat in zip(scores, live)]
    return {t.mask: flat.reshape(weights[t.weight].shape).astype(np.float32) for t, flat in zip(targets, flat_masks)}


def alive_elements(targets: list[SparsityTarget], surviving: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """By mask name, the elements of each target's weight that survive the stack's earlier algorithms
    (`surviving`: boolean masks by weight name); targets whose weight survives whole are left out."""
    return {t.mask: surviving[t.weight] for t in targets if t.weight in surviving}


def _live(mask: str, shape: tuple[int, ...], alive: Mapping[str, np.ndarray] | None) -> np.ndarray:
    flat = (alive or {}).get(mask)
    return np.ones(int(np.prod(shape)), bool) if flat is None else np.broadcast_to(flat, shape).reshape(-1)


def _keep(scores: np.ndarray, live: np.ndarray, level: float) -> np.ndarray:
    """Boolean array, False where not `live` and at the round(level · live count) smallest live scores."""
    count = int(np.count_nonzero(live))
    zeros = live.size - count + int(round(level * count))
    keep = np.ones(scores.size, bool)
    if zeros:
        keep[np.argsort(scores, kind="stable")[:zeros]] = False
    return keep


def sparsity(masks: Mapping[str, np.ndarray], alive: Mapping[str, np.ndarray] | None = None) -> float:
    """The fraction of zeros over all `masks`, counting only their `alive` elements (see `alive_elements`)."""
    total = zeros = 0
    for name, mask in masks.items():
        live = _live(name, mask.shape, alive)
        total += int(np.count_nonzero(live))
        zeros += int(np.count_nonzero(live & (mask.reshape(-1) == 0)))
    return zeros / total if total else 0.0
