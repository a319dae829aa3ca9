"""Fine-tuned filter pruning + INT8 QAT on the bundled models, with the sample configs, against the FP32 model and
the unpruned INT8 model in one run.

For each sample (`models/configs/digits_pruning_int8.yaml` on digits_cnn, `digits_mobile_pruning_int8.yaml` on
digits_mobile): fine-tune (its own training data; validation on the held-out test images), then measure the
exported file's top-1 on the test images in ONNX Runtime and OpenVINO, its MAC reduction (the trainer's
statistics), the export checks (exported vs masked, fake-quantized training graph; and channels removed vs
zeroed, ONNX Runtime as deployed: what surgery changes), and its median latency
against `quantize` of the unpruned model (same calibration data) in one interleaved benchmark.

    .venv/bin/python bench/pruning_finetune.py [--samples digits_cnn,digits_mobile] [--rounds 5] [--round-seconds 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT_DIR, log, write_json  # noqa: E402
from run import host_info  # noqa: E402

import onnxcompress  # noqa: E402
from onnxcompress.config import FinetuneConfig  # noqa: E402
from onnxcompress.models import sample  # noqa: E402
from onnxcompress.runtime.benchmark import benchmark  # noqa: E402
from onnxcompress.runtime.model_io import save_model  # noqa: E402
from onnxcompress.runtime.openvino import compile_model  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "models" / "configs"
SAMPLES = {"digits_cnn": "digits_pruning_int8.yaml", "digits_mobile": "digits_mobile_pruning_int8.yaml"}


def _top1(path: Path, test: Path) -> dict[str, float]:
    with np.load(test) as data:
        x, labels = data["input"], data["labels"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compiled = compile_model(path)
    return {"ort": float((session.run(None, {"input": x})[0].argmax(axis=1) == labels).mean()),
            "openvino": float((np.asarray(compiled({"input": x})[0]).argmax(axis=1) == labels).mean())}


def run_sample(name: str, folder: Path, args) -> dict[str, Any]:
    bundled = sample(name)
    config = FinetuneConfig.from_file(CONFIGS / SAMPLES[name])
    shutil.rmtree(folder / f"{name}.ckpt", ignore_errors=True)  # a fresh run each time
    start = time.perf_counter()
    result = onnxcompress.finetune(bundled.model_path, config=config, checkpoint_dir=folder / f"{name}.ckpt",
                                   progress=False)
    seconds = time.perf_counter() - start
    pruned = save_model(result.model, folder / f"{name}.pruned.int8.onnx")
    dense = save_model(onnxcompress.quantize(onnx.load(bundled.model_path), bundled.calibration_path,
                                             progress=False), folder / f"{name}.int8.onnx")
    report = benchmark({"dense_int8": dense, "pruned_int8": pruned}, rounds=args.rounds,
                       round_seconds=args.round_seconds, openvino_precisions=("f32",), include_throughput=False,
                       progress=False)
    latency = {m.variant: m.median_ms for m in report.measurements}
    statistics = result.history[result.best_epoch - 1].statistics
    return {"sample": name, "config": SAMPLES[name], "finetune_s": round(seconds, 1), "best_epoch": result.best_epoch,
            "mac_reduction": statistics["filter_pruning/mac_reduction"],
            "top1_fp32": _top1(Path(bundled.model_path), Path(bundled.test_path)),
            "top1_dense_int8": _top1(dense, Path(bundled.test_path)),
            "top1_pruned_int8": _top1(pruned, Path(bundled.test_path)),
            "export_error_float_path": result.export_error_float_path,
            "export_error_integer_kernels": result.export_error_integer_kernels,
            "export_error_surgery": result.export_error_surgery,
            "file_kb": {"dense_int8": dense.stat().st_size / 1e3, "pruned_int8": pruned.stat().st_size / 1e3},
            "speedup_vs_dense_int8": {backend: latency[f"dense_int8/{backend}/latency"]
                                      / latency[f"pruned_int8/{backend}/latency"] for backend in ("ov-f32", "ort")}}


def _table(records: list[dict[str, Any]]) -> str:
    lines = ["| sample | fewer MACs | top-1 FP32 | top-1 dense INT8 | top-1 pruned INT8 (ORT / OV) | speed-up vs dense "
             "INT8 OV f32 / ORT | file KB | export check float / int / surgery | fine-tune s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['sample']} | {r['mac_reduction']:.1%} | {r['top1_fp32']['ort']:.1%} | "
                     f"{r['top1_dense_int8']['ort']:.1%} | {r['top1_pruned_int8']['ort']:.1%} / "
                     f"{r['top1_pruned_int8']['openvino']:.1%} | {r['speedup_vs_dense_int8']['ov-f32']:.2f}× / "
                     f"{r['speedup_vs_dense_int8']['ort']:.2f}× | {r['file_kb']['dense_int8']:.0f} → "
                     f"{r['file_kb']['pruned_int8']:.0f} | {r['export_error_float_path']:.1e} / "
                     f"{r['export_error_integer_kernels']:.1e} / {r['export_error_surgery']:.1e} | "
                     f"{r['finetune_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default=",".join(SAMPLES), help=f"comma list of {', '.join(SAMPLES)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "pruning_finetune")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.samples.split(","):
        log(f"{name}: fine-tuning with {SAMPLES[name]}")
        records.append(run_sample(name, args.out, args))
        log(f"{name}: {records[-1]}")
        write_json(args.out / "results.json", {"host": host_info(), "records": records})
    print(_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
