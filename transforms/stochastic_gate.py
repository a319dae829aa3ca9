"""Build the float subgraphs of RB sparsity's stochastic gates and complexity loss (commands StochasticGateWeight,
ComplexityLoss; arithmetic in their docstrings).

Only ops with gradients in onnxruntime-training are used (Mul, Add, Sub, Div, Sigmoid, Log, ReduceSum, Pow),
plus RandomUniform, which has no input to differentiate, and Round, whose straight-through gradient the RB
controller declares.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.transforms.commands import ComplexityLoss, StochasticGateWeight

#: u is drawn from [ε, 1 - ε] so that logit(u) stays finite (|logit| ≤ 13.8).
_EPS = 1e-6


def _op(graph: gs.Graph, op: str, inputs: list[gs.Tensor], name: str, attrs: dict | None = None) -> gs.Variable:
    output = gs.Variable(name, dtype=np.float32)
    graph.nodes.append(gs.Node(op, f"{name}.{op}", attrs or {}, inputs, [output]))
    return output


def insert_stochastic_gate(graph: gs.Graph, tensors: dict[str, gs.Tensor], node: gs.Node,
                           cmd: StochasticGateWeight) -> None:
    weight = node.inputs[cmd.port]
    if not isinstance(weight, gs.Constant):
        raise ValueError(f"input {cmd.port} of node {node.name!r} is not a constant weight")
    shape = tuple(weight.values.shape)
    if cmd.noise not in tensors:
        tensors[cmd.noise] = gs.Constant(cmd.noise, np.ones((), np.float32))
    delta = gs.Constant(cmd.delta, np.full(shape, cmd.logit0 / cmd.lr_scale, np.float32))
    scale = gs.Constant(f"{cmd.name}.lr_scale", np.asarray(cmd.lr_scale, np.float32))
    one = gs.Constant(f"{cmd.name}.one", np.ones((), np.float32))
    logits = _op(graph, "Mul", [scale, delta], cmd.logits)
    logits.shape = list(shape)
    u = _op(graph, "RandomUniform", [], f"{cmd.name}.u",
            {"shape": list(shape), "low": _EPS, "high": 1.0 - _EPS, "seed": float(cmd.seed)})
    noise = _op(graph, "Sub", [_op(graph, "Log", [u], f"{cmd.name}.log_u"),
                               _op(graph, "Log", [_op(graph, "Sub", [one, u], f"{cmd.name}.one_minus_u")],
                                   f"{cmd.name}.log_1mu")], f"{cmd.name}.logit_u")
    noisy = _op(graph, "Add", [logits, _op(graph, "Mul", [tensors[cmd.noise], noise], f"{cmd.name}.noise")],
                f"{cmd.name}.noisy")
    gate = _op(graph, "Round", [_op(graph, "Sigmoid", [noisy], f"{cmd.name}.probability")], f"{cmd.name}.gate")
    gated = _op(graph, "Mul", [weight, gate], f"{cmd.name}.applied")
    gated.shape = list(shape)
    node.inputs[cmd.port] = gated
    tensors[logits.name] = logits


def insert_complexity_loss(graph: gs.Graph, tensors: dict[str, gs.Tensor], cmd: ComplexityLoss) -> None:
    total, count = None, 0
    for index, name in enumerate(cmd.logits):
        logits = tensors[name]
        kept = _op(graph, "ReduceSum", [_op(graph, "Sigmoid", [logits], f"{cmd.name}.p{index}")],
                   f"{cmd.name}.sum{index}", {"keepdims": 0})
        total = kept if total is None else _op(graph, "Add", [total, kept], f"{cmd.name}.total{index}")
        count += int(np.prod(logits.shape))
    density = gs.Constant(cmd.density, np.asarray(cmd.density0, np.float32))
    mean = _op(graph, "Div", [total, gs.Constant(f"{cmd.name}.count", np.asarray(count, np.float32))],
               f"{cmd.name}.density")
    error = _op(graph, "Sub", [mean, density], f"{cmd.name}.error")
    squared = _op(graph, "Mul", [error, error], f"{cmd.name}.squared")
    loss = _op(graph, "Mul", [squared, gs.Constant(f"{cmd.name}.weight", np.asarray(cmd.weight, np.float32))],
               cmd.name)
    loss.shape = []
    graph.outputs.append(loss)
    tensors[loss.name] = loss
