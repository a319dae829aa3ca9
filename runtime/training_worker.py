"""The training worker: a script run by `training.py` in the private onnxruntime-training interpreter.

It is never imported by onnxcompress. It runs as `<python> -I -S training_worker.py <runtime dir> <tmp dir>`:
`-I -S` keep the interpreter's own site-packages, PYTHONPATH and the script's folder off sys.path, so the only
third-party packages it sees are those of the private runtime folder (which would otherwise clash with the main
environment's `onnxruntime`). Only the standard library is imported before that folder is on sys.path.

Protocol (stdin/stdout, one JSON object per line, ASCII):

* on start the worker sends `{"ready": true, "versions": {...}}`, or `{"ready": false, "error": {...}}` and exits;
* request  `{"id": <int>, "cmd": <name>, "args": {...}}`;
* response `{"id": <same>, "ok": true, "result": {...}}` or `{"id": <same>, "ok": false, "error":
  {"type": <exception class>, "message": <text>}}`; every request gets exactly one response, in order;
* arrays travel as .npy files (no pickles): the client names input files in `args`, the worker writes output
  files into `<tmp dir>` and names them in `result`; the client deletes both.

Guarantees: nothing but protocol lines is ever written to the protocol channel (stdout is re-pointed at stderr,
so prints and native logs cannot corrupt it); an exception in a command becomes an error response and the worker
keeps serving; the worker exits when stdin closes or after answering `close`. `generate_artifacts` leaves the
output folder either complete (with `artifacts.json` describing the artifacts) or untouched.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

# onnxruntime-training 1.19.2 reads IR <= 10 and default-domain opsets <= 21.
MAX_IR_VERSION = 10
MAX_OPSET = 21
ARTIFACTS_META = "artifacts.json"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"

# C++ errors arrive as "<source path>:<line> <C++ signature> <condition> was false. <message>".
_ORT_SOURCE_PREFIX = re.compile(r"^\S*onnxruntime_src/\S+:\d+ .*? was false\. ", re.DOTALL)
_MISSING_GRADIENT = re.compile(r"gradient builder has not been registered: (\S+) for node (\S*)")

JsonDict = dict[str, Any]


# ------------------------------------------------------------------------------------------------ imports


def _import_training(runtime_dir: str) -> types.SimpleNamespace:
    """Import the private runtime's onnxruntime-training modules, without torch.

    `onnxruntime/training/__init__.py` imports torch (ORTModule), which is not installed, but the submodules
    used here do not need it: a stand-in package object with the real `__path__` lets Python import them
    without running that `__init__`.
    """
    sys.path.insert(0, runtime_dir)
    import numpy
    import onnx
    import onnxruntime

    package = types.ModuleType("onnxruntime.training")
    package.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
    sys.modules["onnxruntime.training"] = package
    from onnxruntime.capi import _pybind_state
    from onnxruntime.training import api, artifacts, onnxblock
    from onnxruntime.training.onnxblock import _training_graph_utils

    def quiet_session_options() -> onnxruntime.SessionOptions:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        return options

    # generate_artifacts builds its graphs with a default SessionOptions, whose logger prints every graph
    # transformer at INFO; onnxruntime.set_default_logger_severity does not reach it, the options' level does.
    _training_graph_utils.SessionOptions = quiet_session_options
    return types.SimpleNamespace(np=numpy, onnx=onnx, ort=onnxruntime, C=_pybind_state, api=api,
                                 artifacts=artifacts, onnxblock=onnxblock)


# ---------------------------------------------------------------------------------------------- artifacts


def _check_model_versions(model: Any, what: str) -> None:
    if model.ir_version > MAX_IR_VERSION:
        raise ValueError(
            f"{what} has IR version {model.ir_version}; onnxruntime-training 1.19.2 reads IR <= {MAX_IR_VERSION}"
            " (onnxcompress.runtime.model_io load_model + save_model lower it when the opsets allow)"
        )
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_OPSET:
            raise ValueError(
                f"{what} imports opset {opset.version}; onnxruntime-training 1.19.2 supports opsets <= {MAX_OPSET}"
                f" (onnxcompress.runtime.model_io.load_model(target_opset_max={MAX_OPSET}) converts it)"
            )


def _check_parameter_names(model: Any, trainable: list[str], frozen: list[str]) -> None:
    initializers = {tensor.name for tensor in model.graph.initializer}
    unknown = sorted(set(trainable + frozen) - initializers)
    if unknown:
        raise ValueError(f"not initializers of the model: {unknown}")
    both = sorted(set(trainable) & set(frozen))
    if both:
        raise ValueError(f"parameters both trainable and frozen: {both}")
    if not trainable:
        raise ValueError("no trainable parameters")


def _prepare_output_folder(output_dir: Path) -> Path:
    """A staging folder beside `output_dir`, which must be absent or empty."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"artifact folder {output_dir} exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=output_dir.name + ".partial-", dir=output_dir.parent))
    umask = os.umask(0o022)  # mkdtemp makes the folder private; the artifacts get the user's normal folder mode
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def _describe_artifacts(onnx: Any, base: Any, staging: Path, request: JsonDict) -> JsonDict:
    """What a client needs to feed and read the generated models, from the eval model's signature."""
    eval_model = onnx.load(os.fspath(staging / EVAL_MODEL), load_external_data=False)
    for path in sorted(staging.glob("*.onnx")):
        _check_model_versions(onnx.load(os.fspath(path), load_external_data=False), f"generated {path.name}")
    parameters = set(request["trainable"]) | set(request["frozen"])
    base_inputs = {value.name for value in base.graph.input}
    data_inputs = [value.name for value in eval_model.graph.input if value.name not in parameters]
    outputs = [value.name for value in eval_model.graph.output]
    return {
        **request,
        "inputs": data_inputs,
        "label_inputs": [name for name in data_inputs if name not in base_inputs],
        "loss_output": outputs[0],
        "outputs": outputs[1:],
    }


# ------------------------------------------------------------------------------------------------- worker


class Worker:
    """The state of one training session: at most one opened set of artifacts."""

    def __init__(self, libs: types.SimpleNamespace, tmp_dir: Path) -> None:
        self.libs = libs
        self.tmp_dir = tmp_dir
        self.closed = False
        self._state: Any = None
        self._module: Any = None
        self._optimizer: Any = None
        self._output_ids = itertools.count()
        self.commands: dict[str, Callable[..., JsonDict]] = {
            "generate_artifacts": self.generate_artifacts,
            "open": self.open,
            "train_step": self.train_step,
            "gradients": self.gradients,
            "eval_step": self.eval_step,
            "set_lr": self.set_lr,
            "get_parameters": self.get_parameters,
            "set_parameters": self.set_parameters,
            "save_checkpoint": self.save_checkpoint,
            "export_inference": self.export_inference,
            "register_gradient": self.register_gradient,
            "close": self.close,
        }

    # -- arrays

    def _load_array(self, path: str) -> Any:
        return self.libs.np.load(path, allow_pickle=False)

    def _save_array(self, array: Any) -> str:
        path = self.tmp_dir / f"out-{os.getpid()}-{next(self._output_ids)}.npy"
        self.libs.np.save(path, self.libs.np.asarray(array, order="C"), allow_pickle=False)  # 0-d stays 0-d
        return os.fspath(path)

    # -- commands

    def generate_artifacts(
        self, model: str, output_dir: str, trainable: list[str], frozen: list[str], loss: str, optimizer: str,
        loss_input: str | None, weight_decay: float,
    ) -> JsonDict:
        onnx, artifacts = self.libs.onnx, self.libs.artifacts
        base = onnx.load(model, load_external_data=False)
        _check_model_versions(base, model)
        _check_parameter_names(base, trainable, frozen)
        graph_outputs = [value.name for value in base.graph.output]
        loss_input = loss_input or graph_outputs[0]
        if loss_input not in graph_outputs:
            raise ValueError(f"loss input {loss_input!r} is not a model output {graph_outputs}")
        loss_types = {"cross_entropy": artifacts.LossType.CrossEntropyLoss, "mse": artifacts.LossType.MSELoss}
        optimizers = {
            "adamw": lambda: self.libs.onnxblock.optim.AdamW(weight_decay=weight_decay),
            "sgd": self.libs.onnxblock.optim.SGD,
        }
        if loss not in (*loss_types, "none") or optimizer not in optimizers:
            raise ValueError(f"unknown loss {loss!r} or optimizer {optimizer!r}")
        if optimizer == "sgd" and weight_decay:
            raise ValueError("weight decay needs the adamw optimizer")
        destination = Path(output_dir)
        staging = _prepare_output_folder(destination)
        try:
            artifacts.generate_artifacts(
                model,  # a path, so that models with external data and models over 2 GB work
                requires_grad=trainable,
                frozen_params=frozen,
                # "none": the model's first output is the loss; it and the other outputs pass through.
                loss=loss_types.get(loss),
                # Without these, a second model output would become the loss's labels, and the loss would be
                # the only output of the training and eval models.
                loss_input_names=None if loss == "none" else [loss_input],
                additional_output_names=None if loss == "none" else graph_outputs,
                optimizer=optimizers[optimizer](),
                artifact_directory=staging,
            )
            request = {"model": model, "trainable": trainable, "frozen": frozen, "loss": loss,
                       "optimizer": optimizer, "loss_input": None if loss == "none" else loss_input}
            meta = _describe_artifacts(onnx, base, staging, request)
            (staging / ARTIFACTS_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            os.replace(staging, destination)  # rename(2) replaces an absent or empty folder
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {**meta, "directory": os.fspath(destination)}

    def open(self, artifacts_dir: str, checkpoint: str | None, learning_rate: float | None) -> JsonDict:
        api = self.libs.api
        folder = Path(artifacts_dir)
        meta = json.loads((folder / ARTIFACTS_META).read_text(encoding="utf-8"))
        state = api.CheckpointState.load_checkpoint(os.fspath(checkpoint or folder / CHECKPOINT))
        module = api.Module(os.fspath(folder / TRAINING_MODEL), state, os.fspath(folder / EVAL_MODEL), device="cpu")
        optimizer = api.Optimizer(os.fspath(folder / OPTIMIZER_MODEL), module)
        if learning_rate is not None:
            optimizer.set_learning_rate(learning_rate)
        # Only a fully opened set replaces the previous one.
        self._state, self._module, self._optimizer = state, module, optimizer
        parameters = {
            name: {"shape": list(parameter.data.shape), "dtype": str(parameter.data.dtype),
                   "trainable": parameter.requires_grad}
            for name, parameter in state.parameters
        }
        return {**meta, "parameters": parameters, "learning_rate": optimizer.get_learning_rate()}

    def train_step(self, inputs: dict[str, str], return_outputs: bool) -> JsonDict:
        module = self._opened().train()
        fetches = self._run(module, inputs)
        self._optimizer.step()
        # Gradients accumulate across calls until reset; one step = one batch.
        module.lazy_reset_grad()
        return self._step_result(module, fetches, return_outputs)

    def gradients(self, inputs: dict[str, str], names: list[str]) -> JsonDict:
        module = self._opened().train()
        module.lazy_reset_grad()  # this batch's gradients only, not added to an earlier one's
        fetches = self._run(module, inputs)
        grads = {name: self._parameter(name).grad for name in names}
        missing = sorted(name for name, grad in grads.items() if grad is None)
        if missing:
            raise ValueError(f"parameters {missing} have no gradient: are they trainable?")
        module.lazy_reset_grad()
        result = self._step_result(module, fetches, return_outputs=False)
        return {**result, "gradients": {name: self._save_array(grad) for name, grad in grads.items()}}

    def eval_step(self, inputs: dict[str, str]) -> JsonDict:
        module = self._opened().eval()
        return self._step_result(module, self._run(module, inputs), return_outputs=True)

    def set_lr(self, learning_rate: float) -> JsonDict:
        self._opened()
        self._optimizer.set_learning_rate(learning_rate)
        return {"learning_rate": self._optimizer.get_learning_rate()}

    def get_parameters(self, names: list[str] | None) -> JsonDict:
        parameters = self._opened_state().parameters
        wanted = names if names is not None else [name for name, _ in parameters]
        return {"parameters": {name: self._save_array(self._parameter(name).data) for name in wanted}}

    def set_parameters(self, parameters: dict[str, str]) -> JsonDict:
        state = self._opened_state()
        arrays = {name: self._load_array(path) for name, path in parameters.items()}
        # Check everything first, so that a bad array does not leave the others half-applied.
        for name, array in arrays.items():
            current = self._parameter(name).data
            if array.shape != current.shape or array.dtype != current.dtype:
                raise ValueError(f"parameter {name!r} is {current.dtype}{list(current.shape)}, "
                                 f"got {array.dtype}{list(array.shape)}")
        for name, array in arrays.items():
            state.parameters[name] = array
        return {}

    def save_checkpoint(self, path: str, include_optimizer_state: bool) -> JsonDict:
        state = self._opened_state()
        partial = f"{path}.partial-{os.getpid()}"
        self.libs.api.CheckpointState.save_checkpoint(state, partial, include_optimizer_state)
        os.replace(partial, path)
        return {"path": path}

    def export_inference(self, path: str, output_names: list[str]) -> JsonDict:
        module = self._opened()
        partial = f"{path}.partial-{os.getpid()}"
        module.export_model_for_inferencing(partial, output_names)
        os.replace(partial, path)
        return {"path": path}

    def register_gradient(self, op_type: str, domain: str, nodes: list[JsonDict]) -> JsonDict:
        C = self.libs.C
        definitions = []
        for node in nodes:
            definition = C.GradientNodeDefinition()
            definition.op_type, definition.domain = node["op_type"], node["domain"]
            definition.inputs, definition.outputs = node["inputs"], node["outputs"]
            definition.attributes = []
            definitions.append(definition)
        # Keys are "<domain>::<op type>[::<attribute values>]", as in ORTModule's custom gradient registry.
        key = f"{domain}::{op_type}"
        C.register_gradient_definition(key, definitions)
        return {"key": key}

    def close(self) -> JsonDict:
        self.closed = True
        return {}

    # -- helpers

    def _opened(self) -> Any:
        if self._module is None:
            raise RuntimeError("no artifacts are open: send `open` first")
        return self._module

    def _opened_state(self) -> Any:
        self._opened()
        return self._state

    def _parameter(self, name: str) -> Any:
        if name not in self._state.parameters:
            known = sorted(parameter for parameter, _ in self._state.parameters)
            raise KeyError(f"no parameter {name!r} in the checkpoint; it has {known}")
        return self._state.parameters[name]

    def _run(self, module: Any, inputs: dict[str, str]) -> list[Any]:
        expected = module.input_names()
        if set(inputs) != set(expected):
            raise ValueError(f"the model takes inputs {expected}, got {sorted(inputs)}")
        fetches = module(*(self._load_array(inputs[name]) for name in expected))
        # One output comes back bare, several as a tuple.
        return list(fetches) if isinstance(fetches, tuple) else [fetches]

    def _step_result(self, module: Any, fetches: list[Any], return_outputs: bool) -> JsonDict:
        names = module.output_names()
        loss = fetches[0]
        if loss.size != 1:
            raise ValueError(f"the loss output {names[0]!r} has shape {list(loss.shape)}; it must be a scalar")
        outputs = zip(names[1:], fetches[1:], strict=True) if return_outputs else ()
        return {"loss": float(loss.reshape(())), "outputs": {name: self._save_array(value) for name, value in outputs}}


# --------------------------------------------------------------------------------------------- transport


def _error(exc: BaseException) -> JsonDict:
    message = _ORT_SOURCE_PREFIX.sub("", str(exc)).strip() or repr(exc)
    missing = _MISSING_GRADIENT.search(message)
    if missing:
        message = (
            f"onnxruntime-training 1.19.2 cannot differentiate op {missing.group(1)} (node {missing.group(2)!r}), "
            "which lies between a trainable parameter and the loss; onnxcompress gives the ops real models use a "
            "differentiable form (README, fine-tuning), but not this one yet. From Python, "
            "TrainingRuntimeSession.register_gradient defines one (IDENTITY_GRADIENT: a straight-through estimator)"
        )
    return {"type": type(exc).__name__, "message": message}


def _handle(worker: Worker, line: str) -> JsonDict:
    request_id = None
    try:
        request = json.loads(line)
        request_id = request.get("id")
        command = worker.commands.get(request.get("cmd"))
        if command is None:
            raise ValueError(f"unknown command {request.get('cmd')!r}")
        return {"id": request_id, "ok": True, "result": command(**request.get("args", {}))}
    except Exception as exc:  # every failure is reported to the client, which decides what it means
        traceback.print_exc(file=sys.stderr)
        return {"id": request_id, "ok": False, "error": _error(exc)}


def _claim_stdout() -> TextIO:
    """A private handle on the protocol pipe; fd 1 and sys.stdout then point at stderr."""
    protocol = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


def _send(protocol: TextIO, message: JsonDict) -> None:
    protocol.write(json.dumps(message) + "\n")
    protocol.flush()


def serve(worker: Worker, requests: Iterable[str], protocol: TextIO) -> None:
    for line in requests:
        if line.strip():
            _send(protocol, _handle(worker, line))
        if worker.closed:
            return


def main(argv: list[str]) -> int:
    runtime_dir, tmp_dir = argv
    protocol = _claim_stdout()
    try:
        libs = _import_training(runtime_dir)
    except Exception as exc:  # a broken install: say so instead of leaving the client waiting
        traceback.print_exc(file=sys.stderr)
        _send(protocol, {"ready": False, "error": _error(exc)})
        return 1
    versions = {"python": sys.version.split()[0], "onnxruntime": libs.ort.__version__,
                "onnx": libs.onnx.__version__, "numpy": libs.np.__version__}
    _send(protocol, {"ready": True, "versions": versions})
    serve(Worker(libs, Path(tmp_dir)), sys.stdin, protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
