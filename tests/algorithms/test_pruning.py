"""Filter pruning: channel groups through the hard cases, criteria, targets, exact surgery, bias adjustment, and
bad settings."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.algorithms.pruning.channels import analyse_channels
from onnxcompress.algorithms.pruning.criteria import filter_importance, group_importance
from onnxcompress.algorithms.pruning.macs import layer_costs
from onnxcompress.algorithms.pruning.select import Widths, keep_for_fraction
from onnxcompress.algorithms.pruning.surgery import masking_commands
from onnxcompress.algorithms.quantization.ptq import export_graph
from onnxcompress.api import prune
from onnxcompress.config import FinetuneConfig, PruneConfig, PruningCriterion
from onnxcompress.errors import ConfigError, PruningError
from onnxcompress.models import sample
from onnxcompress.transforms.applier import apply_commands
from onnxcompress.transforms.passes import preprocess


def _hard_cases(seed: int = 0) -> onnx.ModelProto:
    """Conv → Relu → depthwise (bias) → HardSwish, concatenated with a second conv; BatchNorm, per-channel Mul and
    Add over the concatenation; Split; a residual Add; a squeeze-excitation block; Flatten into Gemm."""
    rng = np.random.default_rng(seed)
    inits = []

    def const(name: str, *shape: int, low: float | None = None) -> str:
        values = rng.uniform(low, 1.5, shape) if low is not None else rng.normal(0, 0.4, shape)
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv(name: str, x: str, out: int, inp: int, k: int = 3, group: int = 1) -> helper.NodeProto:
        return helper.make_node("Conv", [x, const(f"{name}.w", out, inp // group, k, k), const(f"{name}.b", out)],
                                [name], name=name, pads=[k // 2] * 4, group=group)

    nodes = [
        conv("conv_a", "x", 8, 3), helper.make_node("Relu", ["conv_a"], ["relu_a"], name="relu_a"),
        conv("dw", "relu_a", 8, 8, group=8), helper.make_node("HardSwish", ["dw"], ["hs"], name="hs"),
        conv("conv_b", "x", 6, 3),
        helper.make_node("Concat", ["hs", "conv_b"], ["cat"], name="cat", axis=1),
        helper.make_node("BatchNormalization", ["cat", const("bn.g", 14, low=0.5), const("bn.b", 14),
                                                const("bn.m", 14), const("bn.v", 14, low=0.5)], ["bn"], name="bn"),
        helper.make_node("Mul", ["bn", const("scale", 1, 14, 1, 1)], ["scaled"], name="scale"),
        helper.make_node("Add", ["scaled", const("shift", 14, 1, 1)], ["shifted"], name="shift"),
        helper.make_node("Split", ["shifted", "sizes"], ["part_a", "part_b"], name="split", axis=1),
        conv("conv_c", "x", 8, 3), helper.make_node("Add", ["part_a", "conv_c"], ["sum"], name="residual"),
        helper.make_node("GlobalAveragePool", ["sum"], ["gap"], name="gap"),
        conv("se1", "gap", 4, 8, k=1), helper.make_node("Relu", ["se1"], ["se_relu"], name="se_relu"),
        conv("se2", "se_relu", 8, 4, k=1), helper.make_node("HardSigmoid", ["se2"], ["gate"], name="gate"),
        helper.make_node("Mul", ["sum", "gate"], ["excited"], name="excite"),
        conv("conv_e", "excited", 10, 8), helper.make_node("Relu", ["conv_e"], ["relu_e"], name="relu_e"),
        helper.make_node("Flatten", ["relu_e"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", const("fc.w", 5, 640), const("fc.b", 5)], ["y"], name="fc", transB=1),
        conv("conv_d", "part_b", 4, 6), helper.make_node("GlobalAveragePool", ["conv_d"], ["gap_d"], name="gap_d"),
        helper.make_node("Flatten", ["gap_d"], ["flat_d"], name="flatten_d"),
        helper.make_node("Gemm", ["flat_d", const("fc_d.w", 4, 3)], ["z"], name="fc_d"),
    ]
    inits.append(numpy_helper.from_array(np.array([8, 6], np.int64), "sizes"))
    graph = helper.make_graph(nodes, "hard", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _grouped(seed: int = 0) -> onnx.ModelProto:
    """Conv → grouped Conv (2 groups) → grouped Conv (2 groups) → Flatten → Gemm (AlexNet's pattern)."""
    rng = np.random.default_rng(seed)
    shapes = {"a.w": (8, 3, 3, 3), "b.w": (12, 4, 3, 3), "b.b": (12,), "c.w": (4, 6, 3, 3), "fc.w": (256, 5)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)
             for name, shape in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "a.w"], ["a"], name="a", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ra"], name="ra"),
             helper.make_node("Conv", ["ra", "b.w", "b.b"], ["b"], name="b", pads=[1] * 4, group=2),
             helper.make_node("Relu", ["b"], ["rb"], name="rb"),
             helper.make_node("Conv", ["rb", "c.w"], ["c"], name="c", pads=[1] * 4, group=2),
             helper.make_node("Flatten", ["c"], ["flat"], name="flat"),
             helper.make_node("MatMul", ["flat", "fc.w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _shuffle(seed: int = 0) -> onnx.ModelProto:
    """ShuffleNet's unit: grouped 1×1 Conv → channel shuffle (Reshape, Transpose, Reshape) → depthwise Conv →
    grouped 1×1 Conv, whose groups read the shuffled channels."""
    rng = np.random.default_rng(seed)
    shapes = {"a.w": (8, 3, 3, 3), "g1.w": (12, 4, 1, 1), "g1.b": (12,), "dw.w": (12, 1, 3, 3), "g2.w": (6, 6, 1, 1),
              "fc.w": (6, 3)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)
             for name, shape in shapes.items()]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("split", [1, 2, 6, 8, 8]), ("merge", [1, 12, 8, 8]))]
    nodes = [helper.make_node("Conv", ["x", "a.w"], ["a"], name="a", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ra"], name="ra"),
             helper.make_node("Conv", ["ra", "g1.w", "g1.b"], ["g1"], name="g1", group=2),
             helper.make_node("Relu", ["g1"], ["r1"], name="r1"),
             helper.make_node("Reshape", ["r1", "split"], ["s"], name="split"),
             helper.make_node("Transpose", ["s"], ["t"], name="swap", perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "merge"], ["m"], name="merge"),
             helper.make_node("Conv", ["m", "dw.w"], ["dw"], name="dw", group=12, pads=[1] * 4),
             helper.make_node("Conv", ["dw", "g2.w"], ["g2"], name="g2", group=2),
             helper.make_node("GlobalAveragePool", ["g2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
             helper.make_node("MatMul", ["flat", "fc.w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "shuffle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


MODELS = {"hard_cases": _hard_cases, "grouped": _grouped, "shuffle": _shuffle}


def _run(model: onnx.ModelProto, x: np.ndarray, *, fused: bool = True) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def test_groups_follow_concat_split_residuals_and_squeeze_excitation() -> None:
    analysis = analyse_channels(preprocess(_hard_cases()))
    groups = {g.producers: g for g in analysis.groups}
    assert set(groups) == {("conv_a", "conv_c", "se2"), ("conv_b",), ("se1",), ("conv_e",), ("conv_d",), ("fc",),
                           ("fc_d",)}
    assert {p for p, g in groups.items() if not g.prunable} == {("fc",), ("fc_d",)}
    assert groups[("fc",)].reason == "reaches the graph output 'y'"
    # conv_e's channels reach fc through Flatten as blocks of 8·8 features.
    assert analysis.layouts["flat"].block == 64


@pytest.mark.parametrize("name", ["hard_cases", "grouped", "shuffle", "digits_cnn", "digits_mobile"])
def test_the_pruned_graph_computes_what_the_masked_graph_computes(name: str) -> None:
    model = MODELS[name]() if name in MODELS else onnx.load(sample(name).model_path)
    graph = preprocess(onnx.load_from_string(model.SerializeToString()))
    analysis = analyse_channels(graph)
    importance = {i: group_importance(graph, g, PruningCriterion.L1)
                  for i, g in enumerate(analysis.groups) if g.prunable}
    keep = keep_for_fraction(analysis, importance, 0.4, Widths(2))
    masked = export_graph(apply_commands(graph, masking_commands(graph, analysis, keep)), model, shapes=False)
    result = prune(model, target=0.4, min_width=2, channel_multiple=1, criterion="l1", progress=False)
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert result.macs_after < 0.75 * result.macs_before
    shape = [2 if not d.dim_value else d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for expected, actual, reference in zip(_run(masked, x), _run(result.model, x), _run(model, x)):
        assert expected.shape == actual.shape == reference.shape
        assert np.abs(expected - actual).max() <= 1e-5 * (np.ptp(expected) + 1e-12)
        assert np.abs(reference - actual).max() > 1e-3  # channels really went


def test_reported_macs_are_those_of_the_pruned_model_and_the_flops_target_holds() -> None:
    result = prune(_hard_cases(), target=0.3, target_kind="flops", min_width=2, channel_multiple=1, progress=False)
    graph = preprocess(result.model)
    recount = sum(cost.macs() for cost in layer_costs(graph, analyse_channels(graph)))
    assert recount == result.macs_after
    assert 1 - result.macs_after / result.macs_before >= 0.3
    assert all(g.channels_after >= min(2, g.channels_before) for g in result.groups)


def test_criteria_rank_filters_as_the_lecture_defines_them() -> None:
    filters = np.array([[3.0, 0.0], [0.0, -2.0], [1.0, 1.0], [0.9, 0.1]])
    np.testing.assert_allclose(filter_importance(filters, PruningCriterion.L1), [3, 2, 2, 1])
    np.testing.assert_allclose(filter_importance(filters, PruningCriterion.L2), [3, 2, np.sqrt(2), np.sqrt(0.82)])
    distances = np.linalg.norm(filters[:, None] - filters[None], axis=2).sum(axis=1)
    np.testing.assert_allclose(filter_importance(filters, PruningCriterion.GEOMETRIC_MEDIAN), distances)
    assert distances.argmin() == 3  # the filter nearest the others goes first


def test_with_data_the_next_biases_absorb_the_pruned_channels_means(tmp_path) -> None:
    digits = sample("digits_cnn")
    with np.load(digits.test_path) as data:
        x, labels = data["input"], data["labels"]

    def accuracy(model: onnx.ModelProto) -> float:
        return float((_run(model, x)[0].argmax(axis=1) == labels).mean())

    options = {"target": 0.3, "target_kind": "flops", "channel_multiple": 1, "progress": False}
    plain = prune(digits.model_path, **options)
    adjusted = prune(digits.model_path, digits.calibration_path, **options)
    assert not plain.adjusted and set(adjusted.adjusted) >= {"conv2", "conv3", "fc"}
    assert accuracy(adjusted.model) > accuracy(plain.model) + 0.1


def test_bad_settings_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="target"):
        PruneConfig.build({"target": 1.0})
    with pytest.raises(ConfigError, match="criterion"):
        PruneConfig.build({"criterion": "random"})
    with pytest.raises(PruningError, match=r"a 90% MAC reduction cannot be reached: .* removes \d+\.\d% of the MACs"):
        prune(_hard_cases(), target=0.9, target_kind="flops", progress=False)
    with pytest.raises(ConfigError, match="ignored scope entries match no node: name 'nope'"):
        prune(_hard_cases(), ignored_scope={"names": ["nope"]}, progress=False)
    only_output = helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(PruningError, match="no channel group can be pruned: reaches the graph output 'y'"):
        prune(only_output, progress=False)


def test_grouped_convolutions_lose_as_many_channels_in_each_group() -> None:
    result = prune(_grouped(), target=0.5, min_width=2, channel_multiple=1, progress=False)
    layers = {layer.node: layer for layer in result.layers}
    assert layers["a"].channels_after == (4, 3) and layers["b"].channels_after == (6, 4)
    pruned = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert pruned["b.w"].shape == (6, 2, 3, 3) and pruned["c.w"].shape == (2, 3, 3, 3)
    assert pruned["fc.w"].shape == (128, 5)  # conv c's 2 channels × 8 × 8 features


def test_a_channel_shuffle_prunes_whole_orbits_as_many_per_group_of_the_next_conv() -> None:
    analysis = analyse_channels(preprocess(_shuffle()))
    mid = next(g for g in analysis.groups if g.producers == ("g1",))
    # Channel c = u·6 + v sits at position v·2 + u after the shuffle: orbits are the v's; g2's two groups read
    # positions 0-5 (v = 0, 1, 2) and 6-11 (v = 3, 4, 5).
    np.testing.assert_array_equal(mid.orbits, np.arange(12) % 6)
    np.testing.assert_array_equal(mid.shuffled, (np.arange(12) % 6) // 3)
    result = prune(_shuffle(), target=0.5, min_width=2, channel_multiple=1, progress=False)
    pruned = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    # Half of 12 is 3 orbits, which two groups cannot share equally: 4 orbits stay, 2 for each of g2's groups;
    # g2 (grouped) keeps 2 of 3 filters per group.
    assert pruned["g1.w"].shape == (8, 2, 1, 1) and pruned["dw.w"].shape == (8, 1, 3, 3)  # conv a: 8 → 4
    assert pruned["g2.w"].shape == (4, 4, 1, 1) and pruned["fc.w"].shape == (4, 3)
    assert list(pruned["split"]) == [1, 2, 4, 8, 8] and list(pruned["merge"]) == [1, 8, 8, 8]


def test_pruned_widths_are_multiples_of_channel_multiple() -> None:
    result = prune(onnx.load(sample("digits_cnn").model_path), target=0.3, target_kind="flops", progress=False)
    assert all(g.channels_after % 8 == 0 for g in result.groups if g.channels_after < g.channels_before)
    assert any(g.channels_after < g.channels_before for g in result.groups)


def test_ignored_layers_keep_their_group() -> None:
    result = prune(_hard_cases(), target=0.5, min_width=2, channel_multiple=1, ignored_scope={"names": ["conv_c"]}, progress=False)
    groups = {g.producers: g for g in result.groups}
    kept = groups[("conv_a", "conv_c", "se2")]
    assert kept.channels_after == kept.channels_before and kept.reason == "in the ignored scope"
    assert groups[("conv_b",)].channels_after == 3


def test_surgery_also_removes_channels_behind_dequantize_linear() -> None:
    """Quantizing the masked graph, then removing the channels from the INT8 file (its integer weights, per-channel
    scales and INT32 biases), computes what the quantized masked graph computes."""
    from onnxcompress.algorithms.pruning.surgery import surgery_commands
    from onnxcompress.api import quantize

    digits = sample("digits_mobile")
    model = onnx.load(digits.model_path)
    graph = preprocess(onnx.load(digits.model_path))
    analysis = analyse_channels(graph)
    importance = {i: group_importance(graph, g, PruningCriterion.L2)
                  for i, g in enumerate(analysis.groups) if g.prunable}
    keep = keep_for_fraction(analysis, importance, 0.3, Widths(8))
    masked = export_graph(apply_commands(graph, masking_commands(graph, analysis, keep)), model)
    quantized = quantize(masked, digits.calibration_path, progress=False)
    int8 = gs.import_onnx(quantized)
    pruned = export_graph(apply_commands(int8, surgery_commands(int8, analysis, keep)), quantized, shapes=False)
    onnx.checker.check_model(pruned, full_check=True)
    assert sum(numpy_helper.to_array(i).size for i in pruned.graph.initializer) < \
        0.8 * sum(numpy_helper.to_array(i).size for i in quantized.graph.initializer)
    with np.load(digits.test_path) as data:
        x = data["input"][:64]
    # Float evaluation of the QDQ graphs (no integer-kernel fusion): removing input channels pairs other weights in
    # ONNX Runtime's int16 kernels on CPUs without VNNI, which is the portability check's business, not this test's.
    expected, actual = _run(quantized, x, fused=False)[0], _run(pruned, x, fused=False)[0]
    assert np.abs(expected - actual).max() <= 1e-4 * np.ptp(expected)


def test_bn_gamma_ranks_filters_by_the_folded_batchnorms_scale() -> None:
    from onnxcompress.algorithms.pruning.criteria import batchnorm_gammas

    model = onnx.load(sample("digits_mobile").model_path)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    gamma = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == bn.input[1])
    gammas = batchnorm_gammas(model)
    graph = preprocess(onnx.load(sample("digits_mobile").model_path))
    analysis = analyse_channels(graph)
    producer = next(n for n in graph.nodes if n.outputs[0].name == bn.output[0])
    group = next(g for g in analysis.groups if producer.name in g.producers)
    np.testing.assert_allclose(group_importance(graph, group, PruningCriterion.BN_GAMMA, gammas=gammas),
                               np.abs(gamma))
    with pytest.raises(ConfigError, match="bn_gamma is for one-shot pruning"):
        FinetuneConfig.build({"compression": [{"algorithm": "filter_pruning", "criterion": "bn_gamma"}]})


def test_a_mac_target_is_met_closely_when_widths_move_in_steps() -> None:
    """The uniform fraction overshoots with widths in steps of 8; groups get steps back while the target holds."""
    result = prune(onnx.load(sample("digits_cnn").model_path), target=0.3, target_kind="flops", progress=False)
    reduction = 1 - result.macs_after / result.macs_before
    assert 0.3 <= reduction < 0.35


def test_inspect_lists_the_channel_groups_and_why_some_are_kept() -> None:
    from onnxcompress.inspection import format_inspection, inspect_model

    report = inspect_model(sample("digits_cnn").model_path, runtimes=False)
    text = format_inspection(report)
    assert "filter pruning: 4 of 5 channel groups can lose channels" in text
    assert "kept (1): reaches the graph output 'logits'" in text


def test_global_ranking_cuts_groups_of_weak_channels_more_under_one_threshold() -> None:
    """Two groups of 16: one with half its channels far below its mean, one with equal channels. Uniform ranking
    cuts both alike; global ranking takes the weak half of the first and nothing of the second, and the filters
    target counts over all groups."""
    from onnxcompress.algorithms.pruning.select import select_channels
    from onnxcompress.config import PruningRanking, PruningTargetKind

    model = _two_convs()
    graph = preprocess(model)
    analysis = analyse_channels(graph)
    importance = {i: group_importance(graph, g, PruningCriterion.L2)
                  for i, g in enumerate(analysis.groups) if g.prunable}
    costs = layer_costs(graph, analysis)
    by_producer = {analysis.groups[i].producers[0]: analysis.groups[i].spaces[0] for i in importance}

    def widths(ranking: PruningRanking, kind: PruningTargetKind, target: float) -> dict[str, int]:
        keep, _ = select_channels(analysis, importance, costs, target, kind, ranking, Widths(2))
        return {name: len(keep[space]) for name, space in by_producer.items()}

    assert widths(PruningRanking.UNIFORM, PruningTargetKind.FILTERS, 0.25) == {"spread": 12, "even": 12}
    assert widths(PruningRanking.GLOBAL, PruningTargetKind.FILTERS, 0.25) == {"spread": 8, "even": 16}
    keep, _ = select_channels(analysis, importance, costs, 0.25, PruningTargetKind.FILTERS, PruningRanking.GLOBAL,
                              Widths(2))
    np.testing.assert_array_equal(keep[by_producer["spread"]], np.arange(0, 16, 2))  # the strong (even) filters
    result = prune(model, target=0.2, target_kind="flops", ranking="global", min_width=2, channel_multiple=1,
                   progress=False)
    assert 1 - result.macs_after / result.macs_before >= 0.2
    assert {g.producers: g.channels_after for g in result.groups}[("even",)] == 16


def _two_convs() -> onnx.ModelProto:
    """x → conv 'spread' (odd filters 20× weaker) → Relu → conv 'even' (equal norms) → Relu → conv 'head' → y."""
    rng = np.random.default_rng(4)
    spread = rng.normal(0, 1, (16, 3, 3, 3))
    spread /= np.linalg.norm(spread.reshape(16, -1), axis=1)[:, None, None, None]
    spread[1::2] *= 0.05
    even = rng.normal(0, 1, (16, 16, 3, 3))
    even /= np.linalg.norm(even.reshape(16, -1), axis=1)[:, None, None, None]
    head = rng.normal(0, 0.2, (4, 16, 1, 1))
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for n, w in
             (("spread.w", spread), ("even.w", even), ("head.w", head))]
    nodes = [helper.make_node("Conv", ["x", "spread.w"], ["a"], name="spread", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["ra", "even.w"], ["b"], name="even", pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("Conv", ["rb", "head.w"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "two_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
