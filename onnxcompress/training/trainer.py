"""The fine-tuning loop: compress, train with onnxruntime-training, keep checkpoints, export the best.

    create_compressed_model (calibration on the first training samples)  →  training graph = compressed graph +
    loss  →  artifacts (once per checkpoint folder)  →  epochs: seeded shuffle and augmentation, per-step learning
    rate, train steps, scheduler steps, validation metric, checkpoint (weights + optimizer state) and run state  →
    best checkpoint  →  exported deployable model

Resuming: the checkpoint folder holds the artifacts, `last-<epoch>.ckpt` (with optimizer state),
`best-<epoch>.ckpt` and `run.json` (finished epochs, history, best metric, scheduler states, a fingerprint of
model and settings, which checkpoints are current and the checksum of every file the run wrote). A resumed run
restarts the interrupted epoch from its beginning, with the same order and learning rates, so it ends where an
uninterrupted run ends. Every file is written atomically and a checkpoint under a new name; `run.json` is written
after them and only then are the checkpoints it replaced removed, so an interruption at any point leaves a
folder that resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from tqdm.auto import tqdm

from onnxcompress.algorithms.quantization.ptq import export_graph
from onnxcompress.compression.api import BuildContext
from onnxcompress.compression.registry import CompressedModel, create_compressed_model
from onnxcompress.config import FinetuneConfig, Metric, Schedule, TrainingConfig
from onnxcompress.data import model_inputs
from onnxcompress.errors import CheckpointError, ConfigError, OutputError, TrainingError
from onnxcompress.runtime.checksum import sha256_file
from onnxcompress.runtime.model_io import external_data_files, static_dim
from onnxcompress.runtime.outputs import write_text_atomic
from onnxcompress.runtime.training import TrainingRuntimeSession
from onnxcompress.training.augment import augment, check_image_inputs
from onnxcompress.training.data import Batch, LabelledData, LabelSpec
from onnxcompress.training.loss import LABELS_INPUT, TEACHER_INPUT, LossBuilder, add_loss
from onnxcompress.transforms.op_table import Role, spec
from onnxcompress.transforms.passes import differentiable_forms, infer_shapes

MetricFunction = Callable[[np.ndarray, np.ndarray], float]
RUN_STATE = "run.json"
ARTIFACTS = "artifacts"
LAST, BEST = "last", "best"


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    metric: float
    learning_rate: float
    statistics: dict[str, float] = field(default_factory=dict)
    #: Whether every algorithm had reached its target (a sparsity schedule its target level) in this epoch.
    complete: bool = True


@dataclass
class RunState:
    fingerprint: str
    #: Validation metric of the compressed model before training (the post-training starting point).
    initial_metric: float | None = None
    epochs_done: int = 0
    best_epoch: int | None = None
    best_metric: float | None = None
    #: Whether the best epoch is a complete one (see EpochRecord.complete).
    best_complete: bool = False
    history: list[EpochRecord] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    #: SHA-256 of every file of the checkpoint folder the run wrote (artifacts and checkpoints), by relative path:
    #: a resumed run reads only files that are still exactly these.
    files: dict[str, str] = field(default_factory=dict)
    #: File names of the current checkpoints of each kind (LAST, BEST) in the checkpoint folder.
    checkpoints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> RunState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["history"] = [EpochRecord(**record) for record in data["history"]]
            state = cls(**data)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"cannot resume: {path} is not a run state written by onnxcompress "
                                  f"({type(error).__name__}: {error})") from None
        if not isinstance(state.epochs_done, int) or state.epochs_done < 1 or state.best_epoch is None:
            raise CheckpointError(f"cannot resume: {path} records no finished epoch")
        if not isinstance(state.files, dict) or not state.files or \
                not all(isinstance(v, str) for v in state.files.values()):
            raise CheckpointError(f"cannot resume: {path} records no checksums of the checkpoint files")
        if not isinstance(state.checkpoints, dict) or \
                any(state.checkpoints.get(kind) not in state.files for kind in (LAST, BEST)):
            raise CheckpointError(f"cannot resume: {path} names no recorded last and best checkpoints")
        return state

    def record(self, folder: Path, names: list[str]) -> None:
        for name in names:
            self.files[name] = sha256_file(folder / name)

    def verify(self, folder: Path, entry: str) -> None:
        """CheckpointError unless the file or folder `entry` of `folder` holds exactly the files recorded, with
        the recorded contents, and no symlink."""
        base = folder / entry
        found = [base] if base.is_file() or base.is_symlink() else list(base.rglob("*")) if base.is_dir() else []
        if any(path.is_symlink() for path in found):
            raise CheckpointError(f"cannot resume: {base} is or holds a symlink")
        present = {str(path.relative_to(folder)) for path in found if not path.is_dir()}
        recorded = {name for name in self.files if name == entry or name.startswith(entry + "/")}
        for name in sorted(recorded ^ present):
            change = "is missing" if name in recorded else "was not written by this run"
            raise CheckpointError(f"cannot resume: checkpoint file {folder / name} {change}")
        for name in sorted(recorded):
            if sha256_file(folder / name) != self.files[name]:
                raise CheckpointError(f"cannot resume: checkpoint file {folder / name} changed since it was written")

    def write(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self), indent=2))


@dataclass
class FinetuneResult:
    """The deployable model and how the run went (`summary()` gives the numbers as JSON-ready data)."""

    model: onnx.ModelProto
    compressed: CompressedModel
    history: list[EpochRecord]
    best_epoch: int
    best_metric: float
    #: Validation metric of the fake-quantized model before training (the post-training starting point).
    initial_metric: float
    #: Largest |exported - fake-quantized| validation logit difference relative to the logit range, with ONNX
    #: Runtime running the exported QDQ model in float (exact arithmetic) and with its fused integer kernels.
    export_error_float_path: float
    export_error_integer_kernels: float
    #: Largest |exported - exported without the finish commands| (channels removed vs zeroed) in ONNX Runtime with
    #: its graph optimizations (integer kernels for INT8), relative to the logit range: what filter pruning's
    #: surgery changes (0 when no algorithm has finish commands).
    export_error_surgery: float

    def summary(self) -> dict[str, Any]:
        return {"initial_metric": self.initial_metric, "best_epoch": self.best_epoch, "best_metric": self.best_metric,
                "export_error_float_path": self.export_error_float_path,
                "export_error_integer_kernels": self.export_error_integer_kernels,
                "export_error_surgery": self.export_error_surgery,
                "history": [asdict(record) for record in self.history]}


def _require_finite(parameters: dict[str, np.ndarray]) -> None:
    bad = sorted(name for name, values in parameters.items() if not np.isfinite(values).all())
    if bad:
        raise TrainingError(f"the trained parameters {', '.join(map(repr, bad[:5]))} hold NaN or infinite values; "
                            "nothing was exported (try a lower training.learning_rate)")


def learning_rate_at(step: int, steps_per_epoch: int, config: TrainingConfig) -> float:
    """The learning rate of global step `step`: linear warm-up, then the configured schedule."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule is Schedule.CONSTANT:
        return peak
    if config.schedule is Schedule.STEP:
        return peak * config.gamma ** ((step // steps_per_epoch) // config.step_epochs)
    total = max(config.epochs * steps_per_epoch - config.warmup_steps, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - config.warmup_steps) / total))


def build_training_model(model: onnx.ModelProto, settings: TrainingConfig, compression_losses: list[str],
                         custom_loss: LossBuilder | None = None) -> onnx.ModelProto:
    """`model` with the loss of `settings` (its first output becomes `loss`) in the form the training runtime
    differentiates."""
    return trainable_form(model, lambda graph: add_loss(graph, task=settings.loss, distillation=settings.distillation,
                                                        compression_losses=compression_losses, custom=custom_loss))


def trainable_form(model: onnx.ModelProto, edit: Callable[[gs.Graph], object] | None = None) -> onnx.ModelProto:
    """`model` (shapes inferred in place) with every op the training runtime cannot differentiate in its
    differentiable form, then `edit`ed (a loss added), with the shapes the runtime's gradient builders read."""
    infer_shapes(model)  # the differentiable forms of some ops need their input's rank
    graph = gs.import_onnx(model)
    differentiable_forms(graph)
    if edit is not None:
        edit(graph)
    training_model = export_graph(graph, model)
    # The new tensors carry a type without a shape, which the training runtime's checker rejects; the shapes are
    # inferred again with data propagation, because the runtime's gradient builders read them: without the
    # static 1s of a Reshape to a computed [N, 1, 1], Sub's gradient of that operand would keep the broadcast shape.
    del training_model.graph.value_info[:]
    infer_shapes(training_model)
    shaped = [info for info in training_model.graph.value_info if info.type.tensor_type.HasField("shape")]
    del training_model.graph.value_info[:]
    training_model.graph.value_info.extend(shaped)
    return training_model


def trainable_weights(model: onnx.ModelProto) -> list[str]:
    """Float constants the task trains: weights and biases of compute ops, and the op table's `trained_ports`
    (LayerNorm affines, PRelu slopes)."""
    graph = gs.import_onnx(model)
    names: dict[str, None] = {}
    for node in graph.nodes:
        entry = spec(node)
        ports = [entry.weight_port, entry.bias_port] if entry.role is Role.COMPUTE else []
        for port in [*ports, *entry.trained_ports]:
            if port is not None and port < len(node.inputs):
                tensor = node.inputs[port]
                if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32:
                    names[tensor.name] = None
    return list(names)


class Trainer:
    """One fine-tuning run; see the module docstring. Use `run()`."""

    def __init__(self, model: onnx.ModelProto, train: Any, val: Any, config: FinetuneConfig, checkpoint_dir: Path,
                 *, resume: bool = False, progress: bool = True, loss: LossBuilder | None = None,
                 metric: MetricFunction | None = None, session: TrainingRuntimeSession | None = None) -> None:
        self.model, self.config, self.settings = model, config, config.training
        self.checkpoint_dir, self.resume, self.progress = Path(checkpoint_dir), resume, progress
        self.custom_loss, self.custom_metric = loss, metric
        self.inputs = model_inputs(model)
        check_image_inputs(self.settings.augmentation, self.inputs)
        label_spec = LabelSpec(self.settings.loss, _output_shape(model))
        label_name = self.settings.labels
        self.train = LabelledData(train, self.inputs, label_spec, label_name=label_name, what="training data")
        self.val = LabelledData(val, self.inputs, label_spec, label_name=label_name, what="validation data")
        self._session = session
        self._teacher: ort.InferenceSession | None = None
        self._compressed: CompressedModel | None = None

    # ------------------------------------------------------------------------------------------------ run

    def run(self) -> FinetuneResult:
        created = self._prepare_folder()
        try:
            return self._run()
        except BaseException:
            # A run that failed before its first checkpoint leaves nothing behind.
            if created and not (self.checkpoint_dir / RUN_STATE).exists():
                shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            raise

    def _run(self) -> FinetuneResult:
        context = BuildContext(self.settings.learning_rate, self.settings.optimizer.value,
                               self.train.steps(self.settings.batch_size), self._calibration_count(), self.progress)
        compressed = create_compressed_model(self.model, self.config.compression, self._calibration_batches, context)
        self._compressed = compressed
        # Serialized once: it is both fingerprinted and handed to the training runtime.
        training_model = self._training_model(compressed).SerializeToString(deterministic=True)
        state = self._load_or_start(training_model)
        if self.settings.distillation.enabled:
            self._teacher = ort.InferenceSession(compressed.reference_model.SerializeToString(),
                                                 providers=["CPUExecutionProvider"])
        owns_session = self._session is None
        session = self._session or TrainingRuntimeSession()
        try:
            self._open(session, compressed, training_model, state)
            if state.initial_metric is None:
                state.initial_metric, _ = self._evaluate(session)
            for epoch in range(state.epochs_done, self.settings.epochs):
                self._train_epoch(session, compressed, state, epoch)
            best = state.checkpoints[BEST]
            state.verify(self.checkpoint_dir, best)
            session.open(self.checkpoint_dir / ARTIFACTS, checkpoint=self.checkpoint_dir / best)
            parameters = session.get_parameters()
            _require_finite(parameters)
            exported = compressed.export(parameters)
            errors = (*self._export_errors(session, exported),
                      self._surgery_error(exported, compressed.export(parameters, finish=False)))
        finally:
            if owns_session:
                session.close()
        assert state.best_epoch is not None and state.best_metric is not None
        return FinetuneResult(exported, compressed, state.history, state.best_epoch, state.best_metric,
                              state.initial_metric, *errors)

    # ------------------------------------------------------------------------------------------- set-up

    def _prepare_folder(self) -> bool:
        """Check the checkpoint folder; returns whether it was created."""
        folder = self.checkpoint_dir
        if (folder / RUN_STATE).exists() and not self.resume:
            raise ConfigError(f"checkpoint folder {folder} holds a run already: resume it (--resume) or remove it")
        if self.resume and not (folder / RUN_STATE).exists():
            raise ConfigError(f"nothing to resume: {folder / RUN_STATE} does not exist")
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise OutputError(f"checkpoint folder {folder} is not writable: {error.strerror or error}") from None
        return created

    def _calibration_count(self) -> int:
        subset = max(c.calibration_samples for c in self.config.compression)
        return min(subset, len(self.train)) if self.train.shuffled else subset

    def _calibration_batches(self):
        """Single-sample feeds of the first training samples, in file order."""
        remaining = self._calibration_count()
        for feeds, _ in self.train.batches(self.settings.batch_size):
            for row in range(len(next(iter(feeds.values())))):
                if remaining == 0:
                    return
                remaining -= 1
                yield {name: array[row:row + 1] for name, array in feeds.items()}

    def _training_model(self, compressed: CompressedModel) -> onnx.ModelProto:
        return build_training_model(compressed.training_model, self.settings, compressed.loss_outputs,
                                    self.custom_loss)

    def _fingerprint(self, training_model: bytes) -> str:
        digest = hashlib.sha256(training_model)
        digest.update(self.config.model_dump_json().encode())
        return digest.hexdigest()

    def _load_or_start(self, training_model: bytes) -> RunState:
        fingerprint = self._fingerprint(training_model)
        path = self.checkpoint_dir / RUN_STATE
        if not self.resume:
            shutil.rmtree(self.checkpoint_dir / ARTIFACTS, ignore_errors=True)
            return RunState(fingerprint)
        state = RunState.read(path)
        if state.fingerprint != fingerprint:
            raise ConfigError(f"cannot resume from {self.checkpoint_dir}: it was made for a different model, data or "
                              "configuration")
        return state

    def _open(self, session: TrainingRuntimeSession, compressed: CompressedModel, training_model: bytes,
              state: RunState) -> None:
        artifacts = self.checkpoint_dir / ARTIFACTS
        if state.epochs_done:
            state.verify(self.checkpoint_dir, ARTIFACTS)
            state.verify(self.checkpoint_dir, state.checkpoints[LAST])
            for model in artifacts.glob("*.onnx"):
                external_data_files(model)  # the same checks as any model we load
        else:
            model_path = self.checkpoint_dir / "training_model.onnx"
            model_path.write_bytes(training_model)
            for op_type, definition in compressed.gradients.items():
                session.register_gradient(op_type, definition)
            trainable = trainable_weights(compressed.float_model) + list(compressed.trainable_parameters)
            try:
                session.generate_artifacts(model_path, artifacts, trainable=trainable,
                                           frozen=list(compressed.frozen_parameters), loss="none",
                                           optimizer=self.settings.optimizer.value,
                                           weight_decay=self.settings.weight_decay)
            finally:
                model_path.unlink()
            state.record(self.checkpoint_dir, sorted(str(p.relative_to(self.checkpoint_dir))
                                                     for p in artifacts.rglob("*") if not p.is_dir()))
        checkpoint = self.checkpoint_dir / state.checkpoints[LAST] if state.epochs_done else None
        session.open(artifacts, checkpoint=checkpoint, learning_rate=self.settings.learning_rate)
        for controller, scheduler_state in zip(compressed.controllers, state.schedulers):
            controller.scheduler.load_state(scheduler_state)

    # ------------------------------------------------------------------------------------------- epochs

    def _train_epoch(self, session: TrainingRuntimeSession, compressed: CompressedModel, state: RunState,
                     epoch: int) -> None:
        settings = self.settings
        steps = self.train.steps(settings.batch_size)
        seed = settings.seed * 1_000_003 + epoch if self.train.shuffled else None
        batches = self.train.batches(settings.batch_size, seed)
        bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{settings.epochs}", unit="step",
                   disable=not self.progress, leave=False)
        losses, learning_rate = [], settings.learning_rate
        for index, batch in enumerate(bar):
            learning_rate = learning_rate_at(epoch * steps + index, steps, settings)
            session.set_lr(learning_rate)
            feeds = augment(batch[0], settings.augmentation, settings.seed, epoch, index)
            losses.append(session.train_step(self._feeds((feeds, batch[1]))).loss)
            if not math.isfinite(losses[-1]):
                raise TrainingError(f"epoch {epoch + 1}, step {index + 1}: the training loss is {losses[-1]}; the "
                                    "weights diverged (try a lower training.learning_rate)")
            for controller in compressed.controllers:
                if changes := controller.scheduler.step(session.get_parameters):
                    session.set_parameters(changes)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        for controller in compressed.controllers:
            if changes := controller.scheduler.epoch_step(session.get_parameters):
                session.set_parameters(changes)
        metric, val_loss = self._evaluate(session)
        statistics = compressed.statistics(session.get_parameters(list(compressed.compression_parameters)))
        complete = all(controller.scheduler.complete for controller in compressed.controllers)
        record = EpochRecord(epoch + 1, float(np.mean(losses)), val_loss, metric, learning_rate, statistics,
                             complete)
        self._checkpoint(session, compressed, state, record)
        if self.progress:
            tqdm.write(f"epoch {record.epoch}/{settings.epochs}: train loss {record.train_loss:.4f}, val loss "
                       f"{val_loss:.4f}, {settings.metric.value} {metric:.4f}")

    def _checkpoint(self, session: TrainingRuntimeSession, compressed: CompressedModel, state: RunState,
                    record: EpochRecord) -> None:
        folder = self.checkpoint_dir
        replaced = dict(state.checkpoints)
        self._save(session, state, LAST, record.epoch, include_optimizer_state=True)
        if self._is_best(record, state):
            self._save(session, state, BEST, record.epoch, include_optimizer_state=False)
            state.best_epoch, state.best_metric, state.best_complete = record.epoch, record.metric, record.complete
        state.epochs_done = record.epoch
        state.history.append(record)
        state.schedulers = [controller.scheduler.state() for controller in compressed.controllers]
        stale = set(replaced.values()) - set(state.checkpoints.values())
        for name in stale:
            state.files.pop(name, None)
        state.write(folder / RUN_STATE)
        for name in stale:  # only once run.json no longer names them
            (folder / name).unlink(missing_ok=True)

    def _save(self, session: TrainingRuntimeSession, state: RunState, kind: str, epoch: int, *,
              include_optimizer_state: bool) -> None:
        """Write checkpoint `kind` of `epoch` under its own name and record it (run.json is written later)."""
        name = f"{kind}-{epoch:04d}.ckpt"
        session.save_checkpoint(self.checkpoint_dir / name, include_optimizer_state=include_optimizer_state)
        state.checkpoints[kind] = name
        state.record(self.checkpoint_dir, [name])

    def _is_best(self, record: EpochRecord, state: RunState) -> bool:
        """The best of the complete epochs; before the first complete one, the latest (most compressed) epoch."""
        if not state.best_complete:
            return True
        assert state.best_metric is not None
        return record.complete and self._better(record.metric, state.best_metric)

    def _better(self, metric: float, best: float) -> bool:
        return metric < best if self.settings.metric is Metric.LOSS else metric > best

    # ---------------------------------------------------------------------------------------- evaluation

    def _feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        feeds, labels = batch
        feeds = {**feeds, LABELS_INPUT: labels}
        if self._teacher is not None:
            feeds[TEACHER_INPUT] = self._teacher.run(None, {spec.name: feeds[spec.name] for spec in self.inputs})[0]
        return feeds

    def _evaluate(self, session: TrainingRuntimeSession) -> tuple[float, float]:
        """(metric, mean loss) of the current weights on the validation data, through the eval model."""
        logits, labels, losses, counts = self._predict(session)
        loss = float(np.average(losses, weights=counts))
        if not math.isfinite(loss) or not np.isfinite(logits).all():
            raise TrainingError(f"the validation loss is {loss}: the model computes NaN or infinite values on the "
                                "validation data")
        if self.settings.metric is Metric.LOSS:
            return loss, loss
        metric = self.custom_metric or top1
        return float(metric(logits, labels)), loss

    def _predict(self, session: TrainingRuntimeSession) -> tuple[np.ndarray, np.ndarray, list[float], list[int]]:
        """Validation outputs, with the algorithms' evaluation values (deterministic gates) set meanwhile."""
        outputs, labels, losses, counts = [], [], [], []
        assert self._compressed is not None
        if evaluation := self._compressed.evaluation_parameters:
            session.set_parameters(evaluation)
        try:
            for batch in self.val.batches(self.settings.eval_batch_size):
                result = session.eval_step(self._feeds(batch))
                outputs.append(next(iter(result.outputs.values())))
                labels.append(batch[1])
                losses.append(result.loss)
                counts.append(len(batch[1]))
        finally:
            if training := self._compressed.training_parameters:
                session.set_parameters(training)
        return np.concatenate(outputs), np.concatenate(labels), losses, counts

    def _export_errors(self, session: TrainingRuntimeSession, exported: onnx.ModelProto) -> tuple[float, float]:
        """Max |ORT(exported) - fake-quantized eval| over the validation logits, relative to their range, without
        and with ONNX Runtime's graph optimizations (which fuse QDQ into integer kernels)."""
        fake_quantized, _, _, _ = self._predict(session)
        value_range = float(fake_quantized.max() - fake_quantized.min()) or 1.0
        errors = []
        for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            runner = ort.InferenceSession(exported.SerializeToString(), options, providers=["CPUExecutionProvider"])
            logits = np.concatenate([runner.run(None, feeds)[0]
                                     for feeds, _ in self.val.batches(self.settings.eval_batch_size)])
            errors.append(float(np.abs(logits - fake_quantized).max() / value_range))
        return errors[0], errors[1]


    def _surgery_error(self, exported: onnx.ModelProto, unfinished: onnx.ModelProto) -> float:
        """Max |exported - unfinished| over the validation logits in ONNX Runtime as deployed, relative to their
        range. Not on the float path of a QDQ model: a convolution that lost zero inputs sums in another order, and
        the next QuantizeLinear turns that last-bit difference into a whole level now and then; the fused integer
        kernels sum exactly, so there removing a channel and zeroing it give the same logits."""
        options = ort.SessionOptions()
        logits = []
        for model in (unfinished, exported):
            runner = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            logits.append(np.concatenate([runner.run(None, feeds)[0]
                                          for feeds, _ in self.val.batches(self.settings.eval_batch_size)]))
        return float(np.abs(logits[1] - logits[0]).max() / (float(np.ptp(logits[0])) or 1.0))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.reshape(len(labels), -1).argmax(axis=1) == labels).mean())


def _output_shape(model: onnx.ModelProto) -> tuple[int | None, ...]:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return tuple(static_dim(d) for d in dims)

