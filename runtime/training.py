"""Fine-tuning on ONNX graphs with onnxruntime-training, driven from the main environment.

onnxruntime-training 1.19.2 cannot share a process (or a site-packages) with the main environment's
`onnxruntime`, so `TrainingRuntimeSession` starts `training_worker.py` in the private runtime's interpreter
(see `training_env.py`) and talks to it over pipes; the protocol is described in `training_worker.py`.

Guarantees:

* Every method either returns its result or raises `TrainingError` carrying the worker's message: a failing
  command (e.g. an op without a gradient, a wrong input name), a worker that died (with the tail of its log) or
  one that did not answer within `timeout` seconds (it is then killed). After a death or a timeout the session
  is closed; after an ordinary command failure it stays usable.
* Arrays cross the process boundary as .npy files in a private temporary folder; each file is deleted as soon
  as its request is answered, and the folder when the session closes. Closing (or leaving the `with` block)
  always stops the worker, and the worker also exits by itself when this process goes away (stdin closes).
* No onnxruntime-training code is imported into this process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn

import numpy as np

from onnxcompress.errors import TrainingError
from onnxcompress.runtime.training_env import TrainingRuntime, ensure_training_runtime

__all__ = [
    "IDENTITY_GRADIENT",
    "Artifacts",
    "GradientNode",
    "LossType",
    "OpenedArtifacts",
    "OptimizerType",
    "ParameterInfo",
    "StepResult",
    "TrainingRuntimeSession",
]

LossType = Literal["cross_entropy", "mse", "none"]
OptimizerType = Literal["adamw", "sgd"]
PathLike = str | os.PathLike[str]

WORKER_SCRIPT = Path(__file__).with_name("training_worker.py")
# Importing onnxruntime-training takes about a second; a cold disk cache can make it much slower.
STARTUP_TIMEOUT = 120.0
_LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class GradientNode:
    """One node of a gradient definition. Inputs name `GO(i)` (gradient of forward output i), `I(i)`, `O(i)`
    (forward input / output i) or intermediate values; outputs name `GI(i)` (gradient of forward input i) or
    intermediate values."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    domain: str = ""


# The gradient passes through unchanged: the straight-through estimator for Round and the like.
IDENTITY_GRADIENT: tuple[GradientNode, ...] = (GradientNode("Identity", ("GO(0)",), ("GI(0)",)),)


@dataclass(frozen=True)
class Artifacts:
    """Generated training artifacts and how to feed them.

    `inputs` are the data inputs of the training/eval models, `label_inputs` the subset the loss added
    ("labels" for cross-entropy, "target" for MSE, none when the model computes its own loss); the models
    output `loss_output` first, then `outputs` (the model's own outputs).
    """

    directory: Path
    inputs: tuple[str, ...]
    label_inputs: tuple[str, ...]
    loss_output: str
    outputs: tuple[str, ...]
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    loss: LossType
    optimizer: OptimizerType

    @classmethod
    def _from_worker(cls, directory: PathLike, meta: Mapping[str, Any]) -> Artifacts:
        return cls(
            directory=Path(directory),
            inputs=tuple(meta["inputs"]),
            label_inputs=tuple(meta["label_inputs"]),
            loss_output=meta["loss_output"],
            outputs=tuple(meta["outputs"]),
            trainable=tuple(meta["trainable"]),
            frozen=tuple(meta["frozen"]),
            loss=meta["loss"],
            optimizer=meta["optimizer"],
        )


@dataclass(frozen=True)
class ParameterInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    trainable: bool


@dataclass(frozen=True)
class OpenedArtifacts:
    artifacts: Artifacts
    parameters: Mapping[str, ParameterInfo]
    learning_rate: float


@dataclass(frozen=True)
class StepResult:
    loss: float
    outputs: dict[str, np.ndarray]


class TrainingRuntimeSession:
    """One worker process holding at most one opened set of artifacts; use it as a context manager.

    `runtime` defaults to `ensure_training_runtime(install=install)`. `timeout` bounds every command.
    """

    def __init__(self, runtime: TrainingRuntime | None = None, *, timeout: float = 600.0,
                 install: bool = False) -> None:
        self.runtime = runtime or ensure_training_runtime(install=install)
        self.timeout = timeout
        self._tmp = Path(tempfile.mkdtemp(prefix="onnxcompress-training-"))
        self._ids = itertools.count()
        self._opened: OpenedArtifacts | None = None
        # A file, not a pipe: nobody has to drain it, and its tail explains a crash.
        self._log_path = self._tmp / "worker.log"
        try:
            with open(self._log_path, "wb") as log:
                self._process = subprocess.Popen(
                    [os.fspath(self.runtime.python), "-I", "-S", os.fspath(WORKER_SCRIPT),
                     os.fspath(self.runtime.target_dir), os.fspath(self._tmp)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=self._tmp,
                    text=True, encoding="utf-8",
                    # Its own session: Ctrl-C reaches only this process, which then closes the worker in order.
                    start_new_session=True,
                )
        except OSError as exc:
            self._cleanup()
            raise TrainingError(f"cannot start the training worker with {self.runtime.python}: {exc}") from exc
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_lines, name="training-worker-reader", daemon=True)
        self._reader.start()
        try:
            ready = self._receive("startup", STARTUP_TIMEOUT)
            if not ready.get("ready"):
                raise TrainingError(f"the training worker could not start: {ready['error']['message']}")
        except BaseException:
            self.close()
            raise
        self.versions: dict[str, str] = ready["versions"]

    # ------------------------------------------------------------------------------------------- commands

    def generate_artifacts(
        self, model: PathLike, output_dir: PathLike, *, trainable: Sequence[str], frozen: Sequence[str] = (),
        loss: LossType = "cross_entropy", optimizer: OptimizerType = "adamw", loss_input: str | None = None,
        weight_decay: float = 0.0,
    ) -> Artifacts:
        """Training, eval and optimizer models plus the initial checkpoint of `model` in `output_dir`.

        `output_dir` must be absent or empty; it ends up complete or untouched. `model` needs IR <= 10 and
        opset <= 21. The loss applies to `loss_input` (default: the first model output); with `loss="none"`
        the model's first output is the loss. Parameters neither trainable nor frozen become constants.
        Registered gradients (`register_gradient`) apply to later calls in this session.
        """
        meta = self._call("generate_artifacts", {
            "model": os.path.abspath(model), "output_dir": os.path.abspath(output_dir),
            "trainable": list(trainable), "frozen": list(frozen), "loss": loss, "optimizer": optimizer,
            "loss_input": loss_input, "weight_decay": weight_decay,
        })
        return Artifacts._from_worker(meta["directory"], meta)

    def open(self, artifacts_dir: PathLike, *, checkpoint: PathLike | None = None,
             learning_rate: float | None = None) -> OpenedArtifacts:
        """Load the artifacts (with `checkpoint` instead of the generated one, if given) for training."""
        result = self._call("open", {
            "artifacts_dir": os.path.abspath(artifacts_dir),
            "checkpoint": None if checkpoint is None else os.path.abspath(checkpoint),
            "learning_rate": learning_rate,
        })
        parameters = {
            name: ParameterInfo(tuple(info["shape"]), np.dtype(info["dtype"]), info["trainable"])
            for name, info in result["parameters"].items()
        }
        artifacts = Artifacts._from_worker(os.path.abspath(artifacts_dir), result)
        self._opened = OpenedArtifacts(artifacts, parameters, result["learning_rate"])
        return self._opened

    def train_step(self, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None, *,
                   return_outputs: bool = False) -> StepResult:
        """Forward, backward and one optimizer step on one batch; the loss (and outputs) before the update."""
        feeds = self._feeds(inputs, labels)
        result = self._call("train_step", {"return_outputs": return_outputs}, {"inputs": feeds})
        return StepResult(result["loss"], self._take_arrays(result["outputs"]))

    def gradients(self, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None, *,
                  names: Iterable[str]) -> tuple[float, dict[str, np.ndarray]]:
        """The loss and the gradients of the named trainable parameters on one batch, without an optimizer step
        (the training model's mode: BatchNormalization on batch statistics, Dropout active)."""
        result = self._call("gradients", {"names": list(names)}, {"inputs": self._feeds(inputs, labels)})
        return result["loss"], self._take_arrays(result["gradients"])

    def eval_step(self, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None) -> StepResult:
        """Loss and outputs of the eval model (BatchNormalization/Dropout in inference mode)."""
        result = self._call("eval_step", {}, {"inputs": self._feeds(inputs, labels)})
        return StepResult(result["loss"], self._take_arrays(result["outputs"]))

    def set_lr(self, learning_rate: float) -> float:
        """Set the (single, shared) learning rate; returns it as the optimizer stores it (float32)."""
        return self._call("set_lr", {"learning_rate": learning_rate})["learning_rate"]

    def get_parameters(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Current values of the named checkpoint parameters (all of them by default)."""
        result = self._call("get_parameters", {"names": None if names is None else list(names)})
        return self._take_arrays(result["parameters"])

    def set_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace parameter values (same shape and dtype); the next step uses them. All or nothing."""
        self._call("set_parameters", {}, {"parameters": values})

    def save_checkpoint(self, path: PathLike, *, include_optimizer_state: bool = False) -> Path:
        """Write the current parameters (and optionally the optimizer moments) as a checkpoint file, atomically."""
        return Path(self._call("save_checkpoint", {
            "path": os.path.abspath(path), "include_optimizer_state": include_optimizer_state,
        })["path"])

    def export_inference(self, path: PathLike, output_names: Sequence[str] | None = None) -> Path:
        """The eval model cut at `output_names` (default: the model's own outputs), with the current weights."""
        if output_names is None:
            output_names = self._require_opened().artifacts.outputs
        return Path(self._call("export_inference", {
            "path": os.path.abspath(path), "output_names": list(output_names),
        })["path"])

    def register_gradient(self, op_type: str, nodes: Sequence[GradientNode] = IDENTITY_GRADIENT, *,
                          domain: str = "") -> None:
        """Define the gradient of `op_type` for later `generate_artifacts` calls of this session."""
        self._call("register_gradient", {
            "op_type": op_type, "domain": domain,
            "nodes": [{"op_type": node.op_type, "domain": node.domain, "inputs": list(node.inputs),
                       "outputs": list(node.outputs)} for node in nodes],
        })

    def close(self) -> None:
        """Stop the worker and delete the temporary folder; safe to call more than once."""
        process = getattr(self, "_process", None)
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(TrainingError):  # it is stopped below either way
                    self._call("close", {}, timeout=10.0)
            self._stop_process()
        self._cleanup()

    def __enter__(self) -> TrainingRuntimeSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ transport

    def _call(self, command: str, args: dict[str, Any],
              arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None, *,
              timeout: float | None = None) -> dict[str, Any]:
        if self._process.poll() is not None:
            raise TrainingError(f"{command}: the training worker is not running (session closed or crashed)")
        request_id = next(self._ids)
        written: list[Path] = []
        try:
            for field, named in (arrays or {}).items():
                args[field] = {name: self._write_array(request_id, len(written), array, written)
                               for name, array in named.items()}
            self._send({"id": request_id, "cmd": command, "args": args}, command)
            response = self._receive(command, self.timeout if timeout is None else timeout)
        finally:
            for path in written:
                path.unlink(missing_ok=True)
        if response.get("id") != request_id:
            self._fail(f"{command}: protocol error, expected response {request_id}, got {str(response)[:200]}")
        if not response["ok"]:
            error = response["error"]
            raise TrainingError(f"{command} failed ({error['type']}): {error['message']}")
        return response["result"]

    def _write_array(self, request_id: int, index: int, array: np.ndarray, written: list[Path]) -> str:
        path = self._tmp / f"in-{request_id}-{index}.npy"
        written.append(path)
        np.save(path, np.asarray(array, order="C"), allow_pickle=False)  # keeps 0-d arrays 0-d
        return os.fspath(path)

    def _take_arrays(self, paths: Mapping[str, str]) -> dict[str, np.ndarray]:
        """Load the worker's output files and delete them."""
        arrays = {}
        for name, path in paths.items():
            arrays[name] = np.load(path, allow_pickle=False)
            os.unlink(path)
        return arrays

    def _send(self, message: dict[str, Any], command: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            self._fail(f"{command}: the training worker is gone ({exc})")

    def _receive(self, command: str, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self._fail(f"{command}: the training worker did not answer within {timeout:g} s")
        if line is None:
            self._fail(f"{command}: the training worker exited")
        try:
            return json.loads(line)
        except ValueError:
            self._fail(f"{command}: the training worker sent a malformed line {line[:200]!r}")

    def _read_lines(self) -> None:
        """Reader thread: a blocking readline cannot time out, so the queue carries lines and a final None."""
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _fail(self, message: str) -> NoReturn:
        """Kill the worker and raise, with the end of its log: the session cannot be trusted any more."""
        self._stop_process(kill=True)
        code = self._process.returncode
        raise TrainingError(f"{message} (exit code {code}); worker log tail:\n{self._log_tail()}")

    def _stop_process(self, *, kill: bool = False) -> None:
        if kill:
            self._process.kill()
        elif self._process.stdin is not None and not self._process.stdin.closed:
            with contextlib.suppress(OSError):  # a worker that is already gone
                self._process.stdin.close()  # the worker exits when its stdin closes
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            # Bounded: a wait interrupted by Ctrl-C can leave Popen's internal lock held; the worker is killed.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        # The reader sees end-of-file once the worker is gone; only then may its pipe be closed.
        self._reader.join(timeout=5)
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None and not self._reader.is_alive():
                pipe.close()

    def _log_tail(self) -> str:
        try:
            lines = self._log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def _cleanup(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ----------------------------------------------------------------------------------------------- misc

    def _require_opened(self) -> OpenedArtifacts:
        if self._opened is None:
            raise TrainingError("no artifacts are open: call open() first")
        return self._opened

    def _feeds(self, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None) -> dict[str, np.ndarray]:
        """`inputs` plus `labels` bound to the loss's label input."""
        feeds = dict(inputs)
        if labels is None:
            return feeds
        label_inputs = self._require_opened().artifacts.label_inputs
        if len(label_inputs) != 1:
            raise TrainingError(f"labels given, but the loss takes {len(label_inputs)} label inputs {label_inputs}")
        feeds[label_inputs[0]] = np.asarray(labels)
        return feeds
