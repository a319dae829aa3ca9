"""Interleaved OpenVINO / ONNX Runtime benchmark on the tiny CNN (float and our QDQ INT8)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import save_tiny_cnn_models
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import BenchmarkError, OutputError
from onnxcompress.runtime.cpu import CpuFeatures, cpu_features, features_from_flags
from onnxcompress.runtime.benchmark import BenchmarkReport, Measurement, benchmark, format_report, plot_report

INPUT_SHAPE = (3, 16, 16)
MODES_BACKENDS = [
    ("latency", "ov-f32"), ("latency", "ov-default"), ("latency", "ort"),
    ("throughput", "ov-f32"), ("throughput", "ov-default"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_cnn_models(tmp_path_factory.mktemp("bench_models"))


@pytest.fixture(scope="module")
def report(models) -> BenchmarkReport:
    return benchmark(models, batch=2, rounds=2, round_seconds=0.2, progress=False)


def _model_with_sequence_dim(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["tokens"], ["out"])], "seq",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "sequence"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------------------- real benchmark


def test_every_variant_is_measured_and_labelled(report):
    expected = [f"{model}/{backend}/{mode}" for mode, backend in MODES_BACKENDS for model in ("fp32", "int8")]
    assert sorted(report.variants) == sorted(expected)
    for m in report.measurements:
        assert m.variant == f"{m.model}/{m.backend}/{m.mode}"
        assert m.batch == 2 and m.rounds == 2 and m.samples >= 2
        for value in (m.median_ms, m.p90_ms, m.throughput_fps):
            assert math.isfinite(value) and value > 0, m
        assert m.p90_ms >= m.median_ms
        assert m.engine == ("onnxruntime" if m.backend == "ort" else "openvino")
        if m.mode == "throughput":
            assert m.infer_requests >= 1
        else:
            assert m.infer_requests == 1


def test_kernels_show_what_each_precision_variant_ran(report):
    assert report.get("fp32/ov-f32/latency").kernels == "f32x3"
    default_precision = report.environment["openvino_default_precision"]
    assert report.get("fp32/ov-default/latency").kernels == f"{default_precision}x3"
    for backend in ("ov-f32", "ov-default"):  # the f32 hint leaves INT8 kernels alone
        kernels = report.get(f"int8/{backend}/latency").kernels
        assert set(part.split("x")[0] for part in kernels.split()) <= {"u8", "i8"}, kernels
    assert report.get("int8/ort/latency").kernels == ""


def test_ratios_are_relative_to_the_baseline(report):
    like_for_like = report.ratios("fp32")
    for mode, backend in MODES_BACKENDS:
        assert like_for_like[f"fp32/{backend}/{mode}"] == 1.0
        assert like_for_like[f"int8/{backend}/{mode}"] > 0
    against_f32 = report.ratios("fp32/ov-f32")
    assert against_f32["fp32/ov-f32/latency"] == 1.0 and against_f32["fp32/ov-f32/throughput"] == 1.0
    int8_lat, fp32_lat = report.get("int8/ov-default/latency"), report.get("fp32/ov-f32/latency")
    assert against_f32["int8/ov-default/latency"] == pytest.approx(fp32_lat.median_ms / int8_lat.median_ms)
    only_throughput = report.ratios("fp32/ov-default/throughput")
    assert set(only_throughput) == {v for v in report.variants if v.endswith("/throughput")}
    with pytest.raises(KeyError):
        report.ratios("nonexistent")


def test_format_report_names_variants_and_baselines(report):
    text = format_report(report, "fp32")
    for variant in report.variants:
        assert variant in text
    for column in ("vs fp32/ov-f32", "vs fp32/ov-default", "vs fp32/ort", "median ms", "fps"):
        assert column in text
    assert "INFERENCE_PRECISION_HINT=f32" in text
    assert f"CPU plugin default: {report.environment['openvino_default_precision']}" in text
    features = cpu_features()
    assert f"VNNI {'yes' if features.vnni else 'no'}" in text and f"bf16 {'yes' if features.bf16 else 'no'}" in text
    baseline_row = next(line for line in text.splitlines() if line.startswith("fp32/ov-f32/latency "))
    assert "1.00x" in baseline_row
    single = format_report(report, "fp32/ov-default")
    assert "vs fp32/ov-default" in single and "vs fp32/ov-f32" not in single
    with pytest.raises(BenchmarkError):
        format_report(report, "resnet")


def test_report_serialises_to_json(report):
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rounds"] == 2 and data["batch"] == 2
    assert {m["variant"] for m in data["measurements"]} == set(report.variants)
    assert Measurement(**data["measurements"][0]) == report.measurements[0]
    assert data["environment"]["openvino"] and data["environment"]["onnxruntime"]


def test_plot_report_writes_png_atomically(report, tmp_path):
    target = plot_report(report, tmp_path / "plots" / "bench.png")
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in target.parent.iterdir()] == ["bench.png"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        plot_report(report, blocker / "bench.png")


# ------------------------------------------------------------------------------------------------- inputs


def test_dynamic_non_batch_dimension_needs_inputs(tmp_path):
    path = _model_with_sequence_dim(tmp_path / "seq.onnx")
    with pytest.raises(BenchmarkError, match="tokens") as info:
        benchmark({"seq": path}, rounds=1, round_seconds=0.05, progress=False)
    assert "sequence" in str(info.value)

    given = {"tokens": np.ones((3, 7), dtype=np.float32)}
    report = benchmark(
        {"seq": path}, batch=3, rounds=1, round_seconds=0.05, openvino_precisions=("f32",),
        include_throughput=False, inputs=given, progress=False,
    )
    assert report.variants == ["seq/ov-f32/latency", "seq/ort/latency"]
    assert all(math.isfinite(m.median_ms) for m in report.measurements)


def test_given_inputs_are_validated(models):
    with pytest.raises(BenchmarkError, match="'x' is missing"):
        benchmark(models, inputs={"other": np.zeros((1, 3), np.float32)}, progress=False)
    with pytest.raises(BenchmarkError, match="float32"):
        benchmark(models, inputs={"x": np.zeros((1, *INPUT_SHAPE), np.float64)}, progress=False)
    with pytest.raises(BenchmarkError, match="dimension 0"):
        benchmark(models, batch=4, inputs={"x": np.zeros((1, *INPUT_SHAPE), np.float32)}, progress=False)


def test_bad_arguments(models, tmp_path):
    with pytest.raises(BenchmarkError, match="rounds"):
        benchmark(models, rounds=0, progress=False)
    for endless in (float("inf"), float("nan"), 1e9):  # a round that never ends, or never starts
        with pytest.raises(BenchmarkError, match="round_seconds <= 3600"):
            benchmark(models, round_seconds=endless, progress=False)
    with pytest.raises(BenchmarkError, match="not found"):
        benchmark({"ghost": tmp_path / "ghost.onnx"}, progress=False)
    with pytest.raises(BenchmarkError, match="nothing to measure"):
        benchmark(models, openvino_precisions=(), include_ort=False, progress=False)
    with pytest.raises(BenchmarkError, match="'/'"):
        benchmark({"a/b": models["fp32"]}, progress=False)


# ------------------------------------------------------------------------------------- arithmetic (no engine)


def _m(model: str, backend: str, mode: str, ms: float, fps: float) -> Measurement:
    return Measurement(
        variant=f"{model}/{backend}/{mode}", model=model, engine="openvino", backend=backend, precision="x",
        mode=mode, batch=1, median_ms=ms, p90_ms=ms, throughput_fps=fps, samples=10, rounds=2,
        infer_requests=1, kernels="",
    )


def test_ratio_arithmetic_on_synthetic_report():
    synthetic = BenchmarkReport(
        measurements=(
            _m("fp32", "ov-f32", "latency", 4.0, 250.0), _m("fp32", "ov-default", "latency", 2.0, 500.0),
            _m("int8", "ov-f32", "latency", 1.0, 1000.0), _m("int8", "ov-default", "latency", 1.0, 1000.0),
            _m("fp32", "ov-f32", "throughput", 8.0, 400.0), _m("int8", "ov-default", "throughput", 4.0, 1600.0),
        ),
        batch=1, rounds=2, round_seconds=1.0,
    )
    assert synthetic.ratios("fp32") == {
        "fp32/ov-f32/latency": 1.0, "fp32/ov-default/latency": 1.0,
        "int8/ov-f32/latency": 4.0, "int8/ov-default/latency": 2.0, "fp32/ov-f32/throughput": 1.0,
    }
    assert synthetic.ratios("fp32/ov-f32")["int8/ov-default/latency"] == 4.0
    assert synthetic.ratios("fp32/ov-f32")["int8/ov-default/throughput"] == 4.0
    text = format_report(synthetic, "fp32")
    row = next(line for line in text.splitlines() if line.startswith("int8/ov-default/latency"))
    assert row.split()[-2:] == ["4.00x", "2.00x"]  # vs fp32/ov-f32, vs fp32/ov-default


def test_rounds_run_every_variant_once_in_a_changing_order():
    from onnxcompress.runtime.benchmark import _measure, _Round, _Variant

    calls: list[str] = []

    def variant(label: str) -> _Variant:
        def run(seconds: float) -> _Round:
            calls.append(label)
            return _Round([1.0], 1, seconds)
        return _Variant(label, "m", "ov", "ov-f32", "f32", "latency", run)

    labels = ["a", "b", "c", "d"]
    _measure([variant(label) for label in labels], rounds=6, round_seconds=0.1, progress=False)
    warmup, measured = calls[:4], calls[4:]
    assert warmup == labels
    rounds = [measured[i:i + 4] for i in range(0, len(measured), 4)]
    assert all(sorted(r) == labels for r in rounds)
    followers_of_a = {r[r.index("a") + 1] for r in rounds if r[-1] != "a"}
    assert len({tuple(r) for r in rounds}) > 2 and len(followers_of_a) > 1


def test_cpu_features_come_from_the_processor_and_openvino():
    """The features are NumPy's CPUID reading (true under emulators too); the default precision is OpenVINO's own."""
    import openvino as ov

    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        from numpy.core._multiarray_umath import __cpu_features__
    features = cpu_features()
    assert features.avx512 == __cpu_features__["AVX512F"] and features.avx2 == __cpu_features__["AVX2"]
    assert features.vnni >= __cpu_features__["AVX512VNNI"]
    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    assert features.openvino_default_precision == default
    assert (default == "bf16") <= features.bf16  # OpenVINO picks bf16 only where the CPU has it


def test_cpu_description_says_how_ort_multiplies_int8():
    zen3 = CpuFeatures("Zen 3", avx2=True, avx512=False, vnni=False, amx=False, bf16=False,
                       openvino_default_precision="f32")
    zen4 = CpuFeatures("Zen 4", avx2=True, avx512=True, vnni=True, amx=False, bf16=True,
                       openvino_default_precision="bf16")
    assert "VPMADDUBSW" in zen3.describe() and "VNNI no" in zen3.describe() and "precision f32" in zen3.describe()
    assert "exact int32" in zen4.describe() and "bf16 yes" in zen4.describe()


# ---------------------------------------------------------------------------------------------- sparse weights


def _sparse_int8_mlp(path: Path) -> Path:
    """x[N,64] → Gemm 64→128 (transB, half its weights zero) → Relu → Gemm 128→128 → Relu → Gemm 128→10
    (transB), quantized by us to INT8: one FullyConnected sparse weights can take, one whose [in, out] weights
    OpenVINO transposes, one too narrow."""
    from onnxcompress.api import quantize

    rng = np.random.default_rng(0)
    first = rng.standard_normal((128, 64)).astype(np.float32)
    first[rng.random(first.shape) < 0.5] = 0
    weights = {"w1": first, "w2": rng.standard_normal((128, 128)), "w3": rng.standard_normal((10, 128))}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h1"], name="first", transB=1),
         helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
         helper.make_node("Gemm", ["r1", "w2"], ["h2"], name="second"),
         helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
         helper.make_node("Gemm", ["r2", "w3"], ["logits"], name="head", transB=1)], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    dataset = [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(4)]
    onnx.save(quantize(model, dataset, progress=False), str(path))
    return path


def test_sparse_weights_rate_reaches_the_compiled_model(models):
    from onnxcompress.runtime.openvino import SPARSE_WEIGHTS_PROPERTY, compile_model

    assert compile_model(models["int8"], sparse_weights_rate=0.5).get_property(SPARSE_WEIGHTS_PROPERTY) == 0.5
    assert compile_model(models["int8"]).get_property(SPARSE_WEIGHTS_PROPERTY) == 1.0  # OpenVINO's "off"


def test_sparse_weights_twins_are_measured_and_explained_for_this_cpu(tmp_path, monkeypatch):
    import onnxcompress.runtime.benchmark as bench

    compiled_rates = []
    real_compile = bench.compile_model

    def spy(*args, **kwargs):
        compiled_rates.append(kwargs["sparse_weights_rate"])
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(bench, "compile_model", spy)
    mlp = _sparse_int8_mlp(tmp_path / "mlp.onnx")
    report = benchmark({"mlp": mlp}, rounds=1, round_seconds=0.05, openvino_precisions=("f32",), include_ort=False,
                       include_throughput=False, progress=False, sparse_weights_rate=0.5)
    assert report.variants == ["mlp/ov-f32/latency", "mlp/ov-f32-sparse/latency"] and compiled_rates == [None, 0.5]
    assert [m.sparse_weights_rate for m in report.measurements] == [None, 0.5]
    env = report.environment
    assert env["sparse_weights_rate"] == "0.5"
    if cpu_features().amx:
        assert "has AMX: OpenVINO applies sparse weights to INT8 FullyConnected layers only" in env["sparse_weights"]
    else:
        assert "has no AMX, so OpenVINO does not use sparse weights on it" in env["sparse_weights"]
    first, second, head = env["sparse_weights_layers"].removeprefix("mlp: ").split(", ")
    assert first.startswith("first") and first.endswith(" 128x64")  # packable: no reason given
    assert second.startswith("second") and "not packable: its weights come from a Transpose node" in second
    assert head.startswith("head") and head.endswith(" 10x128 (not packable: dimensions not multiples of 64)")
    text = format_report(report, "mlp")
    assert env["sparse_weights"] in text and env["sparse_weights_layers"] in text
    sparse_row = next(line for line in text.splitlines() if line.startswith("mlp/ov-f32-sparse/latency"))
    dense, sparse = report.measurements
    assert sparse_row.split()[-1] == f"{dense.median_ms / sparse.median_ms:.2f}x"  # the "vs dense twin" column
    assert json.loads(json.dumps(report.to_dict()))["measurements"][1]["sparse_weights_rate"] == 0.5


def test_sparse_weights_note_on_cpus_with_and_without_amx():
    from onnxcompress.runtime.openvino import sparse_weights_note

    sapphire_rapids = CpuFeatures("Xeon 8480", avx2=True, avx512=True, vnni=True, amx=True, bf16=True,
                                  openvino_default_precision="bf16")
    zen4 = CpuFeatures("Zen 4", avx2=True, avx512=True, vnni=True, amx=False, bf16=True,
                       openvino_default_precision="bf16")
    with_amx, without = sparse_weights_note(0.7, sapphire_rapids), sparse_weights_note(0.7, zen4)
    assert with_amx.startswith("CPU Xeon 8480 has AMX: OpenVINO applies sparse weights to INT8 FullyConnected "
                               "layers only") and "at least 0.7" in with_amx and "expected to equal" not in with_amx
    assert without.startswith("CPU Zen 4 has no AMX") and "expected to equal its dense twin" in without


def test_amx_needs_the_tile_and_int8_flags():
    base = frozenset({"AVX2", "AVX512F"})
    assert features_from_flags(base, frozenset({"amx_tile", "amx_int8"}), "spr", "bf16").amx
    assert not features_from_flags(base, frozenset({"amx_int8"}), "?", "bf16").amx
    assert not features_from_flags(frozenset({"AVX2"}), frozenset({"amx_tile", "amx_int8"}), "?", "f32").amx


def test_bad_sparse_weights_rates_are_refused(models, tmp_path):
    from test_cli_errors import run_cli

    for rate in (0, 0.0, 1, 1.5, -0.2, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(BenchmarkError, match="0 < rate < 1"):
            benchmark(models, sparse_weights_rate=rate, progress=False)
    with pytest.raises(BenchmarkError, match="no OpenVINO precision"):
        benchmark(models, openvino_precisions=(), sparse_weights_rate=0.5, progress=False)
    result = run_cli(tmp_path, "benchmark", str(models["int8"]), "--sparse-weights", "1")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: [benchmark] the sparse weights rate (CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE) is the least fraction "
        "of zero weights a layer needs to run sparse: a number with 0 < rate < 1 (1 turns sparse weights off); "
        "got 1.0"]
