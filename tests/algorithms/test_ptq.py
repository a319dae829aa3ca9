"""End-to-end post-training quantization: numbers against float ONNX Runtime, integer kernels in both runtimes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn
from onnx import TensorProto

from onnxcompress.api import quantize
from onnxcompress.errors import ConfigError
from onnxcompress.models.transformer_block import build_transformer_block
from onnxcompress.runtime.evaluate import sqnr_db
from onnxcompress.runtime.openvino import compile_model, int8_summary, runtime_precisions
from onnxcompress.runtime.ort_kernels import ort_kernel_summary

RNG = np.random.default_rng(7)
CALIB = [{"x": RNG.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(32)]
TEST_X = RNG.normal(size=(16, 3, 16, 16)).astype(np.float32)


def _run(model: onnx.ModelProto | str, feed) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.fixture(scope="module")
def cnn_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ptq")
    model = build_tiny_cnn()
    quantized = quantize(model, CALIB, progress=False)
    path = folder / "q.onnx"
    onnx.save(quantized, path)
    return model, quantized, path


def test_cnn_output_close_to_float(cnn_pair):
    model, quantized, _ = cnn_pair
    assert sqnr_db(_run(model, {"x": TEST_X}), _run(quantized, {"x": TEST_X})) > 30


def test_weights_stored_as_int8_without_float_copies(cnn_pair):
    model, quantized, _ = cnn_pair
    float_weights = {i.name for i in model.graph.initializer if len(i.dims) >= 2}
    names = {i.name for i in quantized.graph.initializer}
    assert not float_weights & names
    int8 = [i for i in quantized.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8) == 3  # two convolutions and the Gemm
    floats = sum(np.prod(i.dims) for i in quantized.graph.initializer if i.data_type == TensorProto.FLOAT)
    assert floats < 200  # only scales remain in float


def test_file_leaves_out_what_runtimes_derive(cnn_pair):
    """No stored bias scales (input scale × weight scale is a Mul), Conv weight zero-points or tensor shapes."""
    _, quantized, _ = cnn_pair
    initializers = {i.name: i for i in quantized.graph.initializer}
    produced_by = {output: node for node in quantized.graph.node for output in node.output}
    for node in quantized.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        weight_dq, bias_dq = produced_by[node.input[1]], produced_by[node.input[2]]
        assert len(weight_dq.input) == (3 if node.op_type == "Gemm" else 2)
        assert initializers[bias_dq.input[0]].data_type == TensorProto.INT32
        scale = produced_by[bias_dq.input[1]]
        assert scale.op_type == "Mul" and scale.input[1] == weight_dq.input[1]
        assert scale.input[0] == produced_by[node.input[0]].input[1]  # the input's DequantizeLinear scale
    assert not quantized.graph.value_info  # preprocessing inferred them all


def test_runs_integer_kernels_in_both_runtimes(cnn_pair):
    _, _, path = cnn_pair
    kernels = ort_kernel_summary(path)
    assert kernels.all_integer, kernels.describe()
    assert kernels.integer["QLinearConv"] == 2 and kernels.integer["QGemm"] == 1
    summary = int8_summary(runtime_precisions(compile_model(path)))
    assert summary.all_int8 and summary.heavy_total == 3, summary


def test_openvino_agrees_with_onnxruntime(cnn_pair):
    _, quantized, path = cnn_pair
    ov_out = compile_model(path, precision_hint="f32")({"x": TEST_X})[0]
    assert sqnr_db(_run(quantized, {"x": TEST_X}), ov_out) > 30


@pytest.mark.parametrize("options", [
    {"preset": "mixed"}, {"calibration": "mean_minmax"}, {"calibration": "percentile"}, {"calibration": "mse"},
    {"bias_correction": "none"}, {"bias_correction": "full"}, {"weight_bits": 4},
])
def test_variants_stay_close_to_float(options):
    model = build_tiny_cnn()
    quantized = quantize(model, CALIB, progress=False, **options)
    floor = 15 if options.get("weight_bits") == 4 else 28
    assert sqnr_db(_run(model, {"x": TEST_X}), _run(quantized, {"x": TEST_X})) > floor


def test_bias_correction_reduces_mean_output_error():
    model = build_tiny_cnn(seed=3)
    reference = _run(model, {"x": TEST_X})
    errors = {}
    for mode in ("none", "full"):
        out = _run(quantize(model, CALIB, progress=False, bias_correction=mode), {"x": TEST_X})
        errors[mode] = np.abs((out - reference).mean(axis=0)).mean()
    assert errors["full"] < errors["none"]


def _linear_chain(depth: int, width: int = 32) -> onnx.ModelProto:
    """Gemm layers with no activation between them: every layer's output error propagates linearly."""
    rng = np.random.default_rng(11)
    weights = [onnx.numpy_helper.from_array((rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32),
                                            f"w{i}") for i in range(depth)]
    nodes = [onnx.helper.make_node("Gemm", ["x" if i == 0 else f"h{i}", f"w{i}"],
                                   [f"h{i + 1}" if i < depth - 1 else "y"], transB=1) for i in range(depth)]
    graph = onnx.helper.make_graph(nodes, "chain", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                                   [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], weights)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_full_bias_correction_does_not_correct_upstream_error_twice():
    model = _linear_chain(depth=6)
    rng = np.random.default_rng(5)
    calib = [{"x": (1 + rng.normal(size=(1, 32))).astype(np.float32)} for _ in range(64)]
    test = (1 + rng.normal(size=(256, 32))).astype(np.float32)
    reference = np.concatenate([_run(model, {"x": row[None]}) for row in test])
    mean_error = {}
    for mode in ("none", "full"):
        quantized = quantize(model, calib, progress=False, bias_correction=mode, weight_bits=4)
        out = np.concatenate([_run(quantized, {"x": row[None]}) for row in test])
        mean_error[mode] = np.abs((out - reference).mean(axis=0)).mean()
    # Each layer removes its own shift; counting upstream shifts again would leave a larger opposite one.
    assert mean_error["full"] < 0.5 * mean_error["none"], mean_error


def test_full_bias_correction_pass_reads_only_its_subset():
    class CountingDataset:
        def __init__(self):
            self.reads = 0

        def __len__(self):
            return len(CALIB)

        def __iter__(self):
            for feed in CALIB:
                self.reads += 1
                yield feed

    dataset = CountingDataset()
    quantize(build_tiny_cnn(), dataset, progress=False, bias_correction="full", bias_correction_subset_size=8,
             batch_size=1)
    assert dataset.reads == len(CALIB) + 8


def test_mixed_preset_aligns_zero_points():
    quantized = quantize(build_tiny_cnn(), CALIB, progress=False, preset="mixed")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in quantized.graph.initializer}
    for node in quantized.graph.node:
        if node.op_type == "QuantizeLinear":
            assert inits[node.input[2]].dtype == np.uint8


def test_signed_activations_are_uint8_plus_128_where_compute_ops_read_them_else_int8(cnn_pair):
    _, quantized, _ = cnn_pair
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in quantized.graph.initializer}
    readers = {}
    for node in quantized.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    stored = {}
    for q in (n for n in quantized.graph.node if n.op_type == "QuantizeLinear"):
        dequantized = readers[q.output[0]][0].output[0]
        ops = {r.op_type for r in readers.get(dequantized, [])}
        stored[q.input[0]] = (inits[q.input[2]].dtype, int(inits[q.input[2]]), ops)
    # Compute ops read uint8 (signed levels shifted by 128: the signed model input feeding a Conv) ...
    assert stored["x"][:2] == (np.uint8, 128)
    assert all(dtype == np.uint8 for dtype, _, ops in stored.values() if ops & {"Conv", "Gemm", "MatMul"})
    # ... while signed tensors only added (the Conv output into the residual Add) stay int8.
    assert any(dtype == np.int8 and zero_point == 0 and ops == {"Add"} for dtype, zero_point, ops in stored.values())
    transformer = quantize(build_transformer_block(), [{"tokens": np.random.default_rng(0).normal(
        size=(1, 8, 64)).astype(np.float32)} for _ in range(8)], progress=False, model_type="transformer")
    zero_points = [onnx.numpy_helper.to_array(i) for i in transformer.graph.initializer if i.name.endswith("_zp")]
    assert any(z.ndim == 0 and int(z) == 128 and z.dtype == np.uint8 for z in zero_points)


def test_ignored_scope_leaves_gemm_float_and_rejects_unmatched_entries():
    quantized = quantize(build_tiny_cnn(), CALIB, progress=False, ignored_scope={"types": ["Gemm"]})
    gemm = next(n for n in quantized.graph.node if n.op_type == "Gemm")
    assert not any(i.endswith("dequantized") for i in gemm.input)
    with pytest.raises(ConfigError, match="match no node: name 'nope', type 'Softmax'"):
        quantize(build_tiny_cnn(), CALIB, progress=False, ignored_scope={"names": ["nope"], "types": ["Softmax"]})


def test_ops_missing_from_the_op_table_stay_float_and_the_rest_is_quantized(tmp_path):
    model = build_tiny_cnn()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "Softplus"  # a standard op onnxcompress has no rule for
    quantized = quantize(model, CALIB, progress=False)
    path = tmp_path / "q.onnx"
    onnx.save(quantized, path)
    softplus = next(n for n in quantized.graph.node if n.op_type == "Softplus")
    assert softplus.input[0].endswith("_dq")  # reads the quantized Conv output, computes in float
    assert sqnr_db(_run(model, {"x": TEST_X}), _run(quantized, {"x": TEST_X})) > 28
    assert ort_kernel_summary(path).all_integer


def test_transformer_block_quantizes_and_runs_in_both_runtimes(tmp_path):
    model = build_transformer_block()
    rng = np.random.default_rng(1)
    calib = [{"tokens": rng.normal(size=(1, int(rng.integers(6, 20)), 64)).astype(np.float32)} for _ in range(24)]
    quantized = quantize(model, calib, progress=False, model_type="transformer")
    path = tmp_path / "t.onnx"
    onnx.save(quantized, path)
    x = rng.normal(size=(2, 11, 64)).astype(np.float32)
    reference = _run(model, {"tokens": x})
    assert sqnr_db(reference, _run(quantized, {"tokens": x})) > 25
    assert sqnr_db(reference, compile_model(path, precision_hint="f32")({"tokens": x})[0]) > 25
    kernels = ort_kernel_summary(path)
    assert kernels.all_integer and sum(kernels.integer.values()) == 8, kernels.describe()
    summary = int8_summary(runtime_precisions(compile_model(path)))
    assert summary.by_type["FullyConnected"] == (6, 6)


def test_smooth_quant_keeps_float_function_and_helps_outlier_channels():
    model = build_transformer_block()
    rng = np.random.default_rng(2)

    def tokens(n):
        x = rng.normal(size=(1, n, 64)).astype(np.float32)
        x[..., :3] *= 40  # outlier channels, as in real transformers
        return x

    calib = [{"tokens": tokens(12)} for _ in range(24)]
    x = np.concatenate([tokens(12) for _ in range(4)])
    reference = _run(model, {"tokens": x})
    plain = quantize(model, calib, progress=False, model_type="transformer", bias_correction="none",
                     smooth_quant=False)
    smoothed = quantize(model, calib, progress=False, model_type="transformer", bias_correction="none",
                        smooth_quant_alpha=0.5)
    assert sqnr_db(reference, _run(smoothed, {"tokens": x})) > sqnr_db(reference, _run(plain, {"tokens": x}))
    ln = next(n for n in smoothed.graph.node if n.op_type == "LayerNormalization")
    gamma = next(i for i in smoothed.graph.initializer if i.name == ln.input[1])
    assert not np.allclose(onnx.numpy_helper.to_array(gamma), 1.0)  # the migration was folded into LayerNorm


def test_quantizers_no_compute_op_reads_use_mean_per_sample_ranges():
    """Conv outputs into a Concat (quantized only for QLinearConv) take the mean of per-sample extremes, so one
    outlier sample does not stretch their range; the Conv input keeps the plain min-max range."""
    from onnx import helper, numpy_helper

    weight = np.ones((1, 1, 1, 1), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
         helper.make_node("Concat", ["a", "x"], ["y"], name="concat", axis=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    maxima = [1.0, 1.0, 1.0, 9.0]  # per-sample maxima; all values are non-negative
    feeds = [{"x": np.full((1, 1, 2, 2), m, np.float32) * np.array([0, 0.5, 0.75, 1], np.float32).reshape(1, 1, 2, 2)}
             for m in maxima]
    quantized = quantize(model, feeds, progress=False, bias_correction="none")
    scales = {i.name: float(onnx.numpy_helper.to_array(i)) for i in quantized.graph.initializer
              if i.name in ("a_scale", "x_scale")}
    assert scales["x_scale"] == pytest.approx(9.0 / 255)  # read by the Conv: min-max
    assert scales["a_scale"] == pytest.approx(np.mean(maxima) / 255)  # read only by the Concat


def test_export_for_calibration_leaves_large_constants_out_and_restores_them():
    import onnx_graphsurgeon as gs
    from onnx import helper, numpy_helper

    from onnxcompress.algorithms.quantization.ptq import export_for_calibration, export_graph

    big = np.arange(64 * 128, dtype=np.float32).reshape(64, 128)  # 32 KiB: left out
    small = np.ones(128, np.float32)  # 512 B: stays in the proto
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
        [numpy_helper.from_array(big, "w"), numpy_helper.from_array(small, "b")]))
    graph = gs.import_onnx(model)
    exported, weights = export_for_calibration(graph, model)
    stored = {t.name: t for t in exported.graph.initializer}
    assert stored["w"].data_location == TensorProto.EXTERNAL and not stored["w"].raw_data
    assert list(stored["w"].dims) == [64, 128]
    np.testing.assert_array_equal(weights["w"], big)
    assert "b" not in weights and numpy_helper.to_array(stored["b"]).tolist() == small.tolist()
    restored = {t.name: t for t in export_graph(graph, model).graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(restored["w"]), big)


@pytest.mark.parametrize("batch_dim", [-1, 0])
def test_negative_or_zero_dims_are_unknown_dims(batch_dim):
    """Paddle2ONNX writes dim_value -1 for a dynamic batch (runtimes read it as dynamic); calibration reads both."""
    from onnxcompress.data import model_inputs

    model = build_tiny_cnn(dynamic_spatial=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = batch_dim
    assert model_inputs(model)[0].shape == (None, 3, None, None)
    feeds = [{"x": RNG.normal(size=(1, 3, 16 + 4 * (i % 3), 20)).astype(np.float32)} for i in range(6)]
    quantized = quantize(model, feeds, progress=False)
    assert model_inputs(quantized)[0].shape == (None, 3, None, None)  # still dynamic, now by name
    # ONNX Runtime refuses a batch of 1 for a literal 0, so the reference is the same model with dynamic dims.
    reference, result = _run(build_tiny_cnn(dynamic_spatial=True), feeds[2]), _run(quantized, feeds[2])
    assert sqnr_db(reference, result) > 15


def test_smooth_quant_scales_a_shared_activation_for_its_matmuls_only():
    """A post-LN block's LayerNorm output also feeds the residual Add: the migration becomes a Mul read by the
    MatMul alone, the residual keeps the original tensor, and the float function is unchanged."""
    import onnx_graphsurgeon as gs
    from conftest import build_post_ln_block

    from onnxcompress.algorithms.quantization.smooth_quant import smoothing_commands, smoothing_targets
    from onnxcompress.runtime.calibration import TensorStatistics
    from onnxcompress.transforms.applier import apply_commands
    from onnxcompress.transforms.passes import preprocess

    rng = np.random.default_rng(4)
    model = build_post_ln_block(seed=4)
    x = rng.normal(size=(1, 4, 8)).astype(np.float32)
    reference = _run(model, {"x": x})
    graph = preprocess(model)
    targets = smoothing_targets(graph, frozenset())
    assert [(t.tensor, t.matmuls, t.layer_norm) for t in targets] == [("ln", ("dense",), None)]
    stats = {"ln": TensorStatistics(channel_abs_max=rng.uniform(0.1, 30, 8).astype(np.float32))}
    apply_commands(graph, smoothing_commands(graph, targets, stats, alpha=0.8))
    nodes = {n.name: n for n in graph.nodes}
    assert nodes["dense"].inputs[0].inputs[0].op == "Mul" and nodes["residual"].inputs[0].name == "ln"
    smoothed = gs.export_onnx(graph)
    np.testing.assert_allclose(_run(smoothed, {"x": x}), reference, rtol=1e-4, atol=1e-4)


def test_signed_conv_output_read_by_a_float_activation_is_stored_uint8_and_fuses_in_ort(tmp_path):
    """A Conv output quantized for QLinearConv and read by SiLU's Sigmoid/Mul is stored as uint8 + 128, the type of
    the Conv's input, so ONNX Runtime fuses every Conv (int8 left them in float)."""
    from onnx import numpy_helper
    from test_placement import _silu_conv_model

    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    quantized = quantize(_silu_conv_model(dynamic=False), feeds, progress=False)
    quantizers = {n.input[0]: n for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    zero_points = {i.name: i for i in quantized.graph.initializer}
    assert zero_points[quantizers["c1"].input[2]].data_type == TensorProto.UINT8
    assert numpy_helper.to_array(zero_points[quantizers["c1"].input[2]]) == 128
    path = tmp_path / "q.onnx"
    onnx.save(quantized, path)
    assert ort_kernel_summary(path).describe().startswith("integer kernels: QLinearConv×2")


def test_per_layer_weight_bits_store_the_4_bit_layer_as_int4_in_float_evaluation() -> None:
    """layer_weight_bits sets one layer's bits: that weight takes 4-bit levels stored as INT4 (opset 21), the
    others stay INT8, and the file runs; a name with no quantized weight is refused with the known ones."""
    model = build_tiny_cnn()
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    quantized = quantize(model, [{TINY_CNN_INPUT: x}], layer_weight_bits={"conv2": 4}, progress=False)
    assert max(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) == 21
    consumers = {n.input[0]: n for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    types = {}
    for tensor in quantized.graph.initializer:
        node = consumers.get(tensor.name)
        if node is not None and tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8):
            reader = next(n.name for n in quantized.graph.node if node.output[0] in n.input)
            types[reader] = tensor.data_type
    assert types.pop("conv2") == onnx.TensorProto.INT4 and set(types.values()) == {onnx.TensorProto.INT8}
    levels = next(onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer
                  if t.data_type == onnx.TensorProto.INT4)
    assert levels.astype(np.int32).min() >= -8 and levels.astype(np.int32).max() <= 7
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, ref = session.run(None, {TINY_CNN_INPUT: x})[0], reference.run(None, {TINY_CNN_INPUT: x})[0]
    assert np.linalg.norm(out - ref) < 0.5 * np.linalg.norm(ref)
    with pytest.raises(ConfigError, match=r"layer_weight_bits names nodes with no quantized weight: relu1 "
                                          r"\(quantized weights: conv1, "):
        quantize(model, [{TINY_CNN_INPUT: x}], layer_weight_bits={"relu1": 4}, progress=False)
