"""Weight compression: the levels follow the scheme's formulas, the file holds 4-bit blocks in the opset-21 form both
runtimes load and fuse (MatMulNBits, compressed FullyConnected), its outputs equal the float model run on the
dequantized tables, and the precision choices follow sensitivity."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.algorithms.weight_compression.oneshot import compress_model
from onnxcompress.algorithms.weight_compression import scheme
from onnxcompress.algorithms.weight_compression.scheme import compress_table
from onnxcompress.config import WeightCompressionConfig, WeightMode
from onnxcompress.errors import WeightCompressionError
from onnxcompress.runtime.openvino import compile_model, heavy_layer_precisions, runtime_precisions
from onnxcompress.runtime.ort_kernels import ort_kernel_summary

VOCAB, HIDDEN, FFN, CLASSES, TOKENS = 50, 256, 512, 10, 6


def build_encoder(opset: int = 17, *, ffn_rows: int = FFN, seed: int = 0) -> onnx.ModelProto:
    """Embedding (Gather) → MatMul [256, 512] → Sigmoid → MatMul [ffn_rows, 256]... → Gemm(transB) head [10, 256]."""
    rng = np.random.default_rng(seed)

    def table(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "up"], ["h"], name="up_proj"),
             helper.make_node("Sigmoid", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "down"], ["d"], name="down_proj"),
             helper.make_node("ReduceMean", ["d"], ["pooled"], name="pool", axes=[1], keepdims=0)
             if opset < 18 else helper.make_node("ReduceMean", ["d", "axes"], ["pooled"], name="pool", keepdims=0),
             helper.make_node("Gemm", ["pooled", "head"], ["logits"], name="classifier", transB=1)]
    initializers = [table("embedding", VOCAB, HIDDEN), table("up", HIDDEN, ffn_rows), table("down", ffn_rows, HIDDEN),
                    table("head", CLASSES, HIDDEN), numpy_helper.from_array(np.array([1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", TOKENS])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", CLASSES])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def ids(count: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (count, TOKENS)).astype(np.int64)


def run(model: onnx.ModelProto, feeds: np.ndarray, *, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": feeds})[0]


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def dequantize_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """DequantizeLinear nodes by the node that reads their output."""
    readers = {i: n.name for n in model.graph.node for i in n.input}
    return {readers[n.output[0]]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}


@pytest.mark.parametrize("mode", list(WeightMode))
def test_levels_follow_the_formulas_and_round_to_nearest(mode: WeightMode) -> None:
    table = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    result = compress_table(table, mode, 32)
    blocks = table.reshape(6, 2, 32)
    levels = result.levels.astype(np.float32).reshape(6, 2, 32)
    if mode is WeightMode.INT4_ASYM:
        assert result.levels.dtype == ml_dtypes.uint4
        np.testing.assert_allclose(result.scale, (blocks.max(-1) - blocks.min(-1)) / 15, rtol=1e-6)
        assert levels.min() == 0 and levels.max() == 15
    else:
        low = -128 if mode is WeightMode.INT8 else -8
        assert result.levels.dtype == (np.int8 if mode is WeightMode.INT8 else ml_dtypes.int4)
        assert result.zero_point is None
        # The value of largest magnitude lands exactly on the lowest level (a negative scale when it is positive).
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        np.testing.assert_allclose(result.scale, extreme / low, rtol=1e-6)
        assert (levels.min(-1) == low).all()
    # Round to nearest: no value is further than half a step from its level, except the few values of the opposite
    # sign beyond high · |step| that clip at the high end.
    step = np.abs(result.scale)[..., None]
    error = np.abs(result.dequantized() - table).reshape(6, 2, 32)
    assert ((error <= step / 2 * (1 + 1e-5)) | (levels == levels.max())).all()
    assert result.relative_error == pytest.approx(((result.dequantized() - table) ** 2).sum() / (table ** 2).sum(),
                                                  rel=1e-4)


def test_the_data_aware_search_lowers_the_weighted_error_on_outlier_features() -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((32, 128)).astype(np.float32)
    table[:, 5] *= 8  # an outlier weight per row widens every block's range...
    importance = np.ones(128, np.float32)
    importance[5] = 1e-3  # ...on a feature that is nearly always zero
    plain = compress_table(table, WeightMode.INT4_SYM, 128)
    searched = compress_table(table, WeightMode.INT4_SYM, 128, importance)
    weighted = [(importance * (r.dequantized() - table) ** 2).sum() for r in (plain, searched)]
    assert weighted[1] < 0.5 * weighted[0]
    assert searched.relative_error < plain.relative_error


@pytest.mark.parametrize("mode", [WeightMode.INT4_SYM, WeightMode.INT4_ASYM])
def test_scale_estimation_lowers_the_error_the_clipping_search_leaves(mode: WeightMode, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    table = rng.standard_normal((64, 256)).astype(np.float32)
    importance = rng.gamma(0.5, size=256).astype(np.float32)
    results = {}
    for refits in (0, scheme.REFITS):
        monkeypatch.setattr(scheme, "REFITS", refits)
        results[refits] = compress_table(table, mode, 64, importance)
    weighted = {k: (importance * (r.dequantized() - table) ** 2).sum() for k, r in results.items()}
    assert weighted[scheme.REFITS] < 0.98 * weighted[0]
    assert results[scheme.REFITS].relative_error == pytest.approx(weighted[scheme.REFITS] /
                                                                  (importance * table ** 2).sum(), rel=1e-4)


def test_int4_file_is_blockwise_opset_21_and_runs_as_the_dequantized_float_model() -> None:
    model = build_encoder()
    original = model.SerializeToString()
    result = compress_model(model, WeightCompressionConfig(mode="int4_sym", group_size=64, all_layers=True),
                            progress=False)
    assert model.SerializeToString() == original
    compressed = result.model
    onnx.checker.check_model(compressed, full_check=True)
    assert next(o.version for o in compressed.opset_import if o.domain == "") == 21
    nodes, tensors = dequantize_nodes(compressed), initializers(compressed)
    layouts = {name: ({a.name: a.i for a in node.attribute}, tensors[node.input[0]], tensors[node.input[1]])
               for name, node in nodes.items()}
    # MatMul [K, N]: blocks along K (axis 0); Gemm transB [N, K] and Gather [rows, features]: along axis 1.
    assert layouts["up_proj"][0] == {"axis": 0, "block_size": 64}
    assert list(layouts["up_proj"][2].dims) == [HIDDEN // 64, FFN]
    assert layouts["classifier"][0] == {"axis": 1, "block_size": 64}
    assert list(layouts["classifier"][2].dims) == [CLASSES, HIDDEN // 64]
    assert layouts["embed"][0] == {"axis": 1, "block_size": 64}
    assert {t.data_type for _, t, _ in layouts.values()} == {TensorProto.INT4}
    assert len(tensors[nodes["up_proj"].input[0]].raw_data) == HIDDEN * FFN // 2  # two levels per byte
    assert result.compressed_bytes < 0.16 * result.float_bytes

    # Outputs equal the float model whose tables are the dequantized levels (ONNX Runtime's own DQ, no fusion).
    reference = build_encoder()
    for table in reference.graph.initializer:
        node = next((n for n in compressed.graph.node if n.op_type == "DequantizeLinear" and
                     n.input[0].startswith(table.name + "_")), None)
        if node is not None:
            dq = onnx.helper.make_graph([node], "dq", [], [helper.make_tensor_value_info(node.output[0],
                                                                                          TensorProto.FLOAT, None)],
                                        [tensors[i] for i in node.input])
            values = ort.InferenceSession(helper.make_model(dq, opset_imports=[helper.make_opsetid("", 21)])
                                          .SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
            table.CopyFrom(numpy_helper.from_array(values, table.name))
    np.testing.assert_allclose(run(compressed, ids(), optimize=False), run(reference, ids()), rtol=1e-4, atol=1e-5)


def test_both_runtimes_run_4_bit_tables_in_compressed_weight_kernels(tmp_path) -> None:
    result = compress_model(build_encoder(), WeightCompressionConfig(mode="int4_asym"), progress=False)
    path = tmp_path / "int4.onnx"
    onnx.save(result.model, path)
    kernels = ort_kernel_summary(path)
    assert kernels.weight_only == {"MatMulNBits": 2}  # the two products; the head is INT8 (a Gemm)
    precisions = heavy_layer_precisions(runtime_precisions(compile_model(path)))
    assert precisions["FullyConnected u4"] == 2, precisions
    reference = run(build_encoder(), ids())
    for output in (run(result.model, ids()), compile_model(path)({"ids": ids()})[0]):
        cosine = (output * reference).sum() / np.linalg.norm(output) / np.linalg.norm(reference)
        assert cosine > 0.97


def test_embeddings_and_the_last_product_stay_int8_unless_all_layers() -> None:
    result = compress_model(build_encoder(), WeightCompressionConfig(mode="int4_sym"), progress=False)
    modes = {layer.node: layer.mode for layer in result.layers}
    assert modes == {"embed": WeightMode.INT8, "up_proj": WeightMode.INT4_SYM, "down_proj": WeightMode.INT4_SYM,
                     "classifier": WeightMode.INT8}
    nodes = dequantize_nodes(result.model)
    assert {a.name: a.i for a in nodes["embed"].attribute} == {"axis": 0}  # one scale per row
    assert {a.name: a.i for a in nodes["classifier"].attribute} == {"axis": 0}  # per output channel of [N, K]


def test_ratio_puts_the_least_sensitive_table_in_4_bits() -> None:
    model = build_encoder()
    down = next(t for t in model.graph.initializer if t.name == "down")
    values = numpy_helper.to_array(down).copy()
    values[::7] *= 30  # rows of outliers: 4-bit blocks lose most of the others' precision
    down.CopyFrom(numpy_helper.from_array(values, "down"))
    result = compress_model(model, WeightCompressionConfig(mode="int4_sym", ratio=0.5), progress=False)
    modes = {layer.node: layer.mode for layer in result.layers}
    assert modes["up_proj"] is WeightMode.INT4_SYM and modes["down_proj"] is WeightMode.INT8


def test_a_group_size_that_does_not_divide_k_falls_back_to_per_channel_with_a_note(caplog) -> None:
    model = build_encoder(ffn_rows=80)  # down_proj's K = 80 is not a multiple of 64
    with caplog.at_level(logging.INFO, logger="onnxcompress"):
        result = compress_model(model, WeightCompressionConfig(mode="int4_sym", group_size=64), progress=False)
    assert result.per_channel_fallbacks == ("down_proj",)
    assert "down_proj: its reduction axis (80 values) is not a multiple of the group size 64" in caplog.text
    node = dequantize_nodes(result.model)["down_proj"]
    assert {a.name: a.i for a in node.attribute} == {"axis": 1}
    assert run(result.model, ids()).shape == (4, CLASSES)


def test_data_lowers_the_output_error() -> None:
    model = build_encoder()
    data = [{"ids": ids(8, seed)} for seed in range(4)]
    reference = run(build_encoder(), ids(16, 9))
    errors = []
    for batches in (None, data):
        result = compress_model(build_encoder(), WeightCompressionConfig(mode="int4_sym", all_layers=True), batches,
                                progress=False)
        errors.append(np.square(run(result.model, ids(16, 9)) - reference).mean())
    assert errors[1] < errors[0]
    assert model.graph == build_encoder().graph


def test_a_model_without_tables_is_refused() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(WeightCompressionError, match="no constant 2-D table"):
        compress_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                       WeightCompressionConfig(), progress=False)


def test_the_command_and_the_api_write_the_same_compressed_model(tmp_path) -> None:
    from test_cli_errors import run_cli

    import onnxcompress

    onnx.save(build_encoder(), tmp_path / "encoder.onnx")
    np.savez(tmp_path / "calib.npz", ids=ids(8))
    result = run_cli(tmp_path, "compress-weights", "encoder.onnx", "--mode", "int4_sym", "--group-size", "64",
                     "--ratio", "0.5", "--data", "calib.npz", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "compressed 4 tables: 3 in int8 (per channel), 1 in int4_sym (group 64)" in result.stdout
    written = onnx.load(tmp_path / "encoder.int4_sym.onnx")
    api = onnxcompress.compress_weights(tmp_path / "encoder.onnx", tmp_path / "calib.npz", mode="int4_sym",
                                        group_size=64, ratio=0.5, progress=False)
    assert written.graph == api.model.graph
    settings = {p.key: p.value for p in written.metadata_props}["onnxcompress.compression"]
    assert '"mode": "int4_sym"' in settings and '"data_aware": true' in settings


def test_a_model_in_external_data_is_compressed_from_its_mapped_file(tmp_path, monkeypatch) -> None:
    import onnxcompress

    source = tmp_path / "source"
    source.mkdir()
    onnx.save(build_encoder(), source / "encoder.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    np.savez(tmp_path / "calib.npz", ids=ids(8))
    settings = {"mode": "int4_asym", "ratio": 0.5, "ignored_scope": {"names": ["classifier"]}}
    expected = compress_model(build_encoder(), WeightCompressionConfig(**settings),
                              [{"ids": ids(8)[i:i + 1]} for i in range(8)], progress=False)
    # Nothing loads the external file the way onnx.load does (every tensor, relative to the working directory).
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model",
                        lambda *a, **k: pytest.fail("the whole model was loaded"))
    result = onnxcompress.compress_weights(source / "encoder.onnx", tmp_path / "calib.npz", progress=False,
                                           **settings)
    assert result.external_source == source / "encoder.onnx"  # the ignored head is still a reference
    assert [layer.mode for layer in result.layers] == [layer.mode for layer in expected.layers]
    (tmp_path / "out").mkdir()
    saved = result.save(tmp_path / "out" / "int4.onnx")
    assert sorted(p.name for p in saved.parent.iterdir()) == ["int4.onnx"]  # small enough to hold its data
    np.testing.assert_array_equal(run(onnx.load(saved), ids()), run(expected.model, ids()))
