"""Whether a quantized file computes the same in ONNX Runtime on x86 CPUs without VNNI as on those with it.

Without VNNI, ONNX Runtime multiplies u8 activations by s8 weights with VPMADDUBSW, which adds each two
neighbouring products in int16 and saturates. A layer is exact there when the same-sign levels of every pair
the kernel forms add up to at most `INT16_PAIR_BUDGET` (255 · 128 fits in int16). Which ops run such kernels, and
which weights they pair, are op-table facts (`op_table.int16_pair_accumulation`, `op_table.int16_pair_order`);
where the pairing is not known, any two levels of a channel count as a pair. OpenVINO handles this inside its own
kernels and needs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.algorithms.quantization.scheme import INT16_PAIR_BUDGET, largest_pair_sums, top_pair_sums
from onnxcompress.transforms.op_table import int16_pair_accumulation, int16_pair_order, spec, weight_channel_axis


@dataclass(frozen=True)
class SaturationRisk:
    """A layer whose integer kernel can saturate on CPUs without VNNI: `channels` of `total` output channels hold a
    kernel pair of same-sign weight levels over the budget, the largest adding up to `worst_pair`."""

    node: str
    op: str
    channels: int
    total: int
    worst_pair: int


@dataclass(frozen=True)
class Portability:
    """`checked` layers run ONNX Runtime kernels that add products in int16 pairs; `risks` are those that can
    saturate."""

    checked: int
    risks: tuple[SaturationRisk, ...]

    @property
    def safe_without_vnni(self) -> bool:
        return not self.risks

    def describe(self) -> str:
        if not self.checked:
            return "safe on x86 CPUs without VNNI (no integer kernel that adds products in int16 pairs)"
        if self.safe_without_vnni:
            return (f"safe on x86 CPUs without VNNI ({self.checked} int16-pair kernels, every weight pair within "
                    f"{INT16_PAIR_BUDGET} levels)")
        worst = ", ".join(f"{r.node} ({r.channels}/{r.total} channels, pair {r.worst_pair})" for r in self.risks[:5])
        more = f" and {len(self.risks) - 5} more" if len(self.risks) > 5 else ""
        return (f"NOT safe on x86 CPUs without VNNI: {len(self.risks)} of {self.checked} layers can saturate in "
                f"ONNX Runtime ({worst}{more}); quantize with --target portable")


def check_portability(model: onnx.ModelProto) -> Portability:
    """Find the layers of `model` whose ONNX Runtime integer kernel can saturate on CPUs without VNNI."""
    graph = gs.import_onnx(model)
    checked, risks = 0, []
    for node in graph.nodes:
        weight = _int8_weight(node)
        if weight is None or not _reads_8bit_activation(node) or not int16_pair_accumulation(node, weight.shape):
            continue
        checked += 1
        # Kernels pair products within one output channel, whatever the granularity of the weight's scale.
        levels = weight.values.astype(np.int32)
        axis = weight_channel_axis(node) % levels.ndim
        order = int16_pair_order(node, levels.ndim)
        pair = np.maximum(*top_pair_sums(levels, axis)) if order is None else largest_pair_sums(levels, axis, order)
        over = int((pair > INT16_PAIR_BUDGET).sum())
        if over:
            risks.append(SaturationRisk(node.name, node.op, over, len(pair), int(pair.max())))
    return Portability(checked, tuple(risks))


def _int8_weight(node: gs.Node) -> gs.Constant | None:
    """The int8 initializer that a DequantizeLinear turns into `node`'s weight, if any."""
    port = spec(node).weight_port
    if port is None or port >= len(node.inputs) or not node.inputs[port].inputs:
        return None
    producer = node.inputs[port].inputs[0]
    levels = producer.inputs[0] if producer.op == "DequantizeLinear" and producer.inputs else None
    if not isinstance(levels, gs.Constant) or levels.values.dtype != np.int8:
        return None
    return levels


def _reads_8bit_activation(node: gs.Node) -> bool:
    """Whether `node`'s activation input is dequantized from 8-bit levels (else ONNX Runtime runs it in float)."""
    source = node.inputs[0] if node.inputs else None
    producer = source.inputs[0] if source is not None and source.inputs else None
    return producer is not None and producer.op == "DequantizeLinear" and not isinstance(producer.inputs[0],
                                                                                          gs.Constant)
