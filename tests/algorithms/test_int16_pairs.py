"""Files that stay exact on x86 CPUs without VNNI, checked against an emulation of the kernel arithmetic and
against the same file evaluated in float (references that do not depend on the CPU running the test)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import build_tiny_cnn

from onnxcompress.algorithms.quantization.scheme import INT16_PAIR_BUDGET, kernel_pairs, quantize_weight
from onnxcompress.api import quantize
from onnxcompress.models import sample
from onnxcompress.portability import check_portability
from onnxcompress.runtime.evaluate import sqnr_db
from onnxcompress.transforms.op_table import int16_pair_accumulation, int16_pair_order

RNG = np.random.default_rng(11)


def vpmaddubsw_dot(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """u8 · s8 dot products of rows as VPMADDUBSW computes them: each two neighbouring products are added and
    saturated to int16, then the pairs are summed in int32."""
    products = activations.astype(np.int32)[:, None, :] * weights.astype(np.int32)[None, :, :]
    pairs = products.reshape(*products.shape[:-1], -1, 2).sum(axis=-1)
    return np.clip(pairs, -32768, 32767).sum(axis=-1)


def exact_dot(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return activations.astype(np.int64) @ weights.astype(np.int64).T


def _weights(channels: int = 48, depth: int = 64) -> np.ndarray:
    weight = RNG.normal(size=(channels, depth)).astype(np.float32)
    weight[::3, 0] *= 20  # channels with one outlier weight
    return weight


def test_full_range_weights_saturate_the_emulated_kernel():
    quantized, _ = quantize_weight(_weights(), axis=0)
    activations = np.full((4, quantized.shape[1]), 255, np.uint8)
    assert (vpmaddubsw_dot(activations, quantized) != exact_dot(activations, quantized)).any()


@pytest.mark.parametrize("seed", range(3))
def test_pair_budget_is_exact_whichever_weights_the_kernel_pairs(seed):
    quantized, _ = quantize_weight(_weights(), axis=0, pair_budget=INT16_PAIR_BUDGET)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        order = rng.permutation(quantized.shape[1])  # another packing of the reduction axis
        weights = quantized[:, order]
        worst = np.where(weights > 0, 255, 0).astype(np.uint8)  # the largest positive sums
        activations = np.concatenate([worst, np.where(weights < 0, 255, 0).astype(np.uint8),
                                      rng.integers(0, 256, size=(8, weights.shape[1]), dtype=np.uint8)])
        assert (vpmaddubsw_dot(activations, weights) == exact_dot(activations, weights)).all()


def _kernel_rows(levels: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """Each output channel's levels in the kernel's order, as `vpmaddubsw_dot` pairs them."""
    return kernel_pairs(levels, 0, order).reshape(levels.shape[0], -1)


@pytest.mark.parametrize(("shape", "order"), [((16, 3, 3, 3), (2, 3, 1)), ((16, 8, 3, 3), (2, 3, 1)),
                                              ((24, 40), (1,))])
def test_kernel_pair_budget_is_exact_for_the_pairs_the_kernel_forms(shape, order):
    weight = RNG.normal(size=shape).astype(np.float32)
    weight.reshape(shape[0], -1)[::2, :3] *= 8  # outliers next to each other
    levels, params = quantize_weight(weight, axis=0, pair_budget=INT16_PAIR_BUDGET, pair_order=order)
    full, full_params = quantize_weight(weight, axis=0)
    rows = _kernel_rows(levels, order)
    activations = np.concatenate([np.where(rows > 0, 255, 0), np.where(rows < 0, 255, 0)]).astype(np.uint8)
    assert (vpmaddubsw_dot(activations, rows) == exact_dot(activations, rows)).all()
    full_rows = _kernel_rows(full, order)
    worst_full = np.concatenate([np.where(full_rows > 0, 255, 0), np.where(full_rows < 0, 255, 0)]).astype(np.uint8)
    assert (vpmaddubsw_dot(worst_full, full_rows) != exact_dot(worst_full, full_rows)).any()
    # The step is the smallest that fits the largest kernel pair: each channel's worst pair takes 127-128 levels.
    pairs = kernel_pairs(levels.astype(np.int32), 0, order)
    worst = np.maximum(np.maximum(pairs, 0).sum(2).max(1), np.maximum(-pairs, 0).sum(2).max(1))
    coarsened = params.scale > full_params.scale
    assert coarsened.any() and (worst[coarsened] >= INT16_PAIR_BUDGET - 2).all()
    assert (params.scale >= full_params.scale).all()


def test_kernel_pairs_keep_a_large_weight_at_full_range_beside_a_small_one():
    """Only neighbours in the kernel's order are paired: a channel whose large weights alternate with small ones
    keeps (nearly) the full range, where the rule for any pairing would halve its levels."""
    weight = np.full((2, 8, 1, 1), 0.02, np.float32)
    weight[:, ::2] = 1.0  # input channels 0, 2, 4, 6 large: pairs (0, 1), (2, 3)... are large + small
    kernel, _ = quantize_weight(weight, axis=0, pair_budget=INT16_PAIR_BUDGET, pair_order=(2, 3, 1))
    any_pair, _ = quantize_weight(weight, axis=0, pair_budget=INT16_PAIR_BUDGET)
    assert kernel.max() >= 124 and any_pair.max() == 64


def test_pair_budget_coarsens_only_the_channels_that_need_it():
    weight = RNG.normal(size=(4, 64)).astype(np.float32) * 0.001
    weight[0, 5] = 1.0  # one outlier: its partner is tiny, the channel fits at full range
    weight[1, :2] = 1.0  # two equal maxima: at most 64 levels each
    full, full_params = quantize_weight(weight, axis=0)
    budget, budget_params = quantize_weight(weight, axis=0, pair_budget=INT16_PAIR_BUDGET)
    assert budget_params.scale[0] == full_params.scale[0] and budget[0].max() == 127
    assert budget[1].max() == 64 and budget_params.scale[1] > full_params.scale[1]
    assert np.abs(budget.astype(np.int32)).max(axis=1)[2:].max() <= 127
    # Lower bit widths never exceed the budget, so they are left as they are.
    assert np.array_equal(quantize_weight(weight, 0, 7, pair_budget=INT16_PAIR_BUDGET)[0],
                          quantize_weight(weight, 0, 7)[0])


def _node(op: str, weight_shape: tuple[int, ...], **attrs) -> gs.Node:
    weight = gs.Constant("w", np.zeros(weight_shape, np.float32))
    return gs.Node(op, inputs=[gs.Variable("x"), weight], outputs=[gs.Variable("y")], attrs=attrs)


@pytest.mark.parametrize(("node", "pairs"), [
    (_node("Conv", (8, 16, 3, 3)), True),
    (_node("Conv", (8, 8, 3, 3), group=2), True),  # grouped: the dense kernel per group
    (_node("Conv", (16, 1, 3, 3), group=16), False),  # depthwise: a widening kernel
    (_node("Conv", (32, 1, 3, 3), group=16), True),  # channel multiplier: not the depthwise kernel
    (_node("Gemm", (8, 64), transB=1), True),
    (_node("MatMul", (64, 8)), True),
    (_node("ConvTranspose", (16, 8, 3, 3)), False),  # ONNX Runtime runs it in float
])
def test_op_table_says_which_kernels_add_products_in_int16_pairs(node, pairs):
    assert int16_pair_accumulation(node) is pairs


@pytest.mark.parametrize(("node", "order"), [
    (_node("Conv", (8, 16, 3, 3)), (2, 3, 1)),  # filters reordered OIHW -> HWIO: taps outer, input channels inner
    (_node("Conv", (8, 3, 5)), (2, 1)),
    (_node("Gemm", (8, 64), transB=1), (1,)),
    (_node("Gemm", (64, 8)), (0,)),
    (_node("MatMul", (64, 8)), (0,)),
    (_node("MatMul", (2, 64, 8)), None),  # batched weights: pairing not known, any two weights may pair
])
def test_op_table_says_which_weights_the_kernel_pairs(node, order):
    assert int16_pair_order(node, len(node.inputs[1].shape)) == order


def _alternating_cnn() -> onnx.ModelProto:
    """x[1,3,12,12] → Conv 3→16 → Relu → Conv 16→16 → Relu → Flatten → Gemm, all weights positive and, in each
    kernel's order, large at even positions and small at odd ones: exact only if the kernel pairs neighbours in
    that order (with any other pairing, two large levels would meet)."""
    def weight(shape: tuple[int, ...], order: tuple[int, ...]) -> np.ndarray:
        kernel_shape = (shape[0], *(shape[a] for a in order))
        large = (np.arange(int(np.prod(kernel_shape[1:]))) % 2 == 0).reshape(kernel_shape[1:])
        values = np.where(large, RNG.uniform(0.8, 1.0, kernel_shape), RNG.uniform(0.0, 0.05, kernel_shape))
        return np.transpose(values, np.argsort((0, *order))).astype(np.float32) * 0.1

    inits = [onnx.numpy_helper.from_array(weight((16, 3, 3, 3), (2, 3, 1)), "w1"),
             onnx.numpy_helper.from_array(weight((16, 16, 3, 3), (2, 3, 1)), "w2"),
             onnx.numpy_helper.from_array(weight((10, 16 * 144), (1,)), "w3")]
    nodes = [onnx.helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             onnx.helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             onnx.helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
             onnx.helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1)]
    graph = onnx.helper.make_graph(
        nodes, "alternating", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 12, 12])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_portable_file_is_exact_where_large_weights_alternate_with_small_ones(tmp_path):
    """The adversarial case for the kernel-pair rule: near full-range levels, ONNX Runtime's integer kernels (fused
    at ENABLE_ALL) compute what the file gives in float, on CPUs without VNNI too (`make test-no-vnni`)."""
    calibration = [{"x": RNG.uniform(0, 1, (1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    path = tmp_path / "portable.onnx"
    onnx.save(quantize(_alternating_cnn(), calibration, progress=False), path)
    levels = [onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer]
    assert min(int(np.abs(v.astype(np.int32)).max()) for v in levels if v.dtype == np.int8 and v.ndim > 1) > 100
    assert check_portability(onnx.load(path)).safe_without_vnni
    feeds = {"x": np.concatenate([RNG.uniform(0, 1, (1, 3, 12, 12)).astype(np.float32) for _ in range(4)])}
    outputs = {}
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs[level] = np.concatenate([session.run(None, {"x": feeds["x"][i:i + 1]})[0] for i in range(4)])
    assert sqnr_db(*outputs.values()) > 35


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    digits = sample("digits_cnn")
    folder = tmp_path_factory.mktemp("int16")
    paths = {}
    for target in ("portable", "vnni"):
        paths[target] = folder / f"{target}.onnx"
        onnx.save(quantize(digits.model_path, digits.calibration_path, target=target, progress=False), paths[target])
    return digits, paths


def _logits(path, inputs, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {k: v[i:i + 100] for k, v in inputs.items()})[0]
                           for i in range(0, len(next(iter(inputs.values()))), 100)])


def test_portable_file_runs_in_integer_kernels_as_it_computes_in_float(digits_files):
    """ONNX Runtime's integer kernels (fused at ENABLE_ALL) give what the same QDQ file gives evaluated in float:
    on CPUs without VNNI too, where full-range weights saturate (measured there: 86% top-1 against 98%)."""
    digits, paths = digits_files
    inputs, labels = digits.load_test()
    in_float = _logits(paths["portable"], inputs, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    integer = _logits(paths["portable"], inputs, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert sqnr_db(in_float, integer) > 30
    assert (integer.argmax(1) == labels).mean() >= (in_float.argmax(1) == labels).mean() - 0.004


def test_inspection_tells_portable_files_from_vnni_only_ones(digits_files):
    _, paths = digits_files
    portable, vnni = (check_portability(onnx.load(paths[t])) for t in ("portable", "vnni"))
    assert portable.safe_without_vnni and portable.checked == 6  # 5 Conv + 1 Gemm
    assert not vnni.safe_without_vnni and len(vnni.risks) == 6
    assert "NOT safe on x86 CPUs without VNNI" in vnni.describe() and "--target portable" in vnni.describe()
    assert all(risk.worst_pair > INT16_PAIR_BUDGET for risk in vnni.risks)


def test_portable_costs_little_in_float_evaluation(digits_files):
    digits, paths = digits_files
    inputs, labels = digits.load_test()
    accuracy = {t: (_logits(p, inputs, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).argmax(1) == labels).mean()
                for t, p in paths.items()}
    assert accuracy["portable"] >= accuracy["vnni"] - 0.01


def test_depthwise_convolutions_keep_full_range_weights():
    """A depthwise Conv runs ONNX Runtime's widening kernel: the portable file leaves its weights at 127 levels."""
    model = build_tiny_cnn()
    graph = gs.import_onnx(model)
    conv = next(n for n in graph.nodes if n.name == "conv2")
    channels = conv.inputs[1].values.shape[0]
    conv.inputs[1].values = RNG.normal(size=(channels, 1, 3, 3)).astype(np.float32)
    conv.attrs["group"] = channels
    model = gs.export_onnx(graph)
    calibration = [{"x": RNG.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    quantized = quantize(model, calibration, progress=False)
    levels = {i.name: onnx.numpy_helper.to_array(i) for i in quantized.graph.initializer}
    depthwise = next(v for k, v in levels.items() if k.startswith("conv2") and v.dtype == np.int8)
    assert np.abs(depthwise.astype(np.int32)).reshape(channels, -1).max(axis=1).min() == 127
    report = check_portability(quantized)
    assert report.safe_without_vnni and report.checked == 2  # conv1 and fc; the depthwise conv2 needs no check
