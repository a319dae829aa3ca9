"""One-shot filter pruning (`onnxcompress.prune --target 0.3 --target-kind flops`) on the ten bench models, with
the pruned model's speed against the unpruned one measured in the same run.

The models are the nine random-weight light models and the bundled digits_cnn of `bench/run.py` (prepared with
its `prepare_light`/`prepare_bundled`). For each model: prune (digits_cnn with its calibration data, so that its
biases are adjusted, and its test top-1 before/after; the light models have random weights, so only structure
and speed mean anything), then check that the pruned file passes the ONNX checker with full shape inference,
compiles in OpenVINO, keeps every output's shape, and report its MAC and weight reduction, file size and the
latency ratio unpruned / pruned in OpenVINO (f32 hint) and ONNX Runtime, from one interleaved benchmark of the
two files (`onnxcompress.runtime.benchmark`). A model whose pruning fails records the error and the run goes on.

    .venv/bin/python bench/pruning.py [--models all] [--rounds 5] [--round-seconds 1.0] [--criterion l2]
        [--ranking uniform|global]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BUNDLED_MODELS, DEFAULT_MATERIALIZE, DEFAULT_OUT_DIR, LIGHT_MODELS, log, write_json  # noqa: E402
from run import host_info, prepare_bundled, prepare_light  # noqa: E402

import onnxcompress  # noqa: E402
from onnxcompress.errors import OnnxCompressError  # noqa: E402
from onnxcompress.runtime.benchmark import benchmark  # noqa: E402
from onnxcompress.runtime.model_io import save_model  # noqa: E402
from onnxcompress.runtime.openvino import compile_model  # noqa: E402

MODELS = LIGHT_MODELS + BUNDLED_MODELS


def _outputs(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def _top1(path: Path, test: Path) -> float:
    with np.load(test) as data:
        x, labels = data["input"], data["labels"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1) == labels).mean())


def _latency_ratios(fp32: Path, pruned: Path, args) -> dict[str, float]:
    report = benchmark({"fp32": fp32, "pruned": pruned}, rounds=args.rounds, round_seconds=args.round_seconds,
                       openvino_precisions=("f32",), include_throughput=False, progress=False)
    by_variant = {m.variant: m for m in report.measurements}
    return {backend: by_variant[f"fp32/{backend}/latency"].median_ms / by_variant[f"pruned/{backend}/latency"].median_ms
            for backend in ("ov-f32", "ort")}


def run_model(name: str, args) -> dict[str, Any]:
    prep = SimpleNamespace(out=DEFAULT_OUT_DIR / "results.json", light_dir=DEFAULT_OUT_DIR / "light_models",
                           materialize_script=DEFAULT_MATERIALIZE)
    model = prepare_light(name, prep) if name in LIGHT_MODELS else prepare_bundled(name, prep)
    fp32, folder = Path(model["fp32"]), args.out.parent / "pruning"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = model["calib"] if name in BUNDLED_MODELS else None
    result = onnxcompress.prune(fp32, data, target=args.target, target_kind="flops", criterion=args.criterion,
                                ranking=args.ranking, progress=False)
    seconds = time.perf_counter() - start
    pruned = save_model(result.model, folder / f"{name}.pruned.onnx")
    onnx.checker.check_model(str(pruned), full_check=True)
    compile_model(pruned, precision_hint="f32")
    feed = {model["input_name"]: np.random.default_rng(0).standard_normal(model["sample_shape"]).astype(np.float32)}
    shapes_kept = [o.shape for o in _outputs(fp32, feed)] == [o.shape for o in _outputs(pruned, feed)]
    record = {"model": name, "prune_s": round(seconds, 2), "macs_before": result.macs_before,
              "macs_after": result.macs_after, "mac_reduction": 1 - result.macs_after / result.macs_before,
              "weights_before": result.weights_before, "weights_after": result.weights_after,
              "largest_cut": result.largest_cut, "groups": len(result.groups),
              "groups_pruned": sum(g.channels_after < g.channels_before for g in result.groups),
              "file_ratio": pruned.stat().st_size / fp32.stat().st_size, "checker": True, "openvino": True,
              "output_shapes_kept": shapes_kept, **_latency_ratios(fp32, pruned, args)}
    if name in BUNDLED_MODELS:
        record.update(top1_fp32=_top1(fp32, Path(model["test"])), top1_pruned=_top1(pruned, Path(model["test"])))
    return record


def _table(records: list[dict[str, Any]]) -> str:
    lines = ["| model | MACs (M) | fewer MACs | weights (M) | groups pruned | filters cut | file | speed-up OV f32 | "
             "speed-up ORT | prune s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['macs_before'] / 1e6:.0f} → {r['macs_after'] / 1e6:.0f} | "
                     f"{r['mac_reduction']:.1%} | {r['weights_before'] / 1e6:.2f} → {r['weights_after'] / 1e6:.2f} | "
                     f"{r['groups_pruned']}/{r['groups']} | {r['largest_cut']:.1%} | {r['file_ratio']:.2f}× | "
                     f"{r['ov-f32']:.2f}× | {r['ort']:.2f}× | {r['prune_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all", help=f"comma list, or all: {','.join(MODELS)}")
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--criterion", default="l2")
    parser.add_argument("--ranking", default="uniform", choices=["uniform", "global"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "pruning.json")
    args = parser.parse_args(argv)
    names = MODELS if args.models == "all" else args.models.split(",")
    records: list[dict[str, Any]] = []
    for name in names:
        log(f"{name}: pruning")
        try:
            records.append(run_model(name, args))
        except OnnxCompressError as error:
            records.append({"model": name, "error": str(error)})
        log(f"{name}: {records[-1]}")
        write_json(args.out, {"host": host_info(), "target": args.target, "criterion": args.criterion, "ranking": args.ranking,
                              "records": records})
    print(_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
