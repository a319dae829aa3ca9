import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.transforms.op_table import (
    channel_bias,
    filters,
    input_channels,
    input_layout_known,
    output_channels,
    weight_channel_axis,
)


def _run(op: str, weight: np.ndarray, x: np.ndarray, **attrs) -> np.ndarray:
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"], **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _node(op: str, weight: np.ndarray, bias: np.ndarray | None = None, **attrs) -> gs.Node:
    inputs = [gs.Variable("x"), gs.Constant("w", weight)] + ([gs.Constant("b", bias)] if bias is not None else [])
    return gs.Node(op, "n", attrs, inputs, [gs.Variable("y")])


@pytest.mark.parametrize("op, shape, group", [("Conv", (6, 2, 3, 3), 2), ("ConvTranspose", (4, 3, 3, 3), 2),
                                              ("ConvTranspose", (4, 6, 3, 3), 1)])
def test_filters_are_what_each_output_channel_computes_with(op, shape, group):
    """Output channel o equals the same op run with only o's filter, [in per group, taps] from `filters`, on
    the input channels of o's group."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=shape).astype(np.float32)
    node = _node(op, weight, group=group)
    channels_in, channels_out = input_channels(node), output_channels(node)
    x = rng.normal(size=(1, channels_in, 5, 5)).astype(np.float32)
    y = _run(op, weight, x, group=group)
    assert y.shape[1] == channels_out
    layout = filters(node, weight)
    per_group_in, per_group_out = channels_in // group, channels_out // group
    for o in range(channels_out):
        k = o // per_group_out
        single = layout[o].reshape(per_group_in, 1, *shape[2:])
        if op == "Conv":
            single = single.transpose(1, 0, 2, 3)  # [1 output, inputs, taps]
        alone = _run(op, np.ascontiguousarray(single), x[:, k * per_group_in:(k + 1) * per_group_in])
        np.testing.assert_allclose(y[:, o], alone[:, 0], rtol=1e-5, atol=1e-5)


def test_gemm_facts_follow_trans_b_beta_and_trans_a():
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    plain, transposed = _node("Gemm", weight), _node("Gemm", weight, np.ones(4, np.float32), transB=1, beta=0.5)
    assert (weight_channel_axis(plain), output_channels(plain), input_channels(plain)) == (1, 4, 3)
    assert (weight_channel_axis(transposed), output_channels(transposed), input_channels(transposed)) == (0, 3, 4)
    np.testing.assert_array_equal(filters(transposed, weight)[:, :, 0], weight)
    np.testing.assert_array_equal(channel_bias(plain), np.zeros(4))
    assert channel_bias(transposed) is None  # a bias of 4 values for 3 output channels
    scaled = _node("Gemm", weight, np.full((1, 4), 2, np.float32), beta=0.5)
    np.testing.assert_array_equal(channel_bias(scaled), np.ones(4))
    assert input_layout_known(plain) and not input_layout_known(_node("Gemm", weight, transA=1))
