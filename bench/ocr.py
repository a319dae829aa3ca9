"""Accuracy-aware quantization of a real text recognizer scored by the user's own pipeline (issue 15).

Model: PP-OCRv4's recognizer (`ch_PP-OCRv4_rec_infer.onnx`, dynamic batch and width, as the PyPI package
rapidocr-onnxruntime 1.4.4 ships it). Lines: sentences of Python's documentation, cut to 3-8 words, rendered with
matplotlib's DejaVu fonts (28-40 px, grey levels, light noise), cropped, resized to height 48 at their own width
and normalised to [-1, 1] (the package's preprocessing, without batching): 100 for calibration (a folder of .npy
feeds of different widths), 200 others for the test. The metric is `bench/ocr_metric.py:line_score` (1 − CER).

Runs, each a fresh `onnxcompress` process: plain `quantize`, then `quantize --max-drop D --metric
bench/ocr_metric.py:line_score`; reports their wall times, and the CER of FP32, INT8 and the controlled model in
ONNX Runtime and OpenVINO.

    .venv/bin/python bench/ocr.py --out bench/out/ocr.json [--max-drop 0.001]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ocr_metric  # noqa: E402
from run import REPO_DIR  # noqa: E402

from onnxcompress.runtime.cpu import cpu_features  # noqa: E402
from onnxcompress.runtime.openvino import compile_model, int8_summary, runtime_precisions  # noqa: E402

WORK = REPO_DIR / "bench" / "out" / "ocr"
WHEEL = ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
FACES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
HEIGHT = 48
CLI = [str(REPO_DIR / ".venv" / "bin" / "onnxcompress")]


def fetch() -> Path:
    target = WORK / WHEEL[1]
    if target.exists():
        return target
    wheels = WORK / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), WHEEL[0]],
                   check=True)
    wheel = next(wheels.glob("rapidocr_onnxruntime-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(WHEEL[1], WORK)
    return target


def texts(count: int, seed: int) -> list[str]:
    from pydoc_data.topics import topics

    found = set()
    for text in topics.values():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = sentence.split()
            if len(words) >= 3 and sentence[0].isupper() and all(ord(c) < 127 for c in sentence):
                found.add(" ".join(words[:8]))
    pool = sorted(found)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:count]]


def render(text: str, rng: np.random.Generator) -> np.ndarray:
    """One line as the recognizer reads it: [1, 3, 48, W] in [-1, 1]."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(28, 41))
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" /
                                  FACES[rng.integers(len(FACES))]), size)
    left, top, right, bottom = font.getbbox(text)
    pad = int(size * 0.3)
    background = int(rng.integers(200, 256))
    image = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (background,) * 3)
    ImageDraw.Draw(image).text((pad - left, pad - top), text, fill=(int(rng.integers(0, 70)),) * 3, font=font)
    width = max(HEIGHT, round(image.width * HEIGHT / image.height))
    pixels = np.asarray(image.resize((width, HEIGHT), Image.BILINEAR)).astype(np.float32)
    pixels = (pixels + rng.normal(0, 4, pixels.shape)).clip(0, 255)
    return ((pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)[None].astype(np.float32)


def write_lines(folder: Path, count: int, seed: int, *, truth: bool) -> None:
    if folder.exists():
        return
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = texts(count, seed)
    for index, text in enumerate(lines):
        np.save(folder / f"line_{index:03d}.npy", render(text, rng))
    if truth:
        (folder / "truth.json").write_text(json.dumps(lines))


def timed(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args, "--no-progress"], check=True, capture_output=True, text=True, cwd=REPO_DIR)
    return time.perf_counter() - start, done.stdout


def openvino_cer(model: Path, folder: Path) -> tuple[float, str]:
    compiled = compile_model(model)
    texts_ = ocr_metric.recognize(model, folder, run=lambda batch: compiled(batch)[0])
    summary = int8_summary(runtime_precisions(compiled))
    return ocr_metric.character_error_rate(texts_, folder), f"{summary.int8_count}/{summary.heavy_total}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_DIR / "bench" / "out" / "ocr.json")
    parser.add_argument("--max-drop", type=float, default=0.001)
    args = parser.parse_args(argv)
    fp32 = fetch()
    calib, test = WORK / "calib", WORK / "test"
    write_lines(calib, 100, 1, truth=False)
    write_lines(test, 200, 2, truth=True)
    int8, controlled = WORK / "int8.onnx", WORK / "controlled.onnx"
    plain_s, _ = timed("quantize", str(fp32), "--data", str(calib), "-o", str(int8))
    control_s, said = timed("quantize", str(fp32), "--data", str(calib), "-o", str(controlled), "--max-drop",
                            str(args.max_drop), "--metric", f"{REPO_DIR / 'bench' / 'ocr_metric.py'}:line_score",
                            "--no-cache")
    results = {"cpu": cpu_features().describe(), "lines": {"calibration": 100, "test": 200},
               "max_drop": args.max_drop, "quantize_s": plain_s, "accuracy_control_s": control_s,
               "time_ratio": control_s / plain_s, "accuracy_control": said.strip().splitlines()[0], "models": {}}
    for label, path in (("fp32", fp32), ("int8", int8), ("controlled", controlled)):
        ov_cer, coverage = openvino_cer(path, test)
        results["models"][label] = {"ort_cer": ocr_metric.character_error_rate(ocr_metric.recognize(path, test), test),
                                    "ov_cer": ov_cer, "ov_int8_layers": coverage}
        print(label, json.dumps(results["models"][label]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "models"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
