"""YOLOv8-style detector (dynamic H/W): onnxcompress vs NNCF vs ONNX Runtime's quantizer, in both runtimes.

The model and data come from `bench/detector_prepare.py` (YOLOv8n built from its model config by ultralytics,
trained here on rendered shapes, exported with dynamic H/W): 32 calibration inputs and 100 test inputs of
320-640 px, with ground-truth boxes. Each tool quantizes the same FP32 file on the same calibration folder, in
fresh processes, interleaved. Every file runs in ONNX Runtime and in OpenVINO (f32 for the layers left in float,
so that the numbers do not depend on the CPU's bf16 support; `--ov-precision default` for the plugin's
default). Detections kept: the fraction of the FP32 model's detections (ONNX Runtime, score > 0.25) that the file
reproduces (same class, IoU > 0.5); box error: the mean absolute coordinate difference of the matched boxes.

    bash bench/detector_setup.sh && bench/.venv-detector/bin/python bench/detector_prepare.py   # once, ~15 min
    bash bench/setup.sh                                                                         # once (peers)
    .venv/bin/python bench/detector.py --out bench/out/detector.json [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detector_eval import box_error, decode, kept, load_test_set, map50  # noqa: E402
from run import PEER_SCRIPT, REPO_DIR, run_interleaved  # noqa: E402

from onnxcompress.runtime.cpu import cpu_features  # noqa: E402
from onnxcompress.runtime.openvino import compile_model  # noqa: E402

WORK = REPO_DIR / "bench" / "out" / "detector"
PEERS_PYTHON = REPO_DIR / "bench" / ".venv-peers" / "bin" / "python"


def outputs_ort(model: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: x})[0] for x in inputs]


def outputs_ov(model: Path, inputs: list[np.ndarray], precision: str | None) -> list[np.ndarray]:
    compiled = compile_model(model, precision_hint=precision)
    return [compiled([x])[0] for x in inputs]


def quality(reference: list, outputs: list[np.ndarray], ground_truth: list) -> dict[str, float]:
    detections = [decode(y)[0] for y in outputs]
    return {"kept": kept(reference, detections), "box_error_px": box_error(reference, detections),
            "map50": map50(detections, ground_truth), "detections": sum(map(len, detections))}


def commands(fp32: Path, calib: Path, folder: Path, count: int) -> dict[str, list[str]]:
    ours = [str(REPO_DIR / ".venv" / "bin" / "onnxcompress"), "quantize", str(fp32), "-o",
            str(folder / "onnxcompress.onnx"), "--data", str(calib), "--no-progress"]
    peers = {tool: [str(PEERS_PYTHON), str(PEER_SCRIPT), "--tool", tool, str(fp32), "-o", str(folder / f"{tool}.onnx"),
                    "--data", str(calib), "--subset-size", str(count)] for tool in ("nncf", "ort")}
    return {"onnxcompress": ours, **peers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_DIR / "bench" / "out" / "detector.json")
    parser.add_argument("--repeats", type=int, default=1, help="quantizations per tool, interleaved; fastest kept")
    parser.add_argument("--tools", default="onnxcompress,nncf,ort")
    parser.add_argument("--ov-precision", choices=["f32", "default"], default="f32")
    parser.add_argument("--skip-quantize", action="store_true", help="evaluate the files of an earlier run")
    args = parser.parse_args(argv)

    fp32, calib = WORK / "yolov8n.onnx", WORK / "calib"
    if not fp32.exists():
        raise SystemExit(f"{fp32} is missing: run bench/detector_setup.sh and bench/detector_prepare.py first")
    folder = WORK / "quantized"
    folder.mkdir(parents=True, exist_ok=True)
    tools = args.tools.split(",")
    count = len(list(calib.glob("*.npy")))
    every = commands(fp32, calib, folder, count)
    timing = {} if args.skip_quantize else run_interleaved({tool: every[tool] for tool in tools}, args.repeats,
                                                           folder, 3600)

    _, inputs, ground_truth = load_test_set(WORK / "test")
    precision = None if args.ov_precision == "default" else args.ov_precision
    reference = [decode(y)[0] for y in outputs_ort(fp32, inputs)]
    results = {"cpu": cpu_features().describe(), "ov_precision": args.ov_precision, "calibration_inputs": count,
               "test_inputs": len(inputs), "fp32": {"ort": quality(reference, outputs_ort(fp32, inputs), ground_truth),
                                                    "ov": quality(reference, outputs_ov(fp32, inputs, precision),
                                                                  ground_truth)},
               "tools": {}}
    for tool in tools:
        path = folder / f"{tool}.onnx"
        record = {"ort": quality(reference, outputs_ort(path, inputs), ground_truth),
                  "ov": quality(reference, outputs_ov(path, inputs, precision), ground_truth)}
        if tool in timing:
            record.update(wall_s=min(r["wall_s"] for r in timing[tool]),
                          peak_rss_mb=max(r["peak_rss_mb"] for r in timing[tool]))
        results["tools"][tool] = record
        print(f"{tool}: {json.dumps(record)}", flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
