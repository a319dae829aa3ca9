"""Builder of a pre-LayerNorm transformer encoder block in plain ONNX (random weights, fixed seed).

    x → LayerNorm → Q, K, V projections (MatMul + bias) → split heads → softmax(Q·Kᵀ/√d)·V → merge heads
      → output projection → + x → LayerNorm → MatMul → GELU (erf form) → MatMul → + residual → logits

Input "tokens" [N, S, D] with symbolic batch and sequence length, output "hidden" [N, S, D]. Used by the tests
and benchmarks to exercise transformer-aware quantization (MatMul between activations, LayerNorm, Softmax).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_transformer_block(dim: int = 64, heads: int = 4, hidden: int = 128, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    head_dim = dim // heads
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name: str, rows: int, cols: int) -> str:
        return const(name, rng.normal(0, 1 / np.sqrt(rows), (rows, cols)).astype(np.float32))

    def bias(name: str, size: int) -> str:
        return const(name, rng.normal(0, 0.02, size).astype(np.float32))

    nodes = [
        helper.make_node("LayerNormalization", ["tokens", const("ln1.g", np.ones(dim, np.float32)),
                                                const("ln1.b", np.zeros(dim, np.float32))], ["ln1"], axis=-1,
                         name="ln1"),
    ]
    split_shape = const("split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, dim], np.int64))
    for part in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["ln1", weight(f"w{part}", dim, dim)], [f"{part}_mm"], name=f"{part}_proj"),
            helper.make_node("Add", [f"{part}_mm", bias(f"b{part}", dim)], [f"{part}_b"], name=f"{part}_bias"),
            helper.make_node("Reshape", [f"{part}_b", split_shape], [f"{part}_split"], name=f"{part}_split"),
            helper.make_node("Transpose", [f"{part}_split"], [f"{part}_heads"],
                             perm=[0, 2, 3, 1] if part == "k" else [0, 2, 1, 3], name=f"{part}_transpose"),
        ]
    nodes += [
        helper.make_node("MatMul", ["q_heads", "k_heads"], ["scores"], name="attn_scores"),
        helper.make_node("Mul", ["scores", const("inv_sqrt_d", np.array(1 / np.sqrt(head_dim), np.float32))],
                         ["scaled"], name="attn_scale"),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1, name="attn_softmax"),
        helper.make_node("MatMul", ["probs", "v_heads"], ["context"], name="attn_context"),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3], name="context_transpose"),
        helper.make_node("Reshape", ["context_t", merge_shape], ["merged"], name="context_merge"),
        helper.make_node("MatMul", ["merged", weight("wo", dim, dim)], ["o_mm"], name="o_proj"),
        helper.make_node("Add", ["o_mm", bias("bo", dim)], ["o_b"], name="o_bias"),
        helper.make_node("Add", ["tokens", "o_b"], ["residual1"], name="residual1"),
        helper.make_node("LayerNormalization", ["residual1", const("ln2.g", np.ones(dim, np.float32)),
                                                const("ln2.b", np.zeros(dim, np.float32))], ["ln2"], axis=-1,
                         name="ln2"),
        helper.make_node("MatMul", ["ln2", weight("w1", dim, hidden)], ["ff1_mm"], name="ff1"),
        helper.make_node("Add", ["ff1_mm", bias("b1", hidden)], ["ff1_b"], name="ff1_bias"),
        helper.make_node("Div", ["ff1_b", const("sqrt2", np.array(np.sqrt(2), np.float32))], ["gelu_div"],
                         name="gelu_div"),
        helper.make_node("Erf", ["gelu_div"], ["gelu_erf"], name="gelu_erf"),
        helper.make_node("Add", ["gelu_erf", const("one", np.array(1, np.float32))], ["gelu_add"], name="gelu_add"),
        helper.make_node("Mul", ["ff1_b", "gelu_add"], ["gelu_mul"], name="gelu_mul"),
        helper.make_node("Mul", ["gelu_mul", const("half", np.array(0.5, np.float32))], ["gelu"], name="gelu"),
        helper.make_node("MatMul", ["gelu", weight("w2", hidden, dim)], ["ff2_mm"], name="ff2"),
        helper.make_node("Add", ["ff2_mm", bias("b2", dim)], ["ff2_b"], name="ff2_bias"),
        helper.make_node("Add", ["residual1", "ff2_b"], ["hidden"], name="residual2"),
    ]
    graph = helper.make_graph(
        nodes, "transformer_block",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "S", dim])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", "S", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxcompress")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
