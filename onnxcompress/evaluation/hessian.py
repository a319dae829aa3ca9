"""HAWQ-style second-order sensitivity: the average Hessian trace of the task loss per weight tensor, estimated with
Hutchinson's method through the ONNX Runtime training runtime.

For a weight W with n values and Rademacher probes v (entries ±1), E[vᵀ H v] = Tr(H). H v comes from gradients at
two perturbed points, H v ≈ (∇L(W + h v) − ∇L(W − h v)) / 2h, with h a small fraction of W's RMS; all weights are
perturbed at once with independent probes, and each weight's own product vᵀ(H v) estimates its own block's trace
(the cross terms vanish in expectation). Each probe costs two gradient passes over the data.

A weight's HAWQ-v2 sensitivity at b bits is Ω_b = Tr(H)/n · ‖Q_b(W) − W‖²: the loss increase its quantization
error costs to second order. The loss is cross-entropy on the model's first output (a classifier's logits) with
the data's labels (or the float model's own top-1), or for other models the mean squared error of the first
output to the float model's: there the gradient vanishes at the float weights and H is the Gauss-Newton matrix
2/m · JᵀJ of the output's m values, the output error a weight perturbation makes to second order.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxcompress.errors import EvaluationError
from onnxcompress.runtime.model_io import save_model
from onnxcompress.runtime.training import TrainingRuntimeSession
from onnxcompress.runtime.training_env import TrainingRuntime
from onnxcompress.training.trainer import trainable_form

#: Perturbation size relative to each weight's RMS: small enough for the quadratic model, large enough to stay
#: above float32 rounding of the gradients.
RELATIVE_STEP = 1e-3

Batch = tuple[Mapping[str, np.ndarray], np.ndarray]
Loss = Literal["cross_entropy", "mse"]


def hessian_traces(model: onnx.ModelProto, batches: Sequence[Batch], weights: Sequence[str], *, probes: int = 8,
                   loss: Loss = "cross_entropy", seed: int = 0, runtime: TrainingRuntime | None = None,
                   progress: bool = True) -> dict[str, float]:
    """Tr(H)/n of the mean `loss` on `batches` ((feeds, labels) pairs: int64 class labels for cross-entropy,
    float targets shaped like the first output for mse) for each named initializer of `model` (float, IR <= 10,
    opset <= 21), averaged over `probes` Rademacher probes."""
    if probes < 1:
        raise EvaluationError(f"the Hessian estimate needs at least one probe, got {probes}")
    if not batches:
        raise EvaluationError("the Hessian estimate needs data")
    total = sum(len(labels) for _, labels in batches)
    rng = np.random.default_rng(seed)
    sums = dict.fromkeys(weights, 0.0)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-hessian-") as tmp, \
            TrainingRuntimeSession(runtime) as session, \
            tqdm(total=probes, desc="Hessian trace", unit="probe", disable=not progress) as bar:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        path = save_model(trainable_form(copy), Path(tmp) / "model.onnx")
        artifacts = session.generate_artifacts(path, Path(tmp) / "artifacts", trainable=list(weights),
                                               loss=loss)
        session.open(artifacts.directory)
        base = session.get_parameters(weights)
        steps = {w: RELATIVE_STEP * max(float(np.sqrt(np.mean(np.square(base[w], dtype=np.float64)))), 1e-8)
                 for w in weights}

        def gradient(probe: Mapping[str, np.ndarray], sign: float) -> dict[str, np.ndarray]:
            session.set_parameters({w: (base[w] + sign * steps[w] * probe[w]).astype(base[w].dtype)
                                    for w in weights})
            summed = {w: np.zeros(base[w].shape, np.float64) for w in weights}
            for feeds, labels in batches:
                _, grads = session.gradients(feeds, labels, names=weights)
                for w in weights:
                    summed[w] += grads[w] * (len(labels) / total)  # the loss is a mean over each batch
            return summed

        for _ in range(probes):
            probe = {w: rng.choice(np.array([-1.0, 1.0], np.float32), size=base[w].shape) for w in weights}
            plus, minus = gradient(probe, 1.0), gradient(probe, -1.0)
            for w in weights:
                sums[w] += float(np.sum(probe[w] * (plus[w] - minus[w]))) / (2 * steps[w])
            bar.update()
    return {w: sums[w] / probes / base[w].size for w in weights}


def hawq_sensitivity(average_trace: float, weight: np.ndarray, quantized: np.ndarray) -> float:
    """Ω = Tr(H)/n · ‖Q(W) − W‖² (HAWQ-v2): the second-order loss increase of replacing `weight` by `quantized`."""
    return average_trace * float(np.sum(np.square(quantized.astype(np.float64) - weight.astype(np.float64))))
