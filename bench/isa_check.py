"""Does each quantized file compute the same in ONNX Runtime's integer kernels as in float, on this CPU?

For every bench model and every tool's file, the logit SQNR against the FP32 model (dB) is measured twice in
ONNX Runtime: with the QDQ graph evaluated in float (ORT_DISABLE_ALL: no integer kernels, the same on every CPU)
and with the fused integer kernels (ORT_ENABLE_ALL). On CPUs without VNNI the two differ where a kernel saturates.
Run it natively and under an emulated CPU without VNNI, on the files of a `bench/run.py` run:

    .venv/bin/python bench/isa_check.py prepare --quantized bench/out/quantized-isa     # + our --target vnni files
    .venv/bin/python bench/isa_check.py measure --quantized bench/out/quantized-isa --out bench/out/isa_native.json
    qemu-x86_64 -cpu Haswell .venv/bin/python bench/isa_check.py measure --quantized bench/out/quantized-isa \
        --out bench/out/isa_haswell.json

`report A.json [B.json ...]` prints the tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress.portability import check_portability
from onnxcompress.runtime.cpu import cpu_features
from onnxcompress.runtime.evaluate import sqnr_db

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
TOOLS = ("onnxcompress", "onnxcompress_vnni", "nncf", "ort")


def _model_files(name: str) -> tuple[Path, Path, Path]:
    """FP32 model, calibration and test data of a bench model (the layout `bench/run.py` writes)."""
    if name == "digits_cnn":
        data = REPO / "models" / "data"
        return data / "digits_cnn.onnx", data / "digits_calib.npz", data / "digits_test.npz"
    return OUT / "light_models" / f"{name}_fp32.onnx", OUT / "data" / f"{name}_calib.npz", \
        OUT / "data" / f"{name}_test.npz"


def prepare(quantized: Path, models: list[str] | None) -> None:
    """Quantize every model of the run again with `--target vnni` (our full-range file), natively."""
    for folder in sorted(p for p in quantized.iterdir() if p.is_dir()):
        if models and folder.name not in models:
            continue
        fp32, calib, _ = _model_files(folder.name)
        output = folder / "onnxcompress_vnni.onnx"
        if not output.exists():
            subprocess.run([str(REPO / ".venv" / "bin" / "onnxcompress"), "quantize", str(fp32), "-o", str(output),
                            "--data", str(calib), "--subset-size", "300", "--target", "vnni", "--no-progress"],
                           check=True)


def _logits(source: str, feeds: list[dict[str, np.ndarray]], level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0].reshape(1, -1) for feed in feeds])


def measure(quantized: Path, out: Path, samples: int, models: list[str] | None) -> None:
    cpu = cpu_features()
    results = {"cpu": cpu.to_dict(), "cpu_description": cpu.describe(), "samples": samples, "models": {}}
    for folder in sorted(p for p in quantized.iterdir() if p.is_dir()):
        if models and folder.name not in models:
            continue
        fp32, _, test = _model_files(folder.name)
        with np.load(test) as data:
            names = [k for k in data.files if k != "labels"]
            feeds = [{k: data[k][i:i + 1] for k in names} for i in range(min(samples, len(data[names[0]])))]
            labels = data["labels"][:len(feeds)] if "labels" in data.files else None
        started = time.perf_counter()
        reference = _logits(str(fp32), feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        record = {}
        for tool in TOOLS:
            path = folder / f"{tool}.onnx"
            if not path.exists():
                continue
            in_float = _logits(str(path), feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            integer = _logits(str(path), feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            portability = check_portability(onnx.load(str(path)))
            record[tool] = {"sqnr_float_eval": sqnr_db(reference, in_float), "sqnr_integer": sqnr_db(reference, integer),
                            "safe_without_vnni": portability.safe_without_vnni,
                            "risky_layers": len(portability.risks), "checked_layers": portability.checked}
            if labels is not None:
                record[tool]["top1_float_eval"] = float((in_float.argmax(1) == labels).mean())
                record[tool]["top1_integer"] = float((integer.argmax(1) == labels).mean())
        if labels is not None:
            record["fp32"] = {"top1": float((reference.argmax(1) == labels).mean())}
        results["models"][folder.name] = record
        print(f"{folder.name}: " + ", ".join(f"{t} {r['sqnr_float_eval']:.1f}/{r['sqnr_integer']:.1f} dB"
                                             for t, r in record.items() if t in TOOLS)
              + f" ({time.perf_counter() - started:.0f} s)", flush=True)
        out.write_text(json.dumps(results, indent=2))


def report(paths: list[Path]) -> str:
    lines = []
    for path in paths:
        run = json.loads(path.read_text())
        lines += [f"{run['cpu_description']} ({run['samples']} test inputs per model; `{path.name}`)", "",
                  "| model | " + " | ".join(f"{t} float / integer (Δ)" for t in TOOLS) + " |",
                  "|---|" + "---|" * len(TOOLS)]
        for model, record in run["models"].items():
            cells = []
            for tool in TOOLS:
                r = record.get(tool)
                cells.append("-" if r is None else f"{r['sqnr_float_eval']:.1f} / {r['sqnr_integer']:.1f} "
                             f"({r['sqnr_integer'] - r['sqnr_float_eval']:+.1f})"
                             + ("" if r["safe_without_vnni"] else " ⚠"))
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
            if "fp32" in record:
                lines.append(f"| {model} top-1 (FP32 {record['fp32']['top1']:.1%}) | " + " | ".join(
                    "-" if tool not in record else
                    f"{record[tool]['top1_float_eval']:.1%} / {record[tool]['top1_integer']:.1%}" for tool in TOOLS)
                    + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "measure"):
        command = commands.add_parser(name)
        command.add_argument("--quantized", type=Path, default=OUT / "quantized-isa")
        command.add_argument("--models", help="comma-separated subset")
    commands.choices["measure"].add_argument("--out", type=Path, required=True)
    commands.choices["measure"].add_argument("--samples", type=int, default=8)
    commands.add_parser("report").add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.quantized, args.models.split(",") if args.models else None)
    elif args.command == "measure":
        measure(args.quantized, args.out, args.samples, args.models.split(",") if args.models else None)
    else:
        print(report(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
