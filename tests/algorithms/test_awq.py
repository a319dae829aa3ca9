"""Activation-aware scaling (awq.py): where 1/s folds, that the scaled float model computes what the original does,
and that with outlier activation features the 4-bit model comes closer to FP32 than without it, with no op added."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.algorithms.weight_compression.awq import scale_activations, scaling_targets
from onnxcompress.algorithms.weight_compression.oneshot import compress_model
from onnxcompress.algorithms.weight_compression.plan import compressible_layers
from onnxcompress.cli import cli
from onnxcompress.config import WeightCompressionConfig, WeightMode
from onnxcompress.errors import ConfigError
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.commands import SetConstantInput
from onnxcompress.transforms.graph import peek_values

HIDDEN, FFN, TOKENS, OUTLIERS = 256, 512, 8, (3, 70, 140, 201)


def build_block(*, residual_reads_norm: bool = False, shared_gamma: bool = False) -> onnx.ModelProto:
    """A pre-norm gated MLP block, as in decoder LLMs: y = x + down((silu(x̂·G) ⊙ (x̂·U + b))), x̂ = LayerNorm(x)
    whose γ has a few large channels (the activation outliers AWQ is for). `residual_reads_norm`: the residual adds
    x̂ instead (a post-norm layout, where the LayerNorm output has a reader that cannot be rescaled);
    `shared_gamma`: a second LayerNorm reads the same γ."""
    rng = np.random.default_rng(0)
    gamma = np.ones(HIDDEN, np.float32)
    gamma[list(OUTLIERS)] = 25.0

    def table(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "gate"], ["g"], name="gate_proj"),
             helper.make_node("Sigmoid", ["g"], ["sg"], name="sigmoid"),
             helper.make_node("Mul", ["g", "sg"], ["silu"], name="silu"),
             helper.make_node("MatMul", ["n", "up"], ["u0"], name="up_proj"),
             helper.make_node("Add", ["u0", "up_bias"], ["u"], name="up_bias_add"),
             helper.make_node("Mul", ["silu", "u"], ["h"], name="gated"),
             helper.make_node("MatMul", ["h", "down"], ["d"], name="down_proj"),
             helper.make_node("Add", ["n" if residual_reads_norm else "x", "d"], ["y"], name="residual")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", TOKENS, HIDDEN])]
    if shared_gamma:
        nodes.append(helper.make_node("LayerNormalization", ["y", "gamma", "beta"], ["z"], name="norm2", axis=-1))
        outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", TOKENS, HIDDEN])]
    initializers = [numpy_helper.from_array(gamma, "gamma"),
                    numpy_helper.from_array(rng.normal(0, 0.1, HIDDEN).astype(np.float32), "beta"),
                    table("gate", HIDDEN, FFN), table("up", HIDDEN, FFN), table("down", FFN, HIDDEN),
                    numpy_helper.from_array(rng.normal(0, 0.1, FFN).astype(np.float32), "up_bias")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             ["B", TOKENS, HIDDEN])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, TOKENS, HIDDEN)).astype(np.float32)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The first output in float: with graph optimizations off, ONNX Runtime runs a compressed table as
    DequantizeLinear → MatMul instead of fusing it into MatMulNBits, whose INT8 activations differ between CPUs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def energy(model: onnx.ModelProto, tensors: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """E[t²] per last-axis feature of intermediate tensors."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(tensors, {"x": x})
    return {t: np.square(v).reshape(-1, v.shape[-1]).mean(axis=0).astype(np.float32) for t, v in zip(tensors, values)}


def test_the_scale_folds_into_the_layernorm_and_the_up_projection_of_a_gated_block() -> None:
    graph = gs.import_onnx(build_block())
    targets = {t.activation: t for t in scaling_targets(graph, compressible_layers(graph))}
    assert set(targets) == {"n", "h"}
    assert [layer.node for layer in targets["n"].readers] == ["gate_proj", "up_proj"]
    assert {(f.node, f.port) for f in targets["n"].folds} == {("norm", 1), ("norm", 2)}
    # h = silu(g) ⊙ u: silu's input g is also read by the Sigmoid, so 1/s goes into u: the up projection and bias.
    assert {(f.node, f.port) for f in targets["h"].folds} == {("up_proj", 1), ("up_bias_add", 1)}
    assert [t.activation for t in scaling_targets(graph, compressible_layers(graph))] == ["h", "n"]  # last first


@pytest.mark.parametrize("variant", ["residual_reads_norm", "shared_gamma"])
def test_a_layernorm_output_or_scale_with_another_reader_is_not_scaled(variant: str) -> None:
    graph = gs.import_onnx(build_block(**{variant: True}))
    assert [t.activation for t in scaling_targets(graph, compressible_layers(graph))] == ["h"]


def test_the_scaled_float_model_computes_what_the_original_does() -> None:
    model = build_block()
    graph = gs.import_onnx(model)
    layers = compressible_layers(graph)
    nodes = {node.name: node for node in graph.nodes}

    def read(layer):
        return peek_values(nodes[layer.node].inputs[layer.layout.port])

    stats = energy(model, ["n", "h"], inputs(16, 1))
    scaling = scale_activations(graph, layers, scaling_targets(graph, layers), read, stats, WeightMode.INT4_SYM, 64)
    assert scaling.scaled == ["h", "n"]
    tables = [SetConstantInput(layer.node, layer.layout.port, scaling.reader(read)(layer)) for layer in layers]
    apply_commands(graph, [*scaling.commands, *tables])
    scaled = gs.export_onnx(graph)
    gamma = numpy_helper.to_array(next(t for t in scaled.graph.initializer if t.name == "gamma"))
    assert not np.allclose(gamma[list(OUTLIERS)], 25.0)  # γ took 1/s
    x = inputs(4, 2)
    np.testing.assert_allclose(run(scaled, x), run(model, x), rtol=1e-4, atol=1e-4)
    # E[x²] as the scaled model sees it is what the planner weighs the scaled tables' errors by.
    seen = energy(scaled, ["n", "h"], inputs(16, 1))
    for name in ("n", "h"):
        np.testing.assert_allclose(scaling.importance[name], seen[name], rtol=1e-3)


def test_awq_brings_the_4_bit_block_closer_to_fp32_with_no_op_added() -> None:
    data = [{"x": inputs(8, seed)} for seed in range(4)]
    test = inputs(16, 9)
    reference = run(build_block(), test)
    results = {}
    for scaling in (False, True):
        config = WeightCompressionConfig(mode="int4_sym", group_size=64, all_layers=True, activation_scaling=scaling)
        results[scaling] = compress_model(build_block(), config, data, progress=False)
    errors = {key: np.square(run(r.model, test) - reference).mean() for key, r in results.items()}
    assert errors[True] < 0.9 * errors[False]
    assert results[True].scaled_activations == ("h", "n") and results[False].scaled_activations == ()
    ops = {key: sorted(n.op_type for n in r.model.graph.node) for key, r in results.items()}
    assert ops[True] == ops[False]


def test_int8_and_data_free_compression_do_not_scale() -> None:
    data = [{"x": inputs(8, 0)}]
    assert compress_model(build_block(), WeightCompressionConfig(mode="int8"), data,
                          progress=False).scaled_activations == ()
    assert compress_model(build_block(), WeightCompressionConfig(mode="int4_sym"),
                          progress=False).scaled_activations == ()


def test_no_awq_needs_data_and_a_4_bit_mode(tmp_path) -> None:
    path = tmp_path / "block.onnx"
    onnx.save(build_block(), path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=inputs(2, 0))
    for options in (["--mode", "int4_sym"], ["--mode", "int8", "--data", str(data)]):
        result = CliRunner().invoke(cli, ["compress-weights", str(path), *options, "--no-awq"])
        assert isinstance(result.exception, ConfigError) and "--no-awq" in str(result.exception)
    assert not list(tmp_path.glob("block.int*.onnx"))


def test_the_command_says_which_activations_it_scaled(tmp_path) -> None:
    path, data = tmp_path / "block.onnx", tmp_path / "calib.npz"
    onnx.save(build_block(), path)
    np.savez(data, x=inputs(8, 0))
    result = CliRunner().invoke(cli, ["compress-weights", str(path), "--mode", "int4_sym", "--group-size", "64",
                                      "--data", str(data), "-o", str(tmp_path / "out.onnx"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "activation-aware scaling on 1 activation" in result.output  # the last product (INT8) is not scaled
    unscaled = CliRunner().invoke(cli, ["compress-weights", str(path), "--mode", "int4_sym", "--group-size", "64",
                                        "--data", str(data), "--no-awq", "-o", str(tmp_path / "plain.onnx"),
                                        "--no-progress"])
    assert unscaled.exit_code == 0 and "activation-aware" not in unscaled.output


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_gemm_maker_takes_1_over_s_in_its_output_channels_and_bias(trans_b: int) -> None:
    """x → Gemm(W₁, b₁) → MatMul(W₂): the Gemm's table (in either layout, divided as it is read) and its bias (by a
    command) take 1/s, and the float model computes what it did; an ignored Gemm keeps its constants."""
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((HIDDEN, FFN) if not trans_b else (FFN, HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g"], name="gemm", transB=trans_b),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", HIDDEN])],
                              [numpy_helper.from_array(w1, "w1"),
                               numpy_helper.from_array(rng.standard_normal(FFN).astype(np.float32), "b1"),
                               numpy_helper.from_array(rng.standard_normal((FFN, HIDDEN)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = np.random.default_rng(5).standard_normal((16, HIDDEN)).astype(np.float32)
    g = run_tensor(model, "g", x)
    g[:, :8] *= 30  # outlier features
    stats = {"g": np.square(g).mean(axis=0).astype(np.float32)}
    scaled_graph = gs.import_onnx(model)
    layers = compressible_layers(scaled_graph)
    nodes_by_name = {node.name: node for node in scaled_graph.nodes}

    def read(layer):
        return peek_values(nodes_by_name[layer.node].inputs[layer.layout.port])

    readers = [layer for layer in layers if layer.node == "matmul"]
    assert scaling_targets(scaled_graph, readers, frozenset({"gemm"})) == []
    targets = scaling_targets(scaled_graph, readers)
    assert [(t.activation, {(f.node, f.port) for f in t.folds}) for t in targets] == [("g", {("gemm", 1),
                                                                                              ("gemm", 2)})]
    scaling = scale_activations(scaled_graph, layers, targets, read, stats, WeightMode.INT4_SYM, 64)
    assert scaling.scaled == ["g"] and set(scaling.columns) == {"w1"}
    assert [(c.node, c.port) for c in scaling.commands] == [("gemm", 2)]
    tables = [SetConstantInput(layer.node, layer.layout.port, scaling.reader(read)(layer)) for layer in layers]
    apply_commands(scaled_graph, [*scaling.commands, *tables])
    np.testing.assert_allclose(run_tensor(gs.export_onnx(scaled_graph), "y", x), run_tensor(model, "y", x),
                               rtol=1e-3, atol=1e-3)


def run_tensor(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if name not in [o.name for o in probe.graph.output]:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {"x": x})[0]


def test_accuracy_controls_candidates_keep_the_folded_scales() -> None:
    from onnxcompress.algorithms.weight_compression.oneshot import plan_compression

    data = [{"x": inputs(8, seed)} for seed in range(4)]
    config = WeightCompressionConfig(mode="int4_sym", group_size=64, all_layers=True)
    planned = plan_compression(build_block(), config, data, progress=False)
    assert planned.plan.scaled_activations == ("h", "n") and set(planned.plan.four_bit) >= {"gate_proj", "up_proj"}
    test = inputs(16, 9)
    reference = run(build_block(), test)
    errors = {}
    for relaxed in ((), ("gate_proj", "up_proj", "down_proj")):
        model = planned.apply(relaxed).model
        gamma = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "gamma"))
        assert not np.allclose(gamma[list(OUTLIERS)], 25.0)  # 1/s stays folded in every candidate
        errors[relaxed] = np.square(run(model, test) - reference).mean()
    assert errors[("gate_proj", "up_proj", "down_proj")] < 0.1 * errors[()]


def test_a_block_in_external_data_is_scaled_as_the_same_block_in_memory(tmp_path) -> None:
    import onnxcompress

    onnx.save(build_block(), tmp_path / "block.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    np.savez(tmp_path / "calib.npz", x=inputs(8, 0))
    settings = {"mode": "int4_sym", "group_size": 64, "all_layers": True}
    expected = compress_model(build_block(), WeightCompressionConfig(**settings),
                              [{"x": inputs(8, 0)[i:i + 1]} for i in range(8)], progress=False)
    result = onnxcompress.compress_weights(tmp_path / "block.onnx", tmp_path / "calib.npz", progress=False,
                                           **settings)
    assert result.scaled_activations == expected.scaled_activations == ("h", "n")
    saved = result.save(tmp_path / "out.onnx")
    test = inputs(4, 9)
    np.testing.assert_array_equal(run(onnx.load(saved), test), run(expected.model, test))


def _two_products(combine: list[onnx.NodeProto], extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x → MatMul(A) = a, x → MatMul(B) = b, `combine` makes t, t → MatMul(W) = y (the reader AWQ scales)."""
    rng = np.random.default_rng(6)
    initializers = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
                    for name, shape in (("A", (HIDDEN, FFN)), ("B", (HIDDEN, FFN)), ("W", (FFN, HIDDEN)),
                                        ("c", (FFN,)))]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["a"], name="make_a"),
             helper.make_node("MatMul", ["x", "B"], ["b"], name="make_b"), *combine,
             helper.make_node("MatMul", ["t", "W"], ["y"], name="reader"),
             helper.make_node("ReduceSum", ["b", "axes"], ["b_sum"], name="b_sink", keepdims=0)]
    initializers.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "b_sum", *extra_outputs)]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", HIDDEN])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(("combine", "expected"), [
    ([helper.make_node("Sub", ["c", "a"], ["t"])], {("make_a", 1), ("sub", 0)}),
    ([helper.make_node("Sub", ["a", "c"], ["t"])], {("make_a", 1), ("sub", 1)}),
    ([helper.make_node("Mul", ["a", "c"], ["t"])], {("mul", 1)}),  # the constant, not the product's maker
    ([helper.make_node("Add", ["a", "a2"], ["t"]), helper.make_node("Relu", ["x"], ["xr"]),
      helper.make_node("MatMul", ["xr", "A2"], ["a2"], name="make_a2")], {("make_a", 1), ("make_a2", 1)}),
], ids=["const-minus-product", "product-minus-const", "product-times-const", "sum-of-two-products"])
def test_sums_differences_and_products_fold_exactly(combine: list[onnx.NodeProto], expected: set) -> None:
    for node in combine:
        node.name = node.name or node.op_type.lower()
    model = _two_products(combine)
    if any(node.name == "make_a2" for node in combine):
        model.graph.initializer.append(numpy_helper.from_array(
            np.random.default_rng(7).standard_normal((HIDDEN, FFN)).astype(np.float32), "A2"))
    graph = gs.import_onnx(model)
    layers = compressible_layers(graph)
    targets = scaling_targets(graph, [layer for layer in layers if layer.node == "reader"])
    assert [{(f.node, f.port) for f in t.folds} for t in targets] == [expected]
    x = np.random.default_rng(8).standard_normal((16, HIDDEN)).astype(np.float32)
    t = run_tensor(model, "t", x)
    t[:, :16] *= 30
    nodes = {node.name: node for node in graph.nodes}

    def read(layer):
        return peek_values(nodes[layer.node].inputs[layer.layout.port])

    scaling = scale_activations(graph, layers, targets, read, {"t": np.square(t).mean(0).astype(np.float32)},
                                WeightMode.INT4_SYM, 64)
    assert scaling.scaled == ["t"]
    tables = [SetConstantInput(layer.node, layer.layout.port, scaling.reader(read)(layer)) for layer in layers]
    apply_commands(graph, [*scaling.commands, *tables])
    scaled = gs.export_onnx(graph)
    for name in ("y", "b_sum"):
        np.testing.assert_allclose(run_tensor(scaled, name, x), run_tensor(model, name, x), rtol=1e-3, atol=1e-2)


def test_an_intermediate_that_is_a_graph_output_is_not_rescaled() -> None:
    model = _two_products([helper.make_node("Add", ["a", "c"], ["t"], name="add")], extra_outputs=("a",))
    graph = gs.import_onnx(model)
    layers = compressible_layers(graph)
    assert scaling_targets(graph, [layer for layer in layers if layer.node == "reader"]) == []
