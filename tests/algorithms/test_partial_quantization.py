"""A quantization plan applied with units left in float: none left out is `quantize` itself, all left out is the
float model, one left out removes exactly its quantizers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn

from onnxcompress.algorithms.quantization.partial import UnitKind, apply_partial, quantizer_units
from onnxcompress.algorithms.quantization.ptq import plan_quantization
from onnxcompress.api import quantize
from onnxcompress.config import QuantizationConfig


@pytest.fixture()
def setup() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], QuantizationConfig]:
    model = build_tiny_cnn()
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    rng = np.random.default_rng(0)
    feeds = [{TINY_CNN_INPUT: rng.standard_normal((4, *shape)).astype(np.float32)} for _ in range(4)]
    return model, feeds, QuantizationConfig()


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_no_unit_left_out_is_quantize_and_all_left_out_is_the_float_model(setup) -> None:
    model, feeds, config = setup
    plan = plan_quantization(model, feeds, config, progress=False)
    units = quantizer_units(plan)
    assert {u.kind for u in units} == {UnitKind.WEIGHT, UnitKind.ACTIVATIONS}
    full = apply_partial(plan, model)
    assert full.graph == quantize(model, feeds, config, progress=False).graph
    none = apply_partial(plan, model, units)
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(_ops(none))
    np.testing.assert_allclose(_run(none, feeds[0]), _run(model, feeds[0]), rtol=1e-5, atol=1e-5)
    assert apply_partial(plan, model).graph == full.graph  # the plan's graph was not edited


def test_one_unit_left_out_removes_only_its_quantizers(setup) -> None:
    model, feeds, config = setup
    plan = plan_quantization(model, feeds, config, progress=False)
    full = apply_partial(plan, model)
    weight = next(u for u in quantizer_units(plan) if u.kind is UnitKind.WEIGHT)
    without_weight = apply_partial(plan, model, [weight])
    node = next(n for n in without_weight.graph.node if n.name == weight.label)
    initializers = {i.name: i for i in without_weight.graph.initializer}
    assert initializers[node.input[1]].data_type == onnx.TensorProto.FLOAT  # the float weight, read directly
    assert _ops(full).count("DequantizeLinear") > _ops(without_weight).count("DequantizeLinear")
    group = next(u for u in quantizer_units(plan) if u.kind is UnitKind.ACTIVATIONS)
    without_group = apply_partial(plan, model, [group])
    quantized = {n.input[0] for n in without_group.graph.node if n.op_type == "QuantizeLinear"}
    assert not set(group.label.split(", ")) & quantized
    assert _ops(full).count("QuantizeLinear") - _ops(without_group).count("QuantizeLinear") == len(
        plan.activation_groups[group.index])
