"""Dynamic-shape CNN: a real fully convolutional trunk with symbolic H/W, calibrated on inputs of different sizes.

The model is a light model's trunk (default resnet50, random He-init weights with re-estimated BatchNorm, from
`bench/run.py`'s light models) cut before its final pooling, with input [1, 3, H, W]. Calibration: 30 inputs of
seeded sizes between 320 and 960 px (multiples of 32); test: 6 more. Each input is one `.npy` file of a folder
(the form for feeds whose shapes differ). Both tools run in fresh processes, interleaved; fidelity is the SQNR of
the output feature maps against FP32 in ONNX Runtime and OpenVINO.

    .venv/bin/python bench/run.py --models resnet50 --tools onnxcompress --rounds 0   # once: the light model
    .venv/bin/python bench/dynamic.py --out bench/out/dynamic.json [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PEER_SCRIPT, REPO_DIR, run_interleaved  # noqa: E402

from onnxcompress.runtime.cpu import cpu_features  # noqa: E402
from onnxcompress.runtime.evaluate import sqnr_db  # noqa: E402
from onnxcompress.runtime.openvino import compile_model  # noqa: E402

OUT = REPO_DIR / "bench" / "out"
PEERS_PYTHON = REPO_DIR / "bench" / ".venv-peers" / "bin" / "python"
CALIBRATION, TEST = 30, 6


def trunk(source: Path, target: Path) -> None:
    """Cut `source` before its final pooling (global, or a fixed-window AveragePool as in the Caffe2 exports) and
    make H and W symbolic."""
    graph = gs.import_onnx(onnx.load(str(source)))
    pool = [n for n in graph.nodes if n.op in ("GlobalAveragePool", "AveragePool")][-1]
    features = pool.inputs[0]
    graph.outputs = [features]
    graph.cleanup()
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            tensor.shape = None
    graph.inputs[0].shape = [1, 3, "H", "W"]
    features.shape = [1, None, None, None]
    features.dtype = np.float32
    model = gs.export_onnx(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def inputs(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        height, width = (int(v) * 32 for v in rng.integers(10, 31, size=2))
        path = folder / f"{i:03d}.npy"
        if not path.exists():
            np.save(path, rng.standard_normal((1, 3, height, width), dtype=np.float32))
        paths.append(path)
    return paths


def features_ort(model: Path, paths: list[Path]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: np.load(p)})[0] for p in paths]


def features_ov(model: Path, paths: list[Path]) -> list[np.ndarray]:
    compiled = compile_model(model)
    return [compiled([np.load(p)])[0] for p in paths]


def sqnr(reference: list[np.ndarray], result: list[np.ndarray]) -> float:
    return sqnr_db(np.concatenate([r.ravel() for r in reference]), np.concatenate([r.ravel() for r in result]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="light model whose trunk is used")
    parser.add_argument("--out", type=Path, default=OUT / "dynamic.json")
    parser.add_argument("--repeats", type=int, default=1, help="quantizations per tool, interleaved; fastest kept")
    parser.add_argument("--tools", default="onnxcompress,nncf")
    args = parser.parse_args(argv)

    work = OUT / "dynamic" / args.model
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "trunk_fp32.onnx"
    if not fp32.exists():
        trunk(OUT / "light_models" / f"{args.model}_fp32.onnx", fp32)
    calib, test = inputs(work / "calib", CALIBRATION, 1), inputs(work / "test", TEST, 2)
    commands = {
        "onnxcompress": [str(REPO_DIR / ".venv" / "bin" / "onnxcompress"), "quantize", str(fp32), "-o",
                         str(work / "onnxcompress.onnx"), "--data", str(work / "calib"), "--no-progress"],
        "nncf": [str(PEERS_PYTHON), str(PEER_SCRIPT), "--tool", "nncf", str(fp32), "-o", str(work / "nncf.onnx"),
                 "--data", str(work / "calib"), "--subset-size", str(CALIBRATION)],
    }
    tools = args.tools.split(",")
    runs = run_interleaved({tool: commands[tool] for tool in tools}, args.repeats, work, 3600)

    reference = features_ort(fp32, test)
    results = {"cpu": cpu_features().describe(), "model": args.model, "calibration_inputs": CALIBRATION,
               "shapes": [list(np.load(p, mmap_mode="r").shape) for p in calib], "tools": {}}
    for tool in tools:
        path = work / f"{tool}.onnx"
        results["tools"][tool] = {
            "wall_s": min(r["wall_s"] for r in runs[tool]), "wall_all_s": [r["wall_s"] for r in runs[tool]],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[tool]),
            "sqnr_ort": sqnr(reference, features_ort(path, test)), "sqnr_ov": sqnr(reference, features_ov(path, test))}
        print(f"{tool}: {json.dumps(results['tools'][tool])}", flush=True)
    if {"onnxcompress", "nncf"} <= set(tools):
        ours, nncf = results["tools"]["onnxcompress"], results["tools"]["nncf"]
        results["wall_ratio"] = ours["wall_s"] / nncf["wall_s"]
        results["rss_ratio"] = ours["peak_rss_mb"] / nncf["peak_rss_mb"]
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k not in ("tools", "shapes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
