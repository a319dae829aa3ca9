"""Offline by default (issue 11): the whole CLI surface, run with a sandboxed HOME and TMPDIR, writes nothing
outside the paths it is given and the tool's own cache, and (where strace exists) makes no network connection
attempt. CI variables are removed: both runtimes silence their telemetry in CI on their own, which would hide a
regression here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_calib_npz, save_tiny_cnn

from onnxcompress.privacy import OPT_IN
from onnxcompress.runtime.training_env import DIR_ENV, TrainingRuntime

_CI_VARIABLES = ("CI", "TF_BUILD", "JENKINS_URL", "GITHUB_ACTIONS", "BUILD_BUILDID", "ORT_DISABLE_TELEMETRY",
                 "MPLCONFIGDIR", OPT_IN)


def _surface(work: Path) -> list[list[str]]:
    save_tiny_cnn(work / "model.onnx")
    make_calib_npz(work / "calib.npz")
    rng = np.random.default_rng(0)
    np.savez(work / "train.npz", x=rng.standard_normal((8, 3, 16, 16)).astype(np.float32),
             labels=np.arange(8) % 10)
    (work / "qat.yaml").write_text("training:\n  epochs: 1\n  batch_size: 4\n")
    timing = ["--rounds", "1", "--round-seconds", "0.05"]
    return [
        ["quantize", "model.onnx", "--data", "calib.npz", "-o", "int8.onnx", "--no-progress"],
        ["export", "int8.onnx", "-o", "ir"],
        ["inspect", "int8.onnx"],
        ["compare", "model.onnx", "int8.onnx", "--data", "calib.npz", "--samples", "2", "--plot", "layers.png"],
        ["benchmark", "model.onnx", "int8.onnx", *timing, "--no-progress", "--report", "bench.json"],
        ["finetune", "model.onnx", "--config", "qat.yaml", "--train", "train.npz", "--val", "train.npz",
         "-o", "qat.onnx", "--no-progress", "--report", "qat.json"],
        ["demo", "-o", "demo", *timing],
        ["compress-weights", "model.onnx", "--mode", "int4_asym", "--group-size", "16", "--all-layers",
         "--data", "calib.npz", "-o", "int4.onnx", "--no-progress"],
        ["sensitivity", "model.onnx", "--data", "calib.npz", "--metric", "cosine", "--eval-data", "calib.npz",
         "--workers", "1", "--report", "sensitivity.md", "--plot", "sensitivity.png", "--no-progress"],
    ]


def _home_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if not p.is_dir())


def test_the_cli_writes_only_where_it_is_told_and_connects_nowhere(tmp_path: Path, runtime: TrainingRuntime) -> None:
    home, temporary, work = tmp_path / "home", tmp_path / "tmp", tmp_path / "work"
    for folder in (home, temporary, work):
        folder.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in _CI_VARIABLES}
    env.update(HOME=str(home), TMPDIR=str(temporary), NO_COLOR="1", PYTHONWARNINGS="ignore",
               XDG_CACHE_HOME=str(home / ".cache"), **{DIR_ENV: str(runtime.target_dir)})
    strace = shutil.which("strace")
    for index, args in enumerate(_surface(work)):
        command = [sys.executable, "-m", "onnxcompress.cli", *args]
        if strace:
            command = [strace, "-f", "-qq", "-e", "trace=connect", "-o", str(tmp_path / f"connect.{index}"), *command]
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (args, result.stderr)

    # Results get the mode a plain open() gives (mkstemp's temporaries are 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    for result in ("int8.onnx", "bench.json", "layers.png", "qat.onnx", "qat.json", "qat.onnx.checkpoints/run.json",
                   "qat.onnx.checkpoints/last-0001.ckpt", "ir/int8.xml", "demo/benchmark.png"):
        assert (work / result).stat().st_mode & 0o777 == 0o666 & ~umask, result
    assert (work / "qat.onnx.checkpoints/artifacts").stat().st_mode & 0o777 == 0o777 & ~umask
    # No ~/intel, no ~/.cache/Microsoft: only the tool's own cache (here, matplotlib's font list).
    assert [name for name in _home_files(home) if not name.startswith(".cache/onnxcompress/")] == []
    assert list(temporary.iterdir()) == []  # every temporary removed
    if strace:
        calls = "".join((tmp_path / f"connect.{index}").read_text() for index in range(len(_surface(work))))
        assert not re.findall(r"connect\(.*AF_INET", calls), calls
    else:
        pytest.skip("strace is not installed: file checks passed, connection attempts not traced")


def test_opting_in_leaves_the_runtimes_as_they_ship(tmp_path: Path) -> None:
    """The opt-in is real: ONNX Runtime then writes its usage database under HOME (proving the default check
    above would see one)."""
    home = tmp_path / "home"
    home.mkdir()
    save_tiny_cnn(tmp_path / "model.onnx")
    env = {key: value for key, value in os.environ.items() if key not in _CI_VARIABLES}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), **{OPT_IN: "1"})
    script = "import onnxcompress, onnxruntime as ort; ort.InferenceSession('model.onnx')"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert any("onnxruntime" in name for name in _home_files(home)), _home_files(home)
