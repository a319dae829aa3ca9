"""The text-recognition metric of bench/ocr.py, in the form `quantize --metric FILE.py:FUNC` takes.

    onnxcompress quantize rec.onnx --data bench/out/ocr/calib --max-drop 0.001 --metric bench/ocr_metric.py:line_score

`line_score(model_path)` runs the recognizer (PP-OCRv4, dynamic width) on the rendered test lines of
bench/out/ocr/test (one [1, 3, 48, W] .npy each, `truth.json` beside them) in ONNX Runtime, six lines of similar
width per run as the package batches them, decodes greedily (CTC:
best class per column, repeats merged, blanks dropped, outer spaces stripped; classes from the model's
`character` metadata, blank first and space last) and returns 1 − the mean character error rate (edit distance / truth length): higher is better.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

TEST = Path(os.environ.get("ONNXCOMPRESS_OCR_TEST", Path(__file__).resolve().parent / "out" / "ocr" / "test"))


def characters(model_path: str | os.PathLike) -> list[str]:
    """Class index → character: blank, the model's dictionary, space."""
    model = onnx.load(str(model_path), load_external_data=False)
    table = next(p.value for p in model.metadata_props if p.key == "character")
    return ["", *table.split("\n"), " "]


def decode(probabilities: np.ndarray, classes: list[str]) -> str:
    best = probabilities.argmax(axis=-1)
    kept = [c for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1])]
    return "".join(classes[c] if c < len(classes) else "" for c in kept).strip()


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


#: Lines per run, as the package batches them: sorted by width, padded on the right with zeros to the widest.
BATCH = 6


def recognize(model_path: str | os.PathLike, folder: Path = TEST, run=None) -> list[str]:
    """The decoded text of every test line, in file order; `run(batch) -> probabilities` replaces ONNX Runtime."""
    if run is None:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run(None, {name: batch})[0]

    classes = characters(model_path)
    lines = [np.load(path) for path in sorted(folder.glob("line_*.npy"))]
    order = np.argsort([line.shape[-1] for line in lines], kind="stable")
    texts: list[str] = [""] * len(lines)
    for start in range(0, len(lines), BATCH):
        chosen = order[start:start + BATCH]
        width = max(lines[i].shape[-1] for i in chosen)
        batch = np.zeros((len(chosen), *lines[chosen[0]].shape[1:3], width), np.float32)
        for row, i in enumerate(chosen):
            batch[row, ..., :lines[i].shape[-1]] = lines[i][0]
        for row, probabilities in zip(chosen, run(batch)):
            texts[row] = decode(probabilities, classes)
    return texts


def character_error_rate(texts: list[str], folder: Path = TEST) -> float:
    truth = json.loads((folder / "truth.json").read_text())
    return float(np.mean([edit_distance(t, p) / max(len(t), 1) for t, p in zip(truth, texts)]))


def line_score(model_path: str) -> float:
    """1 − the mean character error rate of `model_path` on the test lines (higher is better)."""
    return 1.0 - character_error_rate(recognize(model_path))
