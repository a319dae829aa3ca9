"""Mixed W4/W8 under a size budget: the measured size holds the budget, the weight that 4 bits hurt most keeps 8,
4-bit weights are INT4 on disk with their bias correction recomputed, and an unreachable budget is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn
from onnx import numpy_helper

from onnxcompress.algorithms.quantization.bias_correction import weight_error_shift
from onnxcompress.algorithms.quantization.mixed_precision import (
    choose_weight_bits,
    four_bit_weight,
    initializer_bytes,
    with_four_bit_weights,
)
from onnxcompress.algorithms.quantization.partial import apply_partial
from onnxcompress.algorithms.quantization.ptq import INT4_OPSET, plan_quantization
from onnxcompress.config import QuantizationConfig
from onnxcompress.errors import ConfigError
from onnxcompress.evaluation.metrics import EvalSet, resolve_metric
from onnxcompress.runtime.model_io import upgrade_opset
from onnxcompress.transforms.op_table import channel_bias


@pytest.fixture()
def planted(tmp_path: Path):
    """The tiny CNN (opset 21) whose conv2 filters each hold one outlier, so 4 bits leave them almost nothing;
    its plan and the cosine metric against the float model."""
    model = build_tiny_cnn()
    conv2 = next(t for t in model.graph.initializer if t.name == "conv2.weight")
    values = numpy_helper.to_array(conv2).copy()
    values[:, 0, 0, 0] = 12 * np.abs(values).max()
    conv2.CopyFrom(numpy_helper.from_array(values, conv2.name))
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(model, fp32)
    float_bytes = initializer_bytes(model)
    model = upgrade_opset(model, INT4_OPSET)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(0).standard_normal((16, *shape)).astype(np.float32)
    plan = plan_quantization(model, [{TINY_CNN_INPUT: x}], QuantizationConfig(), progress=False)
    metric = resolve_metric("cosine", EvalSet.from_arrays({TINY_CNN_INPUT: x}, [TINY_CNN_INPUT]), fp32)
    return model, plan, metric, float_bytes, x


def test_the_weight_4_bits_hurt_most_keeps_8_bits_and_the_size_holds(planted) -> None:
    model, plan, metric, float_bytes, x = planted
    int8_bytes = initializer_bytes(apply_partial(plan, model))
    others = [i for i, c in enumerate(plan.weights) if c.node != "conv2"]
    saving = sum(plan.weights[i].quantized.size - (plan.weights[i].quantized.size + 1) // 2 for i in others)
    budget = (int8_bytes - saving) / float_bytes
    result = choose_weight_bits(plan, model, metric, budget, float_bytes=float_bytes, progress=False)
    assert set(result.four_bit) == {plan.weights[i].node for i in others}
    assert result.size_bytes <= budget * float_bytes and result.size_bytes == initializer_bytes(result.model)
    drops = {w.node: w.drop for w in result.weights}
    assert drops["conv2"] > max(drops[plan.weights[i].node] for i in others)
    # 4-bit weights are INT4 initializers read through DequantizeLinear, in a model of opset 21 both runtimes run.
    tensors = {t.name: t for t in result.model.graph.initializer}
    stored = {n.input[0]: tensors[n.input[0]].data_type for n in result.model.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in tensors and "weight" in n.input[0]}
    assert stored == {"conv1.weight_q": onnx.TensorProto.INT4, "conv2.weight_q": onnx.TensorProto.INT8,
                      "fc.weight_q": onnx.TensorProto.INT4}
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {TINY_CNN_INPUT: x[:2]})[0].shape == (2, 10)
    assert result.score < result.int8_score <= result.float_score


def test_a_4_bit_weight_gets_the_fast_bias_correction_of_its_own_error(planted) -> None:
    model, plan, _, _, _ = planted
    index = next(i for i, c in enumerate(plan.weights) if c.node == "fc")
    mixed = with_four_bit_weights(plan, [index])
    node = next(n for n in plan.graph.nodes if n.name == "fc")
    four = four_bit_weight(plan, plan.weights[index])
    expected = channel_bias(node) - weight_error_shift(node, four, plan.input_means["fc"])
    corrected = next(c for c in mixed.corrected_biases if c.node == "fc")
    np.testing.assert_allclose(corrected.values, expected, rtol=1e-6)
    assert not np.allclose(corrected.values, next(c for c in plan.corrected_biases if c.node == "fc").values)
    assert np.abs(four.quantized.astype(np.float32)).max() == 7


def test_a_budget_below_every_weight_in_4_bits_names_the_smallest_reachable(planted) -> None:
    model, plan, metric, float_bytes, _ = planted
    smallest = initializer_bytes(apply_partial(with_four_bit_weights(plan, range(len(plan.weights))), model))
    with pytest.raises(ConfigError, match=rf"keeps {smallest / float_bytes:.3f} of the FP32 model's size \(the "
                                          "smallest reachable\\)"):
        choose_weight_bits(plan, model, metric, 0.01, float_bytes=float_bytes, progress=False)


@pytest.mark.parametrize("criterion", ["metric", "hessian"])
def test_on_the_bundled_model_mixed_bits_beat_4_bits_everywhere(request, criterion: str) -> None:
    """Both criteria: the measured drop of each weight alone in 4 bits, and HAWQ-v2's Hessian trace × 4-bit error
    (through the training runtime, with no evaluation per weight: float, INT8 and the result only)."""
    from onnxcompress.api import quantize_mixed_precision
    from onnxcompress.models import sample_for_model
    from onnxcompress.runtime.model_io import load_model

    if criterion == "hessian":
        request.getfixturevalue("runtime")  # installed, or skipped where it cannot be
    path = Path(__file__).resolve().parents[2] / "models" / "data" / "digits_cnn.onnx"
    test = sample_for_model(path).test_path
    result = quantize_mixed_precision(path, max_size=0.18, metric="top1", eval_data=test, criterion=criterion,
                                      progress=False)
    assert result.size_ratio <= 0.18 and 0 < len(result.four_bit) < len(result.weights)
    if criterion == "hessian":
        # The first convolution (16 values a channel, its error reaching every later layer) costs most by far.
        costs = {w.node: w.drop for w in result.weights}
        assert result.evaluations == 3 and max(costs, key=costs.get) == "conv1"
        assert costs["conv1"] > 3 * max(c for node, c in costs.items() if node != "conv1")
    uniform = apply_partial(with_four_bit_weights(result.plan, range(len(result.plan.weights))),
                            upgrade_opset(load_model(path), INT4_OPSET))
    with np.load(test) as data:
        x, labels = data["input"], data["labels"]
    session = ort.InferenceSession(uniform.SerializeToString(), providers=["CPUExecutionProvider"])
    uniform_top1 = float((session.run(None, {"input": x})[0].argmax(axis=1) == labels).mean())
    assert result.score > uniform_top1
    assert result.float_score - result.score <= 0.01


def test_nodes_sharing_a_weight_share_its_bits_and_one_stored_copy(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    shared = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "shared")
    own = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "own")
    nodes = [helper.make_node("MatMul", ["x", "shared"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "shared"], ["b"], name="second"),
             helper.make_node("MatMul", ["b", "own"], ["y"], name="third")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], [shared, own])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "fp32.onnx")
    x = rng.standard_normal((32, 64)).astype(np.float32)
    float_bytes = initializer_bytes(model)
    model = upgrade_opset(model, INT4_OPSET)
    plan = plan_quantization(model, [{"x": x}], QuantizationConfig(), progress=False)
    metric = resolve_metric("cosine", EvalSet.from_arrays({"x": x}, ["x"]), tmp_path / "fp32.onnx")
    int8_bytes = initializer_bytes(apply_partial(plan, model))
    result = choose_weight_bits(plan, model, metric, (int8_bytes - 64 * 64 // 2) / float_bytes,
                                float_bytes=float_bytes, progress=False)
    bits = {w.node: w.bits for w in result.weights}
    assert bits["first"] == bits["second"]
    levels = [t for t in result.model.graph.initializer if t.name.startswith("shared") and t.name.endswith("_q")]
    assert len(levels) == 1
    assert result.size_bytes <= int8_bytes - 64 * 64 // 2


def test_a_bit_complexity_budget_holds_and_counts_macs_at_the_sample_shapes() -> None:
    """--max-bit-complexity: Σ MACs × bits over the chosen weights is within the budget of the all-INT8 model's,
    with each layer's MACs its weight count times its output positions; below every-weight-4-bit is refused."""
    from onnxcompress.algorithms.quantization.mixed_precision import weight_macs
    from onnxcompress.api import quantize_mixed_precision
    from onnxcompress.errors import ConfigError
    from onnxcompress.runtime.model_io import load_model

    folder = Path(__file__).resolve().parents[2] / "models" / "data"
    result = quantize_mixed_precision(folder / "digits_cnn.onnx", max_bit_complexity=0.7, metric="top1",
                                      eval_data=folder / "digits_test.npz", workers=1, progress=False)
    sample = {"input": np.load(folder / "digits_calib.npz")["input"][:1]}
    macs = weight_macs(result.plan, upgrade_opset(load_model(folder / "digits_cnn.onnx"), INT4_OPSET), sample)
    weights = {t.name: t for t in load_model(folder / "digits_cnn.onnx").graph.initializer}
    fc = next(n for n in load_model(folder / "digits_cnn.onnx").graph.node if n.name == "fc")
    assert macs["fc"] == int(np.prod(weights[fc.input[1]].dims))  # one position: a Gemm on pooled features
    spatial = {node: count / macs["fc"] for node, count in macs.items()}
    assert all(value > 1 for node, value in spatial.items() if node != "fc")  # convolutions apply at many positions
    bits = {w.node: w.bits for w in result.weights}
    expected = sum(macs[n] * bits[n] for n in macs) / (8 * sum(macs.values()))
    assert result.bit_complexity == pytest.approx(expected) and 0.5 <= result.bit_complexity <= 0.7
    assert 0 < len(result.four_bit) < len(result.weights)
    with pytest.raises(ConfigError, match="bit complexity is 0.5 of the all-INT8 model's"):
        quantize_mixed_precision(folder / "digits_cnn.onnx", max_bit_complexity=0.4, progress=False)
    with pytest.raises(ConfigError, match="one budget: max_size or max_bit_complexity"):
        quantize_mixed_precision(folder / "digits_cnn.onnx", max_size=0.2, max_bit_complexity=0.7, progress=False)
