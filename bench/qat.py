"""Quantization-aware training benchmark on the bundled digits CNN, in one run:

1. accuracy on the held-out test set (500 images): FP32, post-training INT8 and W4A8 (`onnxcompress quantize`),
   QAT INT8 and QAT W4A8 (`onnxcompress finetune` with the sample configs in models/configs/);
2. for each QAT export: max |exported - fake-quantized| logits relative to the logit range (ORT float path and
   ORT integer kernels), OpenVINO INT8 coverage of Conv/MatMul layers and top-1 agreement OpenVINO vs ORT;
3. training-step time, FP32 vs QAT vs magnitude sparsity + QAT graph, same runtime, batch, data and loss,
   interleaved rounds (medians);
4. kill -9 of a `finetune` run in the middle of its second epoch, `--resume`, and the final metric and
   weights compared with the uninterrupted INT8 run.

    .venv/bin/python bench/qat.py [--out bench/out/qat.json] [--rounds 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_DIR, log, write_json  # noqa: E402

from onnxcompress.compression.api import BuildContext  # noqa: E402
from onnxcompress.compression.registry import CompressedModel, create_compressed_model  # noqa: E402
from onnxcompress.config import FinetuneConfig  # noqa: E402
from onnxcompress.training.loss import LABELS_INPUT, TEACHER_INPUT  # noqa: E402
from onnxcompress.training.trainer import build_training_model, trainable_weights  # noqa: E402
from onnxcompress.models import sample  # noqa: E402
from onnxcompress.runtime.openvino import compile_model, int8_summary, runtime_precisions  # noqa: E402
from onnxcompress.runtime.training import TrainingRuntimeSession  # noqa: E402

CLI = [sys.executable, "-m", "onnxcompress.cli"]
CONFIGS = REPO_DIR / "models" / "configs"


def run_cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([*CLI, *args, "--no-progress"], check=True, cwd=REPO_DIR)
    return time.perf_counter() - start


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def openvino_check(path: Path, x: np.ndarray, reference: np.ndarray) -> dict:
    compiled = compile_model(path, precision_hint="f32", shapes={"input": [1, 1, 32, 32]})
    summary = int8_summary(runtime_precisions(compiled))
    request = compiled.create_infer_request()
    logits = np.concatenate([request.infer({0: x[i:i + 1]})[0] for i in range(len(x))])
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    return {"int8_layers": summary.int8_count, "heavy_layers": summary.heavy_total,
            "not_int8": list(summary.not_int8), "top1_agreement_with_ort": agreement}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def step_times(out: Path, rounds: int, steps: int) -> dict:
    """Median seconds per training step of the FP32 graph, the QAT graph and the magnitude-sparsity + QAT graph
    (batch 32, same data and loss)."""
    digits = sample("digits_cnn")
    with np.load(digits.train_path) as data:
        x, y = data["input"], data["labels"]
    model = onnx.load(digits.model_path)
    compressed = {name: _compressed(model, CONFIGS / config, x)
                  for name, config in (("qat", "digits_qat_int8.yaml"), ("sparsity_qat", "digits_sparsity_int8.yaml"))}
    settings = FinetuneConfig.from_file(CONFIGS / "digits_qat_int8.yaml").training
    float_model = compressed["qat"].float_model
    weights = trainable_weights(float_model)
    feeds = {"input": x[:settings.batch_size], LABELS_INPUT: y[:settings.batch_size]}
    if settings.distillation.enabled:
        teacher = ort.InferenceSession(compressed["qat"].reference_model.SerializeToString())
        feeds[TEACHER_INPUT] = teacher.run(None, {"input": feeds["input"]})[0]
    graphs = {"fp32": (build_training_model(float_model, settings, []), None)}
    graphs.update({name: (build_training_model(c.training_model, settings, c.loss_outputs), c)
                   for name, c in compressed.items()})
    sessions = {}
    for name, (training_model, stack) in graphs.items():
        session = TrainingRuntimeSession()
        path = out / f"step-{name}.onnx"
        path.write_bytes(training_model.SerializeToString())
        shutil.rmtree(out / f"step-artifacts-{name}", ignore_errors=True)
        for op_type, definition in (stack.gradients if stack else {}).items():
            session.register_gradient(op_type, definition)
        trainable = weights + list(stack.trainable_parameters) if stack else weights
        frozen = list(stack.frozen_parameters) if stack else []
        artifacts = session.generate_artifacts(path, out / f"step-artifacts-{name}", trainable=trainable,
                                               frozen=frozen, loss="none")
        session.open(artifacts.directory, learning_rate=1e-5)
        for _ in range(3):
            session.train_step(feeds)
        sessions[name] = session
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            for _ in range(steps):
                session.train_step(feeds)
            times[name].append((time.perf_counter() - start) / steps)
    for session in sessions.values():
        session.close()
    medians = {name: float(np.median(values)) for name, values in times.items()}
    return {"batch_size": settings.batch_size, "rounds": rounds, "steps_per_round": steps,
            "seconds_per_step": medians, "all_rounds": times, "qat_over_fp32": medians["qat"] / medians["fp32"],
            "sparsity_qat_over_qat": medians["sparsity_qat"] / medians["qat"]}


def _compressed(model: onnx.ModelProto, config_path: Path, x: np.ndarray) -> CompressedModel:
    config = FinetuneConfig.from_file(config_path)
    settings = config.training
    context = BuildContext(settings.learning_rate, settings.optimizer.value, len(x) // settings.batch_size, 300,
                           progress=False)
    return create_compressed_model(model, config.compression, lambda: ({"input": x[i:i + 1]} for i in range(300)),
                                   context)


def kill_and_resume(out: Path, reference: Path) -> dict:
    """SIGKILL a fine-tuning run in its second epoch, resume it, compare with the uninterrupted run."""
    output, checkpoints = out / "qat_int8_resumed.onnx", out / "qat_int8_resumed.ckpt"
    args = ["finetune", str(sample("digits_cnn").model_path), "--config", str(CONFIGS / "digits_qat_int8.yaml"),
            "-o", str(output), "--checkpoint-dir", str(checkpoints), "--no-progress"]
    process = subprocess.Popen([*CLI, *args], cwd=REPO_DIR, start_new_session=True)
    state = checkpoints / "run.json"
    while not (state.exists() and json.loads(state.read_text())["epochs_done"] >= 1):
        if process.poll() is not None:
            raise RuntimeError("the run ended before it could be killed")
        time.sleep(0.2)
    time.sleep(5.0)  # well into the second epoch
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_after = json.loads(state.read_text())["epochs_done"]
    subprocess.run([*CLI, *args, "--resume"], check=True, cwd=REPO_DIR)
    resumed, straight = onnx.load(output), onnx.load(reference)
    identical = all(np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
                    for a, b in zip(resumed.graph.initializer, straight.graph.initializer, strict=True))
    history = [r["metric"] for r in json.loads(state.read_text())["history"]]
    return {"killed_after_epochs": killed_after, "resumed_history": history, "weights_identical": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_DIR / "bench" / "out" / "qat.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--parts", default="accuracy,resume,step_time",
                        help="comma list of accuracy, resume, step_time; results merge into --out")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    folder = args.out.parent / "qat"
    folder.mkdir(parents=True, exist_ok=True)
    digits = sample("digits_cnn")
    test = np.load(digits.test_path)
    x, labels = test["input"], test["labels"]
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "accuracy" in parts:
        results.update(accuracy_part(folder, x, labels))
    if "resume" in parts:
        log("kill -9 and resume")
        shutil.rmtree(folder / "qat_int8_resumed.ckpt", ignore_errors=True)
        results["kill_and_resume"] = kill_and_resume(folder, folder / "qat_int8.onnx")
    if "step_time" in parts:
        log("training step time")
        results["step_time"] = step_times(folder, args.rounds, args.steps)
    write_json(args.out, results)
    print(json.dumps(results, indent=2))


def accuracy_part(folder: Path, x: np.ndarray, labels: np.ndarray) -> dict:
    digits = sample("digits_cnn")
    results: dict = {"fp32": {"top1": accuracy(ort_logits(digits.model_path, x), labels)}}
    for name, bits in (("ptq_int8", 8), ("ptq_w4a8", 4)):
        path = folder / f"{name}.onnx"
        log(f"post-training {name}")
        seconds = run_cli("quantize", str(digits.model_path), "-o", str(path), "--weight-bits", str(bits))
        results[name] = {"top1": accuracy(ort_logits(path, x), labels), "seconds": seconds}

    for name, config in (("qat_int8", "digits_qat_int8.yaml"), ("qat_w4a8", "digits_qat_w4a8.yaml")):
        path, checkpoints = folder / f"{name}.onnx", folder / f"{name}.ckpt"
        log(f"fine-tuning {name}")
        shutil.rmtree(checkpoints, ignore_errors=True)
        report = folder / f"{name}.report.json"
        seconds = run_cli("finetune", str(digits.model_path), "--config", str(CONFIGS / config), "-o", str(path),
                          "--checkpoint-dir", str(checkpoints), "--report", str(report))
        summary = json.loads(report.read_text())
        logits = ort_logits(path, x)
        results[name] = {
            "top1": accuracy(logits, labels), "seconds": seconds,
            **{key: summary[key] for key in ("initial_metric", "best_epoch", "best_metric",
                                             "export_error_float_path", "export_error_integer_kernels")},
            "history": [{k: r[k] for k in ("epoch", "train_loss", "val_loss", "metric")} for r in summary["history"]],
            "openvino": openvino_check(path, x, logits)}
    return results


if __name__ == "__main__":
    main()
