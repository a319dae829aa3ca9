"""Append the training loss to a graph, so that onnxruntime-training differentiates one scalar output.

    loss = task(logits, labels) [+ weight · T² · KL(softmax(teacher / T) ‖ softmax(logits / T))] [+ compression losses]

The task loss is cross-entropy (labels: int64 class indices) or MSE (labels: float targets shaped like the
logits), or a custom builder `(graph, logits, labels) -> scalar tensor`. The new graph inputs are `labels` and,
with distillation, `teacher_logits`; the outputs become `loss` followed by the model's own outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.config import Distillation, Loss
from onnxcompress.errors import UnsupportedModelError

LOSS_OUTPUT = "loss"
# Prefixed so that no model tensor is likely to share the name (add_loss refuses one that does).
LABELS_INPUT = "onnxcompress.labels"
TEACHER_INPUT = "onnxcompress.teacher_logits"

LossBuilder = Callable[[gs.Graph, gs.Tensor, gs.Variable], gs.Tensor]


def _op(graph: gs.Graph, op: str, inputs: list[gs.Tensor], name: str, **attrs: object) -> gs.Variable:
    output = gs.Variable(name, dtype=np.float32)
    graph.nodes.append(gs.Node(op, f"loss.{name}", attrs=dict(attrs), inputs=inputs, outputs=[output]))
    return output


def _const(name: str, value: object, dtype: type = np.float32) -> gs.Constant:
    return gs.Constant(f"loss.{name}", np.asarray(value, dtype))


def cross_entropy(graph: gs.Graph, logits: gs.Tensor, labels: gs.Variable) -> gs.Tensor:
    loss = _op(graph, "SoftmaxCrossEntropyLoss", [logits, labels], "loss.cross_entropy", reduction="mean")
    # onnxruntime-training's gradient of this op reads its optional log-probability output.
    graph.nodes[-1].outputs.append(gs.Variable("loss.log_prob", dtype=np.float32))
    return loss


def mean_squared_error(graph: gs.Graph, outputs: gs.Tensor, targets: gs.Variable) -> gs.Tensor:
    difference = _op(graph, "Sub", [outputs, targets], "loss.difference")
    return _op(graph, "ReduceMean", [_op(graph, "Mul", [difference, difference], "loss.squared")], "loss.mse",
               keepdims=0)


def _distillation(graph: gs.Graph, logits: gs.Tensor, teacher: gs.Variable, settings: Distillation) -> gs.Tensor:
    """T² · mean over samples of Σ_classes p_teacher · (log p_teacher - log p_student)."""
    temperature = _const("temperature", settings.temperature)
    student_log = _op(graph, "LogSoftmax", [_op(graph, "Div", [logits, temperature], "kd.student")],
                      "kd.student_log", axis=-1)
    teacher_scaled = _op(graph, "Div", [teacher, temperature], "kd.teacher")
    teacher_log = _op(graph, "LogSoftmax", [teacher_scaled], "kd.teacher_log", axis=-1)
    teacher_probs = _op(graph, "Softmax", [teacher_scaled], "kd.teacher_probs", axis=-1)
    gap = _op(graph, "Sub", [teacher_log, student_log], "kd.log_ratio")
    per_sample = _op(graph, "ReduceSum", [_op(graph, "Mul", [teacher_probs, gap], "kd.terms"),
                                          _const("class_axis", [-1], np.int64)], "kd.kl", keepdims=0)
    kl = _op(graph, "ReduceMean", [per_sample], "kd.mean_kl", keepdims=0)
    factor = _const("kd_factor", settings.weight * settings.temperature**2)
    return _op(graph, "Mul", [kl, factor], "kd.loss")


def add_loss(graph: gs.Graph, *, task: Loss, distillation: Distillation, compression_losses: list[str],
             custom: LossBuilder | None = None) -> None:
    """Append the loss nodes to `graph` (see the module docstring); the first graph output is the logits.

    `task` decides the labels' form (and the loss, unless `custom` replaces it)."""
    logits = graph.outputs[0]
    tensors = graph.tensors()
    clashes = [name for name in (LABELS_INPUT, TEACHER_INPUT) if name in tensors]
    if clashes:
        raise UnsupportedModelError(f"the model has a tensor named {clashes[0]!r}, a name the training graph needs")
    if task is Loss.CROSS_ENTROPY:
        labels = gs.Variable(LABELS_INPUT, dtype=np.int64, shape=None if logits.shape is None else [logits.shape[0]])
    else:
        labels = gs.Variable(LABELS_INPUT, dtype=np.float32, shape=logits.shape)
    graph.inputs.append(labels)
    build = custom or {Loss.CROSS_ENTROPY: cross_entropy, Loss.MSE: mean_squared_error}[task]
    terms = [build(graph, logits, labels)]
    if distillation.enabled:
        teacher = gs.Variable(TEACHER_INPUT, dtype=np.float32, shape=logits.shape)
        graph.inputs.append(teacher)
        terms.append(_distillation(graph, logits, teacher, distillation))
    terms += [tensors[name] for name in compression_losses]
    total = terms[0]
    for index, term in enumerate(terms[1:]):
        total = _op(graph, "Add", [total, term], f"loss.sum{index}")
    final = _op(graph, "Identity", [total], LOSS_OUTPUT)
    final.shape = []
    # Compression losses were graph outputs only to survive clean-up until now.
    graph.outputs = [final, *(o for o in graph.outputs if o.name not in compression_losses)]

