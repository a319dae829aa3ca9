"""The README's main job: quantize the bundled digits CNN, compile both models to OpenVINO, measure accuracy,
size and speed, and print a before/after summary."""

from __future__ import annotations

import time
from pathlib import Path

import click

from onnxcompress.api import quantize
from onnxcompress.errors import OutputError
from onnxcompress.models import sample
from onnxcompress.portability import check_portability
from onnxcompress.runtime.cpu import cpu_features
from onnxcompress.runtime.benchmark import benchmark, check_timing, format_report, plot_report
from onnxcompress.runtime.evaluate import predict_onnxruntime, predict_openvino, top1
from onnxcompress.runtime.model_io import model_file_size, save_model
from onnxcompress.runtime.openvino import compile_model, export_openvino, int8_summary, runtime_precisions


def run_demo(output_dir: Path, *, rounds: int, round_seconds: float) -> None:
    check_timing(1, rounds, round_seconds)  # before minutes of work, not after them
    _make_folder(output_dir)
    digits = sample("digits_cnn")
    cpu = cpu_features()
    click.echo(cpu.describe())
    click.echo(f"model: {digits.model_path.name} — {digits.description}")

    started = time.perf_counter()
    quantized = quantize(digits.model_path, digits.calibration_path)
    int8_path = save_model(quantized, output_dir / "digits_cnn.int8.onnx")
    seconds = time.perf_counter() - started
    click.echo(f"quantized in {seconds:.1f} s → {int8_path}")
    for path in (digits.model_path, int8_path):
        click.echo(f"OpenVINO IR → {export_openvino(path, output_dir / 'openvino')}")

    inputs, labels = digits.load_test()
    accuracy = {
        ("FP32", "ONNX Runtime"): top1(predict_onnxruntime(digits.model_path, inputs), labels),
        ("FP32", "OpenVINO f32"): top1(predict_openvino(digits.model_path, inputs, precision_hint="f32"), labels),
        ("INT8", "ONNX Runtime"): top1(predict_onnxruntime(int8_path, inputs), labels),
        ("INT8", "OpenVINO"): top1(predict_openvino(int8_path, inputs), labels),
    }
    summary = int8_summary(runtime_precisions(compile_model(int8_path)))

    report = benchmark({"fp32": digits.model_path, "int8": int8_path}, rounds=rounds, round_seconds=round_seconds)
    plot = plot_report(report, output_dir / "benchmark.png")
    click.echo("\n" + format_report(report, baseline="fp32"))

    fp32_size, int8_size = model_file_size(digits.model_path), model_file_size(int8_path)
    lines = ["", f"== before / after ({len(labels)} held-out test images) ==",
             f"{'':14}{'FP32':>12}{'INT8':>12}",
             f"{'top-1 ORT':14}{accuracy['FP32', 'ONNX Runtime']:>12.2%}{accuracy['INT8', 'ONNX Runtime']:>12.2%}",
             f"{'top-1 OpenVINO':14}{accuracy['FP32', 'OpenVINO f32']:>12.2%}{accuracy['INT8', 'OpenVINO']:>12.2%}",
             f"{'file size':14}{fp32_size / 1e3:>10.0f}kB{int8_size / 1e3:>10.0f}kB  ({int8_size / fp32_size:.2f}×)"]
    for mode in ("latency", "throughput"):
        int8 = report.find("int8", "ov-default", mode)
        default = f"FP32 default ({cpu.openvino_default_precision})"
        for backend, label in (("ov-f32", "FP32 f32 hint"), ("ov-default", default)):
            base = report.find("fp32", backend, mode)
            ratio = base.median_ms / int8.median_ms if mode == "latency" else int8.throughput_fps / base.throughput_fps
            lines.append(f"OpenVINO {mode} speed-up INT8 vs {label}: {ratio:.2f}×")
    ort_fp32, ort_int8 = report.find("fp32", "ort", "latency"), report.find("int8", "ort", "latency")
    lines.append(f"ONNX Runtime latency: {ort_fp32.median_ms:.3f} ms → {ort_int8.median_ms:.3f} ms "
                 f"({ort_fp32.median_ms / ort_int8.median_ms:.2f}×)")
    lines.append(f"OpenVINO INT8 heavy layers: {summary.int8_count}/{summary.heavy_total}; chart: {plot}")
    lines.append(f"CPU portability of the INT8 file: {check_portability(quantized).describe()}")
    click.echo("\n".join(lines))


def _make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write the demo into {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the demo folder {folder}: {error.strerror or error}") from None
