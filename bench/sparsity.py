"""One-shot magnitude sparsity (`onnxcompress.sparsify`) on the ten bench models, beside post-training INT8, in one run.

The models are the nine random-weight light models and the bundled digits_cnn of `bench/run.py`; missing light
models, calibration and test data are prepared with its `prepare_light`/`prepare_bundled`. For each model:

  - FP32 reference outputs in ONNX Runtime (CPU, one sample per call) on the first --samples held-out test
    inputs; digits_cnn uses all of models/data/digits_test.npz and also reports top-1;
  - the variants below, each saved to bench/out/sparsity/MODEL/VARIANT.onnx, then its output SQNR vs FP32 (dB),
    the fraction of exact zeros in its Conv/Gemm/MatMul weights as saved (INT8 files: the integer weights), and
    the wall time of the sparsify/quantize call (in process, from the model path or proto to the result);
  - raw and zlib level-6 compressed size of the .onnx bytes of fp32, sparse50 and sparse50_int8.

Variants: sparse30, sparse50 (bias correction on the calibration npz), sparse50_nodata (no data: no correction),
sparse50_global (threshold=global, corrected), int8 (quantize of FP32), sparse50_int8 (quantize of sparse50).
Results go to --out (JSON, rewritten after every model; per model also its wall time, preparation included) and
markdown tables are printed.

    .venv/bin/python bench/sparsity.py [--models all] [--samples 16] [--subset-size 32]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BUNDLED_MODELS, DEFAULT_MATERIALIZE, DEFAULT_OUT_DIR, LIGHT_MODELS,  # noqa: E402
                    load_single_input_npz, log, sqnr_db, write_json)
from run import host_info, prepare_bundled, prepare_light  # noqa: E402

import onnxcompress  # noqa: E402
from onnxcompress.runtime.model_io import save_model  # noqa: E402

MODELS = LIGHT_MODELS + BUNDLED_MODELS
#: sparsify options per variant; `data` says whether the calibration npz is given (bias correction).
SPARSE_VARIANTS: dict[str, dict[str, Any]] = {
    "sparse30": {"level": 0.3, "data": True, "threshold": "per_layer"},
    "sparse50": {"level": 0.5, "data": True, "threshold": "per_layer"},
    "sparse50_nodata": {"level": 0.5, "data": False, "threshold": "per_layer"},
    "sparse50_global": {"level": 0.5, "data": True, "threshold": "global"},
}
#: variant quantized to INT8 -> the model it starts from.
INT8_VARIANTS = {"int8": "fp32", "sparse50_int8": "sparse50"}
SIZE_VARIANTS = ("fp32", "sparse50", "sparse50_int8")
HEAVY_OPS = {"Conv", "Gemm", "MatMul"}


def outputs(path: Path, x: np.ndarray, input_name: str) -> np.ndarray:
    """First output of the model for every sample of `x`, fed one at a time."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: x[i:i + 1]})[0] for i in range(len(x))])


def weight_sparsity(model: onnx.ModelProto) -> float:
    """Fraction of exact zeros over the constant weights (input 1) of Conv/Gemm/MatMul; for QDQ models the
    integer tensor behind the weight's DequantizeLinear."""
    inits = {t.name: t for t in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    zeros = total = 0
    for node in model.graph.node:
        if node.op_type not in HEAVY_OPS or len(node.input) < 2:
            continue
        name = dequantized.get(node.input[1], node.input[1])
        if name in inits:
            w = numpy_helper.to_array(inits[name])
            zeros += int(np.count_nonzero(w == 0))
            total += w.size
    return zeros / total if total else float("nan")


def file_sizes(path: Path) -> dict[str, float]:
    raw = path.read_bytes()
    packed = len(zlib.compress(raw, 6))
    return {"raw_bytes": len(raw), "zlib6_bytes": packed, "zlib6_ratio": packed / len(raw)}


def measure_model(m: dict, folder: Path, samples: int, subset_size: int) -> dict:
    """Build every variant of one prepared bench model and measure it against FP32."""
    folder.mkdir(parents=True, exist_ok=True)
    x = load_single_input_npz(m["test"], m["input_name"])
    with np.load(m["test"]) as z:
        labels = z["labels"] if "labels" in z.files else None
    if labels is None:
        x = x[:samples]
    fp32 = Path(m["fp32"])
    reference = outputs(fp32, x, m["input_name"])
    paths: dict[str, Path] = {"fp32": fp32}
    protos: dict[str, onnx.ModelProto] = {"fp32": onnx.load(str(fp32))}
    rec: dict[str, Any] = {"test_samples": len(x), "variants": {}}
    rec["variants"]["fp32"] = {"weight_sparsity": weight_sparsity(protos["fp32"])}

    def finish(name: str, model: onnx.ModelProto, seconds: float, extra: dict[str, Any]) -> None:
        path = save_model(model, folder / f"{name}.onnx")
        y = outputs(path, x, m["input_name"])
        paths[name], protos[name] = path, model
        rec["variants"][name] = {"seconds": seconds, "sqnr_db": sqnr_db(reference, y),
                                 "weight_sparsity": weight_sparsity(model), **extra}
        log(f"[{m['name']}] {name}: {seconds:.1f} s, SQNR {rec['variants'][name]['sqnr_db']:.1f} dB, "
            f"zeros {rec['variants'][name]['weight_sparsity']:.3f}")

    for name, opts in SPARSE_VARIANTS.items():
        start = time.perf_counter()
        result = onnxcompress.sparsify(fp32, m["calib"] if opts["data"] else None, level=opts["level"],
                                       threshold=opts["threshold"], subset_size=subset_size, progress=False)
        finish(name, result.model, time.perf_counter() - start,
               {"reported_sparsity": result.sparsity, "corrected_biases": len(result.corrected), **opts})
    for name, source in INT8_VARIANTS.items():
        start = time.perf_counter()
        model = onnxcompress.quantize(protos[source], m["calib"], subset_size=subset_size, progress=False)
        finish(name, model, time.perf_counter() - start, {"source": source})
    for name in SIZE_VARIANTS:
        rec["variants"][name]["size"] = file_sizes(paths[name])
    if labels is not None:
        rec["reference_top1"] = float((reference.argmax(1) == labels).mean())
        for name, path in paths.items():
            logits = reference if name == "fp32" else outputs(path, x, m["input_name"])
            rec["variants"][name]["top1"] = float((logits.argmax(1) == labels).mean())
    return rec


def table(results: dict) -> str:
    """Markdown tables of the run: fidelity and sparsity, then sizes and times."""
    sqnr_cols = list(SPARSE_VARIANTS) + list(INT8_VARIANTS)
    lines = ["| model | " + " | ".join(f"SQNR {c}" for c in sqnr_cols) + " | zeros 30 / 50 / 50 global |",
             "|---" * (len(sqnr_cols) + 2) + "|"]
    sizes = ["| model | FP32 MB | zip FP32 | zip sparse50 | zip sparse50_int8 | sparsify s (30 / 50 / 50 no data / "
             "50 global) | quantize s (FP32 / sparse50) |", "|---" * 7 + "|"]
    for model, rec in results["models"].items():
        if "error" in rec:
            lines.append(f"| {model} | failed: {rec['error']} |")
            continue
        v = rec["variants"]
        zeros = " / ".join(f"{v[n]['weight_sparsity']:.3f}" for n in ("sparse30", "sparse50", "sparse50_global"))
        lines.append(f"| {model} | " + " | ".join(f"{v[c]['sqnr_db']:.1f}" for c in sqnr_cols) + f" | {zeros} |")
        raw = v["fp32"]["size"]["raw_bytes"]
        zips = " | ".join(f"{v[n]['size']['zlib6_bytes'] / raw:.3f}" for n in SIZE_VARIANTS)
        times = " / ".join(f"{v[n]['seconds']:.1f}" for n in SPARSE_VARIANTS)
        quant = " / ".join(f"{v[n]['seconds']:.1f}" for n in INT8_VARIANTS)
        sizes.append(f"| {model} | {raw / 2 ** 20:.1f} | {zips} | {times} | {quant} |")
    out = "\n".join(lines) + "\n\nSizes relative to the raw FP32 file (zlib level 6 of the .onnx bytes):\n\n" \
        + "\n".join(sizes)
    top1 = [(model, rec) for model, rec in results["models"].items() if "reference_top1" in rec]
    for model, rec in top1:
        cols = ["fp32"] + sqnr_cols
        out += (f"\n\n{model} top-1 on {rec['test_samples']} test images:\n\n| " + " | ".join(cols) + " |\n"
                + "|---" * len(cols) + "|\n| "
                + " | ".join(f"{rec['variants'][c]['top1']:.3f}" for c in cols) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all", help=f"comma list or 'all' (= {','.join(MODELS)})")
    parser.add_argument("--samples", type=int, default=16, help="test inputs per light model")
    parser.add_argument("--subset-size", type=int, default=32,
                        help="calibration samples (the first N) for bias correction and INT8 calibration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "sparsity.json")
    args = parser.parse_args(argv)
    models = MODELS if args.models == "all" else [s.strip() for s in args.models.split(",") if s.strip()]
    # the namespace bench/run.py's prepare functions read: where light models and data live
    prep = SimpleNamespace(light_dir=DEFAULT_OUT_DIR / "light_models", materialize_script=DEFAULT_MATERIALIZE,
                           out=DEFAULT_OUT_DIR / "results.json")
    results: dict[str, Any] = {"meta": {
        "host": host_info(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "python": platform.python_version(), "samples": args.samples, "subset_size": args.subset_size,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": _dt.datetime.now().isoformat(timespec="seconds")}, "models": {}}
    start = time.perf_counter()
    for name in models:
        log(f"===== {name}")
        model_start = time.perf_counter()
        try:
            m = prepare_light(name, prep) if name in LIGHT_MODELS else prepare_bundled(name, prep)
            results["models"][name] = measure_model(m, DEFAULT_OUT_DIR / "sparsity" / name, args.samples,
                                                    args.subset_size)
        except Exception as e:  # noqa: BLE001  (one failing model must not lose the others)
            log(f"[{name}] FAILED: {type(e).__name__}: {e}")
            results["models"][name] = {"error": f"{type(e).__name__}: {e}"}
        results["models"][name]["seconds"] = time.perf_counter() - model_start
        write_json(args.out, results)
    results["meta"]["total_seconds"] = time.perf_counter() - start
    write_json(args.out, results)
    print(table(results))
    log(f"done in {results['meta']['total_seconds']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
