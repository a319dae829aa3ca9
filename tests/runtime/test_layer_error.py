import subprocess
import sys

import numpy as np
import onnx
from conftest import build_tiny_cnn, make_calib_npz

from onnxcompress.api import quantize
from onnxcompress.runtime.layer_error import format_layer_errors, layer_errors


def test_every_heavy_layer_is_paired_and_quantization_error_shows(tmp_path):
    model = build_tiny_cnn()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    quantized = quantize(model, feeds, progress=False)
    errors = layer_errors(model, quantized, feeds)
    assert [e.op_type for e in errors] == ["Conv", "Conv", "output"]  # the Gemm writes the model output
    assert all(15 < e.sqnr_db < 80 for e in errors)
    identical = layer_errors(model, model, feeds)
    assert all(e.sqnr_db == float("inf") for e in identical)
    assert "model output logits" in format_layer_errors(errors)


def test_compare_command_writes_the_plot(tmp_path):
    float_path, quant_path = tmp_path / "m.onnx", tmp_path / "q.onnx"
    data = make_calib_npz(tmp_path / "d.npz", samples=4)
    onnx.save(build_tiny_cnn(), float_path)
    onnx.save(quantize(build_tiny_cnn(), str(data), progress=False), quant_path)
    result = subprocess.run([sys.executable, "-m", "onnxcompress.cli", "compare", str(float_path), str(quant_path),
                             "--data", str(data), "--plot", str(tmp_path / "p.png")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "SQNR dB" in result.stdout and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_runtime_divergence_profiles_one_file_in_both_runtimes(tmp_path):
    from onnxcompress.runtime.layer_error import runtime_divergence

    model = build_tiny_cnn()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    quantized = quantize(model, feeds, progress=False)
    profile = runtime_divergence(quantized, feeds)
    kinds = [e.op_type for e in profile]
    assert kinds.count("Conv") == 2 and kinds.count("quantizer") >= 4 and kinds[-2:] == ["output", "deployed"]
    assert all(e.sqnr_db > 30 for e in profile)  # OpenVINO f32 and the ONNX semantics agree on this CNN
    # Without quantizers the two runtimes differ only by float rounding.
    float_profile = runtime_divergence(model, feeds)
    assert all(e.sqnr_db > 60 for e in float_profile)


def test_compare_runtimes_takes_one_model(tmp_path):
    data = make_calib_npz(tmp_path / "d.npz", samples=4)
    quant_path = tmp_path / "q.onnx"
    onnx.save(quantize(build_tiny_cnn(), str(data), progress=False), quant_path)
    run = [sys.executable, "-m", "onnxcompress.cli", "compare"]
    result = subprocess.run([*run, str(quant_path), "--runtimes", "--data", str(data), "--plot",
                             str(tmp_path / "r.png")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "quantizer" in result.stdout and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    twice = subprocess.run([*run, str(quant_path), str(quant_path), "--runtimes", "--data", str(data)],
                           capture_output=True, text=True)
    assert twice.returncode == 2 and "compare takes one model with --runtimes, got 2" in twice.stderr
    assert "Traceback" not in twice.stderr


def test_isolation_compiles_each_activation_quantizer_alone():
    """Each entry is the file with one activation quantizer left (weights stay INT8): on a CNN both runtimes
    execute alike, so every entry agrees; the structure of the isolated files is checked directly."""
    from onnxcompress.runtime.layer_error import _keeping, format_isolation, isolate_runtime_divergence

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(3)]
    quantized = quantize(build_tiny_cnn(), feeds, progress=False)
    weights = {i.name for i in quantized.graph.initializer}
    activations = [n.input[0] for n in quantized.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[0] not in weights]
    alone = _keeping(quantized, activations[1])
    assert [n.input[0] for n in alone.graph.node if n.op_type == "QuantizeLinear"
            and n.input[0] not in weights] == [activations[1]]
    onnx.checker.check_model(alone)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] not in weights for n in _keeping(quantized, None).graph.node)
    results = isolate_runtime_divergence(quantized, feeds, progress=False)
    assert sorted(e.tensor for e in results) == sorted(["none", *activations])
    assert all(e.sqnr_db > 30 for e in results)
    assert "weights only (no activation quantizer)" in format_isolation(results)


def test_isolate_needs_runtimes(tmp_path):
    data = make_calib_npz(tmp_path / "d.npz", samples=2)
    quant_path = tmp_path / "q.onnx"
    onnx.save(quantize(build_tiny_cnn(), str(data), progress=False), quant_path)
    result = subprocess.run([sys.executable, "-m", "onnxcompress.cli", "compare", str(quant_path), str(quant_path),
                             "--isolate", "--data", str(data)], capture_output=True, text=True)
    assert result.returncode == 2 and "--isolate works with --runtimes" in result.stderr
    assert "Traceback" not in result.stderr
