"""OpenVINO export, compilation and runtime-precision inspection on the tiny CNN and its QDQ INT8 version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
from conftest import build_tiny_cnn, save_tiny_cnn_models
from onnx import TensorProto, helper

from onnxcompress.errors import BenchmarkError, ExportError, ModelLoadError, OutputError
from onnxcompress.runtime.openvino import (
    Int8Summary,
    LayerPrecision,
    compile_model,
    export_openvino,
    int8_summary,
    runtime_precisions,
)

INPUT_SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_cnn_models(tmp_path_factory.mktemp("ov_models"))


def _ort_output(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _ov_output(compiled: ov.CompiledModel, x: np.ndarray) -> np.ndarray:
    return compiled(x)[compiled.output(0)]


def _batch(size: int = 2) -> np.ndarray:
    return np.random.default_rng(2).standard_normal((size, *INPUT_SHAPE)).astype(np.float32)


# ------------------------------------------------------------------------------------------------- export


def test_export_writes_ir_that_matches_onnxruntime(models, tmp_path):
    xml = export_openvino(models["fp32"], tmp_path / "ir")
    assert xml == tmp_path / "ir" / "tiny_fp32.xml"
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["tiny_fp32.bin", "tiny_fp32.xml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ir"], "staging folder left behind"
    assert xml.with_suffix(".bin").stat().st_size > 0

    read_back = ov.Core().read_model(str(xml))
    assert [i.get_any_name() for i in read_back.inputs] == ["x"]
    compiled = compile_model(xml, precision_hint="f32")
    x = _batch(3)
    np.testing.assert_allclose(_ov_output(compiled, x), _ort_output(models["fp32"], x), rtol=1e-4, atol=1e-5)


def test_export_modelproto_with_name_and_overwrite(models, tmp_path):
    proto = onnx.load(str(models["int8"]))
    first = export_openvino(proto, tmp_path, name="quantized")
    second = export_openvino(proto, tmp_path, name="quantized")  # replacing an existing pair must work
    assert first == second == tmp_path / "quantized.xml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized.bin", "quantized.xml"]
    assert len(proto.graph.initializer) > 0, "the caller's ModelProto must not be modified"

    x = _batch(2)
    compiled = compile_model(second, precision_hint="f32")
    # Same INT8 arithmetic on both engines; allow one quantization step of difference in the output.
    np.testing.assert_allclose(_ov_output(compiled, x), _ort_output(models["int8"], x), atol=0.05)
    # The tolerance alone cannot tell INT8 from float here (they differ by less), so check the kernels directly.
    assert int8_summary(runtime_precisions(compiled)).all_int8


def test_export_default_name_from_graph(tmp_path):
    xml = export_openvino(build_tiny_cnn(), tmp_path / "out")
    assert xml.name == "tiny_cnn.xml" and xml.with_suffix(".bin").is_file()


def test_export_under_regular_file_fails_cleanly(models, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("keep me")
    with pytest.raises((ExportError, OutputError)) as info:
        export_openvino(models["fp32"], blocker / "ir")
    assert "not_a_dir" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["not_a_dir"]
    assert blocker.read_text() == "keep me"


def test_export_conversion_failure_leaves_nothing(tmp_path):
    """An op of a custom domain passes the ONNX checker and fails in OpenVINO's conversion; an unknown standard
    op fails the checker, before any conversion."""
    def model_with(domain: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node("NoSuchOp", ["x"], ["y"], domain=domain)], "broken",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        )
        imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
        model = helper.make_model(graph, opset_imports=imports)
        model.ir_version = 8
        return model

    broken = tmp_path / "broken.onnx"
    onnx.save(model_with("example.custom"), str(broken))
    with pytest.raises(ExportError, match="NoSuchOp"):
        export_openvino(broken, tmp_path / "new" / "deeper" / "ir")
    onnx.save(model_with(""), str(broken))
    with pytest.raises(ModelLoadError, match="No Op registered for NoSuchOp"):
        export_openvino(broken, tmp_path / "new" / "deeper" / "ir")
    assert [p.name for p in tmp_path.iterdir()] == ["broken.onnx"], "created folders or staging left behind"


def test_export_missing_model_and_bad_name(models, tmp_path):
    with pytest.raises(ExportError, match="not found"):
        export_openvino(tmp_path / "missing.onnx", tmp_path / "ir")
    with pytest.raises(OutputError):
        export_openvino(models["fp32"], tmp_path / "ir", name="../escape")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ compile


def test_compile_model_applies_hints(models):
    compiled = compile_model(
        onnx.load(str(models["fp32"])), precision_hint="f32", performance_hint="THROUGHPUT", num_streams=1,
        shapes={"x": (4, *INPUT_SHAPE)},
    )
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert str(compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    assert compiled.get_property("NUM_STREAMS") == 1
    assert compiled.input(0).get_shape() == [4, *INPUT_SHAPE]


def test_compile_model_default_precision_is_plugin_default(models):
    compiled = compile_model(models["fp32"])
    plugin_default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == plugin_default


def test_compile_model_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="not found"):
        compile_model(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    with pytest.raises(BenchmarkError):
        compile_model(garbage)


# ------------------------------------------------------------------------------------- runtime precisions


@pytest.mark.parametrize("hint", [None, "f32"])
def test_qdq_model_runs_every_conv_and_fc_in_int8(models, hint):
    layers = runtime_precisions(compile_model(models["int8"], precision_hint=hint))
    summary = int8_summary(layers)
    assert summary.all_int8, summary
    assert summary.by_type == {"Convolution": (2, 2), "FullyConnected": (1, 1)}
    assert summary.not_int8 == () and summary.other_count == 0
    convs = [layer for layer in layers if layer.layer_type == "Convolution"]
    assert {layer.runtime_precision for layer in convs} <= {"u8", "i8"}
    assert all(layer.is_int8 and "I8" in layer.primitive_type for layer in convs)


def test_float_model_runs_no_layer_in_int8(models):
    f32_layers = runtime_precisions(compile_model(models["fp32"], precision_hint="f32"))
    summary = int8_summary(f32_layers)
    assert summary.heavy_total == 3 and summary.int8_count == 0 and not summary.all_int8
    assert set(summary.not_int8_precisions) == {"f32"}
    assert len(summary.not_int8) == 3

    default_summary = int8_summary(runtime_precisions(compile_model(models["fp32"])))
    assert default_summary.int8_count == 0
    plugin_default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    assert set(default_summary.not_int8_precisions) == {plugin_default}  # bf16 on AVX512-BF16 machines


def test_runtime_precisions_records_fused_onnx_names(models):
    layers = runtime_precisions(compile_model(models["fp32"], precision_hint="f32"))
    assert all(isinstance(layer, LayerPrecision) for layer in layers)
    types = {layer.layer_type for layer in layers}
    assert {"Input", "Output", "Convolution", "FullyConnected"} <= types
    first_conv = next(layer for layer in layers if layer.layer_type == "Convolution")
    assert {"bn1", "relu1"} <= set(first_conv.original_names)  # BatchNormalization and Relu fused into conv1
    with pytest.raises(dataclasses.FrozenInstanceError):
        first_conv.runtime_precision = "u8"  # type: ignore[misc]


def test_int8_summary_counts_and_lists_fallbacks():
    layers = [
        LayerPrecision("conv_a", "Convolution", "u8"),
        LayerPrecision("conv_b", "Convolution", "bf16"),
        LayerPrecision("mm", "MatMul", "f32"),
        LayerPrecision("fc", "FullyConnected", "i8"),
        LayerPrecision("relu", "Eltwise", "f32"),
    ]
    summary = int8_summary(layers)
    assert isinstance(summary, Int8Summary)
    assert (summary.heavy_total, summary.int8_count, summary.other_count) == (4, 2, 2)
    assert summary.not_int8 == ("conv_b", "mm") and summary.not_int8_precisions == ("bf16", "f32")
    assert summary.by_type == {"Convolution": (1, 2), "FullyConnected": (1, 1), "MatMul": (0, 1)}
    assert not summary.all_int8
    assert not int8_summary([]).all_int8
    assert int8_summary(layers, heavy_types={"FullyConnected"}).all_int8
