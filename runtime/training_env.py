"""The private onnxruntime-training runtime: where it lives, which interpreter runs it, how it gets installed.

onnxruntime-training 1.19.2 (its last release) installs into the same `onnxruntime/` package folder as the
`onnxruntime` of the main environment and the two break each other, so it lives in a folder of its own
(`pip install --target`) and only ever runs in a separate worker process (see `training.py`).

Guarantees:

* `ensure_training_runtime(install=False)` never touches the disk beyond reading; it returns a
  `TrainingRuntime` only when the folder holds a complete install of exactly `REQUIREMENTS` for the chosen
  interpreter's CPython version, and raises `TrainingRuntimeMissing` (with how to get one) otherwise.
* `ensure_training_runtime(install=True)` is idempotent: a complete install is reused as it is. Otherwise it
  installs into a staging folder beside the target and renames it into place only after pip succeeded and
  the marker file was written, so the target folder is either absent or complete. Concurrent callers are
  serialised by a lock file beside the target. A failed pip run raises `TrainingError` with pip's output.
* It never deletes a folder that it did not create: an existing non-empty folder without our marker is
  refused, not replaced.

The folder is `~/.cache/onnxcompress/ort-training-1.19.2-cp3XX` unless `ONNXCOMPRESS_TRAINING_DIR` names
another. Wheels exist only for CPython 3.10/3.11 on x86-64 Linux, so the interpreter is the one named by
`ONNXCOMPRESS_TRAINING_PYTHON`, else the current one if it is 3.10/3.11, else `python3.11`/`python3.10` on
PATH. `python -m onnxcompress.runtime.training_env --install` installs it from a Makefile or CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from onnxcompress.errors import OnnxCompressError, TrainingError, TrainingRuntimeMissing

__all__ = [
    "ORT_TRAINING_VERSION",
    "REQUIREMENTS",
    "TrainingRuntime",
    "ensure_training_runtime",
    "training_runtime_dir",
]

ORT_TRAINING_VERSION = "1.19.2"
# Exact pins of everything the worker imports, tested together here: onnxruntime-training 1.19.2 needs
# onnx <= 1.16 (IR <= 10, opset <= 21, also for the optimizer model onnx writes), and numpy 1 keeps the
# onnx 1.16 and onnxruntime-training extension modules on the ABI they were built for.
REQUIREMENTS: tuple[str, ...] = (
    f"onnxruntime-training=={ORT_TRAINING_VERSION}",
    "numpy==1.26.4",
    "onnx==1.16.2",
    "protobuf==7.36.2",
)
SUPPORTED_PYTHONS: tuple[tuple[int, int], ...] = ((3, 10), (3, 11))

DIR_ENV = "ONNXCOMPRESS_TRAINING_DIR"
PYTHON_ENV = "ONNXCOMPRESS_TRAINING_PYTHON"
MARKER_NAME = ".onnxcompress-training.json"
# The wheel is the CUDA build; the worker runs on the CPU only and never loads this 774 MB library.
_UNUSED_LIBRARIES = ("onnxruntime/capi/libonnxruntime_providers_cuda.so",)

_HOW_TO = (
    "Install it with `python -m onnxcompress.runtime.training_env --install` (or `make test`). It needs "
    "CPython 3.10 or 3.11 on x86-64 Linux: the current interpreter if it is one, else set "
    f"{PYTHON_ENV} to such an interpreter or put python3.11/python3.10 on PATH. "
    f"{DIR_ENV} chooses the folder (about 300 MB)."
)


@dataclass(frozen=True)
class TrainingRuntime:
    """An installed private runtime: run `python` with `target_dir` first on sys.path."""

    python: Path
    target_dir: Path


@dataclass(frozen=True)
class _Interpreter:
    path: Path
    version: tuple[int, int]

    @property
    def tag(self) -> str:
        return f"cp{self.version[0]}{self.version[1]}"


# --------------------------------------------------------------------------------------------- interpreter


def _find_interpreter() -> _Interpreter:
    _require_supported_platform()
    explicit = os.environ.get(PYTHON_ENV)
    if explicit:
        found = _probe_interpreter(explicit)
        if found is None:
            raise TrainingRuntimeMissing(
                f"{PYTHON_ENV}={explicit} is not a runnable CPython 3.10/3.11 interpreter. {_HOW_TO}"
            )
        return found
    if sys.version_info[:2] in SUPPORTED_PYTHONS:
        return _Interpreter(Path(sys.executable), (sys.version_info[0], sys.version_info[1]))
    for name in ("python3.11", "python3.10"):
        on_path = shutil.which(name)
        found = _probe_interpreter(on_path) if on_path else None
        if found is not None:
            return found
    raise TrainingRuntimeMissing(
        f"no CPython 3.10/3.11 interpreter found (this one is {platform.python_version()}). {_HOW_TO}"
    )


def _require_supported_platform() -> None:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise TrainingRuntimeMissing(
            f"onnxruntime-training {ORT_TRAINING_VERSION} has wheels only for x86-64 Linux, "
            f"not {sys.platform}/{platform.machine()}. {_HOW_TO}"
        )


def _probe_interpreter(executable: str) -> _Interpreter | None:
    """Ask `executable` for its version; None if it does not run (e.g. a pyenv shim without that version)."""
    try:
        completed = subprocess.run(
            [executable, "-I", "-c", "import sys; print(sys.implementation.name, *sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = completed.stdout.split()
    if completed.returncode != 0 or len(fields) != 3 or fields[0] != "cpython":
        return None
    version = (int(fields[1]), int(fields[2]))
    return _Interpreter(Path(executable), version) if version in SUPPORTED_PYTHONS else None


# ------------------------------------------------------------------------------------------------- folder


def training_runtime_dir(python_tag: str | None = None) -> Path:
    """The runtime folder: `ONNXCOMPRESS_TRAINING_DIR`, else the per-CPython-version default cache folder."""
    explicit = os.environ.get(DIR_ENV)
    if explicit:
        return Path(explicit).expanduser().absolute()
    tag = python_tag or _find_interpreter().tag
    return Path.home() / ".cache" / "onnxcompress" / f"ort-training-{ORT_TRAINING_VERSION}-{tag}"


def _expected_marker(interpreter: _Interpreter) -> dict[str, object]:
    return {"requirements": list(REQUIREMENTS), "python_tag": interpreter.tag}


def _is_complete(target: Path, interpreter: _Interpreter) -> bool:
    try:
        marker = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = _expected_marker(interpreter)
    return isinstance(marker, dict) and all(marker.get(key) == value for key, value in expected.items())


# ----------------------------------------------------------------------------------------------- install


def ensure_training_runtime(install: bool = False) -> TrainingRuntime:
    """The installed runtime, installing it first when `install` is true; see the module docstring."""
    interpreter = _find_interpreter()
    target = training_runtime_dir(interpreter.tag)
    if _is_complete(target, interpreter):
        return TrainingRuntime(interpreter.path, target)
    if not install:
        raise TrainingRuntimeMissing(
            f"the onnxruntime-training {ORT_TRAINING_VERSION} runtime for {interpreter.tag} is not installed "
            f"(or is outdated) in {target}. {_HOW_TO}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _install_lock(target):
        # Another process may have finished the install while this one waited for the lock.
        if not _is_complete(target, interpreter):
            _install(interpreter, target)
    return TrainingRuntime(interpreter.path, target)


@contextlib.contextmanager
def _install_lock(target: Path) -> Iterator[None]:
    import fcntl  # Linux-only module; only reached after the platform check.

    with open(target.with_name(target.name + ".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _install(interpreter: _Interpreter, target: Path) -> None:
    _refuse_foreign_folder(target)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".staging-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the runtime may be shared by several users.
    try:
        started = time.monotonic()
        _pip_install(interpreter, staging)
        for library in _UNUSED_LIBRARIES:
            (staging / library).unlink(missing_ok=True)
        marker = {**_expected_marker(interpreter), "seconds": round(time.monotonic() - started, 1)}
        _write_json_atomic(staging / MARKER_NAME, marker)
        _replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _refuse_foreign_folder(target: Path) -> None:
    """Only an empty folder or one of our own (outdated) installs may be replaced."""
    if target.exists() and any(target.iterdir()) and not (target / MARKER_NAME).exists():
        raise TrainingError(
            f"{target} exists and is not an onnxcompress training runtime; remove it or set {DIR_ENV} elsewhere"
        )


def _pip_install(interpreter: _Interpreter, staging: Path) -> None:
    command = [
        # -I drops PYTHONPATH and the user site (a venv's own site-packages, where its pip lives, stays).
        os.fspath(interpreter.path), "-I", "-m", "pip", "install", "--target", os.fspath(staging),
        # Wheels only: a source build of any of these would need a compiler and take ages.
        "--only-binary=:all:", "--no-input", "--disable-pip-version-check", "--progress-bar", "off",
        *REQUIREMENTS,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).strip().splitlines()
        raise TrainingError(
            f"installing {' '.join(REQUIREMENTS)} into {staging} with {interpreter.path} failed "
            f"(exit {completed.returncode}):\n" + "\n".join(output[-30:])
        )


def _write_json_atomic(path: Path, content: dict[str, object]) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _replace_folder(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; an outdated install is moved aside first and deleted afterwards."""
    if target.exists() and any(target.iterdir()):
        outdated = Path(tempfile.mkdtemp(prefix=target.name + ".outdated-", dir=target.parent))
        os.replace(target, outdated / "runtime")
        os.replace(staging, target)
        shutil.rmtree(outdated, ignore_errors=True)
    else:
        # rename(2) replaces an empty directory.
        os.replace(staging, target)


# ----------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m onnxcompress.runtime.training_env",
        description=f"Locate or install the private onnxruntime-training {ORT_TRAINING_VERSION} runtime.",
    )
    parser.add_argument("--install", action="store_true", help="install it when it is missing or outdated")
    parser.add_argument(
        "--skip-unsupported", action="store_true",
        help="exit 0 with a note when this machine cannot host the runtime (no x86-64 Linux CPython 3.10/3.11)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        runtime = ensure_training_runtime(install=args.install)
    except TrainingRuntimeMissing as exc:
        print(exc, file=sys.stderr)
        return 0 if args.skip_unsupported and args.install else exc.exit_code
    except OnnxCompressError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    print(f"onnxruntime-training {ORT_TRAINING_VERSION}: {runtime.target_dir} (python {runtime.python}, "
          f"{time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
