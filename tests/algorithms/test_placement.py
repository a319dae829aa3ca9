import onnx_graphsurgeon as gs
from conftest import build_tiny_cnn

from onnxcompress.algorithms.quantization.placement import plan_quantizers
from onnxcompress.models.transformer_block import build_transformer_block
from onnxcompress.transforms.passes import preprocess


def _groups(setup):
    return [sorted(t.tensor for t in g.targets) for g in setup.groups]


def _producer_ops(graph: gs.Graph):
    return {t.name: (t.inputs[0].op if t.inputs else "input") for t in graph.tensors().values()}


def test_cnn_quantizers_sit_after_fused_patterns_and_residual_add_inputs_keep_own_scales():
    graph = preprocess(build_tiny_cnn())
    setup = plan_quantizers(graph, frozenset())
    producers = _producer_ops(graph)
    assert {w.node for w in setup.weights} == {n.name for n in graph.nodes if n.op in ("Conv", "Gemm")}
    quantized = setup.activation_tensors
    # Never between a Conv and its ReLU: no quantized tensor is produced by a Conv that feeds a Relu.
    for name in quantized:
        tensor = graph.tensors()[name]
        if producers[name] == "Conv":
            assert [c.op for c in tensor.outputs] != ["Relu"]
    # One quantizer per tensor.
    assert len(quantized) == len(set(quantized))
    add = next(n for n in graph.nodes if n.op == "Add")
    add_inputs = sorted(t.name for t in add.inputs)
    assert set(add_inputs) <= set(quantized), "both residual Add inputs are INT8"
    assert not any(set(add_inputs) <= set(group) for group in _groups(setup)), "each keeps its own scale"
    # MaxPool runs on INT8 data: its input and output are quantized together.
    pool = next(n for n in graph.nodes if n.op == "MaxPool")
    assert any({pool.inputs[0].name, pool.outputs[0].name} <= set(g) for g in _groups(setup))


def test_ignored_nodes_keep_float_weights_and_inputs():
    graph = preprocess(build_tiny_cnn())
    gemm = next(n for n in graph.nodes if n.op == "Gemm")
    setup = plan_quantizers(graph, frozenset({gemm.name}))
    assert gemm.name not in {w.node for w in setup.weights}
    for group in setup.groups:
        for target in group.targets:
            assert gemm.name not in target.consumers


def test_transformer_keeps_layernorm_softmax_and_residual_add_float():
    graph = preprocess(build_transformer_block())
    setup = plan_quantizers(graph, frozenset(), transformer=True)
    readers = {c for g in setup.groups for t in g.targets for c in t.consumers}
    ops = {n.name: n.op for n in graph.nodes}
    assert not {ops[r] for r in readers} & {"LayerNormalization", "Softmax", "Add"}
    attention = {"attn_scores", "attn_context"}
    assert attention <= readers, "both activation inputs of attention MatMuls are quantized"
    assert len(setup.weights) == 6


def _conv_concat_graph() -> gs.Graph:
    """x → conv_a, conv_b → Concat → y: the Conv outputs are quantized only for ORT's QLinearConv."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), f"w_{n}")
               for n in "ab"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_a"], ["a"], name="conv_a"),
         helper.make_node("Conv", ["x", "w_b"], ["b"], name="conv_b"),
         helper.make_node("Concat", ["a", "b"], ["y"], name="concat", axis=1)],
        "conv_concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], weights)
    return preprocess(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def test_groups_know_whether_a_compute_op_reads_them():
    setup = plan_quantizers(_conv_concat_graph(), frozenset())
    feeds = {t.tensor: g.feeds_compute for g in setup.groups for t in g.targets}
    assert feeds == {"x": True, "a": False, "b": False}


def test_a_chain_of_layout_ops_is_quantized_at_its_ends_only():
    """conv_a → Reshape → Transpose → Reshape → conv_b (a channel shuffle): no quantizer inside the chain, so
    OpenVINO can fuse it into ShuffleChannels; the chain's input and output share one quantizer group."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"w_{n}")
                    for n in "ab"]
    initializers += [numpy_helper.from_array(np.array(s, np.int64), n)
                     for n, s in (("split", [1, 2, 2, 2, 2]), ("merge", [1, 4, 2, 2]))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_a"], ["a"], name="conv_a"),
         helper.make_node("Reshape", ["a", "split"], ["r1"], name="split_groups"),
         helper.make_node("Transpose", ["r1"], ["t"], name="swap_groups", perm=[0, 2, 1, 3, 4]),
         helper.make_node("Reshape", ["t", "merge"], ["r2"], name="merge_groups"),
         helper.make_node("Conv", ["r2", "w_b"], ["y"], name="conv_b")],
        "shuffle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], initializers)
    setup = plan_quantizers(preprocess(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])),
                            frozenset())
    assert sorted(_groups(setup)) == [["a", "r2"], ["x"], ["y"]]


def test_concat_read_in_float_gets_all_its_inputs_quantized():
    """densenet's pattern: Concat(Concat(MaxPool(x), conv_a), conv_b) read by a float op. The Conv outputs are
    quantized for ORT's QLinearConv; the pool output must be too, or OpenVINO concatenates in bf16. The inner
    Concat's output is INT8 already and gets no quantizer of its own."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), f"w_{n}")
               for n in "ab"]
    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["p"], name="pool", kernel_shape=[1, 1]),
         helper.make_node("Conv", ["x", "w_a"], ["a"], name="conv_a"),
         helper.make_node("Concat", ["p", "a"], ["c1"], name="concat_1", axis=1),
         helper.make_node("Conv", ["x", "w_b"], ["b"], name="conv_b"),
         helper.make_node("Concat", ["c1", "b"], ["c2"], name="concat_2", axis=1),
         helper.make_node("Sigmoid", ["c2"], ["y"], name="float_reader")],
        "dense_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, 4, 4])], weights)
    setup = plan_quantizers(preprocess(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])),
                            frozenset())
    assert sorted(_groups(setup)) == [["a"], ["b"], ["p", "x"]]


def test_transformer_residual_add_reads_the_float_layernorm_output():
    """Post-LN blocks (BERT): the LayerNorm output feeds the next MatMuls and the residual Add; only the MatMuls
    read its dequantized value, so the residual stream carries no quantization noise."""
    from conftest import build_post_ln_block

    graph = preprocess(build_post_ln_block())
    setup = plan_quantizers(graph, frozenset(), transformer=True)
    targets = [t for g in setup.groups for t in g.targets]
    assert [(t.tensor, t.consumers) for t in targets] == [("ln", ("dense",))]


def _silu_conv_model(dynamic: bool, batch: int | str = 1):
    """Conv → SiLU (Sigmoid, Mul) → Conv, the SiLU output's shape read by a Shape op (YOLOv8's anchor grid)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
             for name, shape in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["g1"], name="sigmoid"),
             helper.make_node("Mul", ["c1", "g1"], ["a1"], name="silu"),
             helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2"),
             helper.make_node("Shape", ["a1"], ["grid"], name="grid_shape")]
    spatial = ["H", "W"] if dynamic else [16, 16]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, *spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"]),
                               helper.make_tensor_value_info("grid", TensorProto.INT64, [4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_output_whose_shape_is_read_stays_float_with_dynamic_shapes():
    """OpenVINO drops the bias of such a Conv when its output quantizer cannot fuse into it (op_table
    SHAPE_READING_OPS): with dynamic H/W only the SiLU output is quantized; with static shapes ShapeOf folds to a
    constant and the Conv output keeps its quantizer (ONNX Runtime's QLinearConv needs it), also with a dynamic
    batch alone (PyTorch's `x.view(x.size(0), -1)` reads the shape of most classifiers' last activation)."""
    for dynamic, batch, conv_output_quantized in ((True, 1, False), (False, 1, True), (False, "N", True)):
        graph = preprocess(_silu_conv_model(dynamic, batch))
        quantized = set(plan_quantizers(graph, frozenset()).activation_tensors)
        assert "a1" in quantized and "x" in quantized
        assert ("c1" in quantized) is conv_output_quantized, f"dynamic={dynamic} batch={batch}"
