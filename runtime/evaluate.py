"""Run a classifier over a labelled set in ONNX Runtime or OpenVINO and report top-1 accuracy."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from onnxcompress.runtime.model_io import runtime_source
from onnxcompress.runtime.openvino import compile_model


def predict_onnxruntime(model: str | os.PathLike, inputs: Mapping[str, np.ndarray], batch: int = 64) -> np.ndarray:
    """Logits of the first output for every sample of `inputs` (axis 0 enumerates samples)."""
    with runtime_source(model) as source:
        session = ort.InferenceSession(source.readable, providers=["CPUExecutionProvider"])
    count = len(next(iter(inputs.values())))
    return np.concatenate([session.run(None, {k: v[i:i + batch] for k, v in inputs.items()})[0]
                           for i in range(0, count, batch)])


def predict_openvino(model: str | os.PathLike, inputs: Mapping[str, np.ndarray], batch: int = 64,
                     precision_hint: str | None = None) -> np.ndarray:
    compiled = compile_model(model, precision_hint=precision_hint)
    count = len(next(iter(inputs.values())))
    return np.concatenate([compiled({k: v[i:i + batch] for k, v in inputs.items()})[0]
                           for i in range(0, count, batch)])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `approximation` against `reference`, in dB."""
    noise = float(np.sum((reference.astype(np.float64) - approximation) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)
