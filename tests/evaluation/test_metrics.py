"""Metrics: built-in scores against hand-computed references, and the user's metric files failing in every way the
issue names, each with a clear, typed error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn

from onnxcompress.errors import ConfigError, DatasetError, EvaluationError
from onnxcompress.evaluation.metrics import EvalSet, load_custom_metric, resolve_metric


@pytest.fixture()
def models(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """The tiny CNN, a copy whose first weight is perturbed, and 20 inputs."""
    reference = build_tiny_cnn()
    perturbed = build_tiny_cnn()
    weight = perturbed.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(values + 0.05 * np.random.default_rng(3).standard_normal(values.shape)
                                                 .astype(values.dtype), weight.name))
    paths = tmp_path / "fp32.onnx", tmp_path / "perturbed.onnx"
    onnx.save(reference, paths[0])
    onnx.save(perturbed, paths[1])
    shape = [d.dim_value or 1 for d in reference.graph.input[0].type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(1).standard_normal((20, *shape)).astype(np.float32)
    return *paths, x


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {TINY_CNN_INPUT: x})[0]


def test_builtin_metrics_match_their_definitions(models: tuple[Path, Path, np.ndarray]) -> None:
    fp32, perturbed, x = models
    reference, output = _logits(fp32, x), _logits(perturbed, x)
    labels = reference.argmax(axis=1)
    labels[:5] = (labels[:5] + 1) % reference.shape[1]  # the FP32 model gets 15 of 20 right
    data = EvalSet.from_arrays({TINY_CNN_INPUT: x, "labels": labels}, [TINY_CNN_INPUT], batch_size=8)
    assert len(data.feeds) == 3
    assert resolve_metric("top1", data)(str(fp32)) == 0.75
    assert resolve_metric("top1", data)(str(perturbed)) == float((output.argmax(1) == labels).mean())
    cosine = np.mean([r @ o / np.linalg.norm(r) / np.linalg.norm(o) for r, o in zip(reference.astype(float), output)])
    assert resolve_metric("cosine", data, fp32)(str(perturbed)) == pytest.approx(cosine, rel=1e-6) and cosine < 1
    sqnr = 10 * np.log10((reference.astype(float) ** 2).sum() / ((reference.astype(float) - output) ** 2).sum())
    assert resolve_metric("sqnr", data, fp32)(str(perturbed)) == pytest.approx(sqnr, rel=1e-5)
    assert resolve_metric("sqnr", data, fp32)(str(fp32)) == math.inf
    assert resolve_metric("cosine", data, fp32)(str(fp32)) == pytest.approx(1.0)


def test_builtin_metrics_refuse_what_they_cannot_score(models: tuple[Path, Path, np.ndarray]) -> None:
    fp32, _, x = models
    unlabelled = EvalSet.from_arrays({TINY_CNN_INPUT: x}, [TINY_CNN_INPUT])
    with pytest.raises(DatasetError, match="top1 needs labels"):
        resolve_metric("top1", unlabelled)
    with pytest.raises(ConfigError, match="needs evaluation data"):
        resolve_metric("cosine")
    with pytest.raises(ConfigError, match="unknown metric 'top5'"):
        resolve_metric("top5", unlabelled)
    with pytest.raises(DatasetError, match=r"no array for the model inputs \['x'\]"):
        EvalSet.from_arrays({"image": x}, [TINY_CNN_INPUT])
    with pytest.raises(DatasetError, match="'labels' has 3 entries for 20 samples"):
        EvalSet.from_arrays({TINY_CNN_INPUT: x, "labels": np.zeros(3)}, [TINY_CNN_INPUT])
    wrong = EvalSet.from_arrays({TINY_CNN_INPUT: x[:, :, :4]}, [TINY_CNN_INPUT])
    with pytest.raises(EvaluationError, match="ONNX Runtime cannot run"):
        resolve_metric("sqnr", wrong, fp32)(str(fp32))


def _metric_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_metric.py"
    path.write_text(body)
    return path


def test_a_metric_file_runs_the_users_function_on_the_model_path(tmp_path: Path,
                                                                   models: tuple[Path, Path, np.ndarray]) -> None:
    path = _metric_file(tmp_path, "import os\ndef score(model_path):\n    return os.path.getsize(model_path) / 1e6\n")
    metric = load_custom_metric(f"{path}:score")
    assert metric(str(models[0])) == pytest.approx(models[0].stat().st_size / 1e6)
    assert resolve_metric(lambda p: 0.5)(str(models[0])) == 0.5


@pytest.mark.parametrize(("body", "spec", "error", "fragments"), [
    (None, "missing.py:score", ConfigError, ("metric file not found",)),
    ("def other(p):\n    return 1.0\n", "{path}:score", ConfigError, ("defines no function score", "['other']")),
    ("import no_such_module_here\n", "{path}:score", ConfigError,
     ("failed to import", "ModuleNotFoundError", "my_metric.py:1")),
    ("def score(p):\n    return 1.0\n", "{path}", ConfigError, ("must be FILE.py:FUNC",)),
    ("def score(p):\n    helper()\n\ndef helper():\n    raise ValueError('no ground truth')\n", "{path}:score",
     EvaluationError, ("raised ValueError: no ground truth", "my_metric.py:2 in score", "my_metric.py:5 in helper")),
    ("def score(p):\n    return 'high'\n", "{path}:score", EvaluationError, ("returned str 'high', not a number",)),
    ("def score(p):\n    return True\n", "{path}:score", EvaluationError, ("returned bool",)),
    ("def score(p):\n    return float('nan')\n", "{path}:score", EvaluationError, ("returned NaN",)),
])
def test_a_broken_metric_file_says_what_is_wrong(tmp_path: Path, models: tuple[Path, Path, np.ndarray],
                                                 body: str | None, spec: str, error: type, fragments: tuple[str, ...]
                                                 ) -> None:
    path = _metric_file(tmp_path, body) if body is not None else tmp_path / "missing.py"
    with pytest.raises(error) as raised:
        resolve_metric(spec.format(path=path) if body is not None else str(tmp_path / spec))(str(models[0]))
    message = str(raised.value)
    assert all(fragment in message for fragment in fragments), message
    assert "metrics.py" not in message  # our frames stay out of the user's summary
