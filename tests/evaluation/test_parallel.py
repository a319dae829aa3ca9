"""Candidates scored in local processes or on a Ray cluster give the serial run's scores and choices; a Ray address
that does not answer is refused at once."""

from __future__ import annotations

import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CNN_INPUT
from test_accuracy_control import planted  # noqa: F401 - the fixture
from test_cli_errors import run_cli

from onnxcompress.errors import EvaluationError
from onnxcompress.evaluation.accuracy_control import control_accuracy
from onnxcompress.evaluation.metrics import load_custom_metric
from onnxcompress.evaluation.parallel import ProcessEvaluator, RayEvaluator, SerialEvaluator
from onnxcompress.evaluation.sensitivity import quantizer_candidates, quantizer_sensitivity


def test_local_processes_score_as_this_process_does(planted) -> None:  # noqa: F811
    plan, model, metric, _, _ = planted
    serial = quantizer_sensitivity(plan, model, metric, evaluator=SerialEvaluator(), progress=False)
    evaluator = ProcessEvaluator(2)
    try:
        parallel = quantizer_sensitivity(plan, model, metric, evaluator=evaluator, progress=False)
        assert evaluator._pool is not None  # the batch really went to the workers
    finally:
        evaluator.close()
    assert parallel == serial


def test_a_local_function_metric_is_scored_in_this_process_with_a_warning(tmp_path: Path, caplog) -> None:
    """A closure cannot be sent to a spawned worker: the evaluator scores it here and says why, instead of failing
    in pickle."""
    for name in ("a.onnx", "b.onnx", "c.onnx", "d.onnx"):
        (tmp_path / name).write_bytes(b"")
    offset = 0.5

    def local(path: str) -> float:
        return offset + len(Path(path).stem)

    evaluator = ProcessEvaluator(2)
    try:
        with caplog.at_level("WARNING", logger="onnxcompress.evaluation.parallel"):
            scores = evaluator.scores(local, sorted(tmp_path.iterdir()))
        assert scores == [1.5] * 4 and evaluator._pool is None
        assert "cannot be sent to worker processes" in caplog.text
    finally:
        evaluator.close()


def test_a_metric_file_travels_as_its_spec_and_is_imported_again(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("def score(path):\n    return len(path) / 1000\n")
    metric = load_custom_metric(f"{tmp_path / 'mine.py'}:score")
    copy = pickle.loads(pickle.dumps(metric))
    assert copy.spec == metric.spec == f"{(tmp_path / 'mine.py').resolve()}:score"
    paths = [tmp_path / f"{'x' * i}.onnx" for i in range(1, 5)]
    evaluator = ProcessEvaluator(2)
    try:
        assert evaluator.scores(metric, paths) == [metric(str(p)) for p in paths]
    finally:
        evaluator.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head with 2 CPUs, started (and stopped) by the test itself."""
    ray = pytest.importorskip("ray")
    command = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = _free_port()
    subprocess.run([command, "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True,
                   timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([command, "stop", "--force"], capture_output=True, timeout=120)


def test_a_ray_cluster_makes_the_serial_runs_choice(planted, ray_cluster: str) -> None:  # noqa: F811
    plan, model, metric, victim, (quantized, victim_float) = planted
    budget = (1 - victim_float) * 1.5
    serial = control_accuracy(quantizer_candidates(plan, model), metric, budget, progress=False)
    on_ray = control_accuracy(quantizer_candidates(plan, model), metric, budget, evaluator=RayEvaluator(ray_cluster), progress=False)
    assert on_ray.float_units == serial.float_units == (victim,)
    assert on_ray.final_score == serial.final_score and on_ray.evaluations == serial.evaluations


def test_an_address_nothing_answers_is_refused_at_once(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    start = time.perf_counter()
    with pytest.raises(EvaluationError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        RayEvaluator(f"127.0.0.1:{1}")
    assert time.perf_counter() - start < 10


def test_the_cli_names_an_unreachable_cluster(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from conftest import make_calib_npz, save_tiny_cnn

    save_tiny_cnn(tmp_path / "model.onnx")
    make_calib_npz(tmp_path / "calib.npz")
    shape = np.load(tmp_path / "calib.npz")[TINY_CNN_INPUT].shape
    np.savez(tmp_path / "eval.npz", **{TINY_CNN_INPUT: np.zeros((4, *shape[1:]), np.float32)})
    result = run_cli(tmp_path, "quantize", "model.onnx", "--data", "calib.npz", "-o", "out.onnx", "--max-drop",
                     "0.01", "--metric", "cosine", "--eval-data", "eval.npz", "--ray-address", "127.0.0.1:1",
                     "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: [evaluate] cannot reach the Ray cluster at 127.0.0.1:1" in result.stderr
    assert not (tmp_path / "out.onnx").exists()
