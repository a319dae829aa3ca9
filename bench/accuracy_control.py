"""Accuracy-aware quantization of the bundled models: `quantize --max-drop 0.001 --metric top1` (issue 15).

For each bundled model: plain `quantize` and `quantize --max-drop D --metric top1 --eval-data <its test split>`,
each a fresh process; top-1 of FP32, INT8 and the controlled file on the 500 test images (ONNX Runtime and
OpenVINO), which heavy layers still run INT8 (OpenVINO's executed graph; ONNX Runtime's integer kernels), and the
wall times. Then digits_mobile's accuracy control again with `--workers 1`, `--workers 2` and `--ray-address` of a
local Ray head with 2 CPUs that the bench starts and stops: the same choice, and the wall time of each.

    .venv/bin/python bench/accuracy_control.py --out bench/out/accuracy_control.json [--max-drop 0.001]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO_DIR  # noqa: E402

from onnxcompress.runtime.cpu import cpu_features  # noqa: E402
from onnxcompress.runtime.openvino import compile_model, int8_summary, runtime_precisions  # noqa: E402
from onnxcompress.runtime.ort_kernels import ort_kernel_summary  # noqa: E402

DATA = REPO_DIR / "models" / "data"
WORK = REPO_DIR / "bench" / "out" / "accuracy_control"
CLI = [str(REPO_DIR / ".venv" / "bin" / "onnxcompress")]


def timed(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args, "--no-progress"], check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout


def top1(path: Path, x: np.ndarray, labels: np.ndarray) -> dict:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compiled = compile_model(path)
    ov = np.concatenate([compiled(x[i:i + 50])[0] for i in range(0, len(x), 50)])
    summary = int8_summary(runtime_precisions(compiled))
    kernels = ort_kernel_summary(path)
    return {"ort_top1": float((session.run(None, {"input": x})[0].argmax(1) == labels).mean()),
            "ov_top1": float((ov.argmax(1) == labels).mean()),
            "ov_int8_heavy": f"{summary.int8_count}/{summary.heavy_total}",
            "ort_integer_kernels": sum(kernels.integer.values()), "ort_float_heavy": sum(kernels.float.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_DIR / "bench" / "out" / "accuracy_control.json")
    parser.add_argument("--models", default="digits_cnn,digits_mobile")
    parser.add_argument("--max-drop", type=float, default=0.001)
    parser.add_argument("--scale-out-model", default="digits_mobile",
                        help="the model whose accuracy control also runs in 2 processes and on a local Ray head")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    test = DATA / "digits_test.npz"
    with np.load(test) as z:
        x, labels = z["input"], z["labels"]
    results = {"cpu": cpu_features().describe(), "max_drop": args.max_drop, "models": {}}
    for name in args.models.split(","):
        model = DATA / f"{name}.onnx"
        int8, controlled = WORK / f"{name}.int8.onnx", WORK / f"{name}.controlled.onnx"
        plain_s, _ = timed("quantize", str(model), "-o", str(int8))
        control_s, said = timed("quantize", str(model), "-o", str(controlled), "--max-drop", str(args.max_drop),
                                "--metric", "top1", "--eval-data", str(test), "--no-cache")
        record = {"quantize_s": plain_s, "accuracy_control_s": control_s, "said": said.strip().splitlines()[0],
                  "fp32": top1(model, x, labels), "int8": top1(int8, x, labels),
                  "controlled": top1(controlled, x, labels)}
        results["models"][name] = record
        print(name, json.dumps(record), flush=True)
    results["scale_out"] = scale_out(DATA / f"{args.scale_out_model}.onnx", test, args.max_drop)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


def scale_out(model: Path, test: Path, max_drop: float) -> dict:
    """The same accuracy control serial, in 2 local worker processes and on a local 2-CPU Ray head."""
    runs = {}
    port = 6391
    ray = str(REPO_DIR / ".venv" / "bin" / "ray")
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True)
    try:
        for label, flags in (("serial", ["--workers", "1"]), ("2 processes", ["--workers", "2"]),
                             ("ray, 2 CPUs", ["--ray-address", f"127.0.0.1:{port}"])):
            seconds, said = timed("quantize", str(model), "-o", str(WORK / "scale_out.onnx"), "--max-drop",
                                  str(max_drop), "--metric", "top1", "--eval-data", str(test), "--no-cache", *flags)
            runs[label] = {"seconds": seconds, "said": said.strip().splitlines()[0]}
            print(label, json.dumps(runs[label]), flush=True)
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True)
    return runs


if __name__ == "__main__":
    sys.exit(main())
