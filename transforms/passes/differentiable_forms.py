"""Rewrite ops that onnxruntime-training 1.19.2 cannot differentiate into equal ops it can (training graphs only).

`bench/gradient_probe.py` lists the ops the training runtime has no gradient for (docs/benchmarks.md). Those that
real models use in their trainable path are rewritten here, each output keeping its tensor name, so fake
quantizers, parameters and the export (which starts from the model, not the training graph) are unaffected:

| op | differentiable form |
|---|---|
| HardSigmoid(α, β) | Clip(x·α + β, 0, 1) |
| HardSwish | x · Clip(x/6 + ½, 0, 1) |
| PRelu | Relu(x) + slope · Min(x, 0) |
| Elu(α), Selu(α, γ), Celu(α) | Relu(x) + α·(Exp(Min(x, 0)) − 1), times γ; Celu divides by α inside Exp |
| Softplus | Relu(x) + Log(1 + Exp(−|x|)) |
| Softsign | x / (1 + |x|) |
| Mish | x · Tanh(Softplus(x)) |
| ThresholdedRelu(α) | Where(x > α, x, 0) |
| Sum, Mean of n inputs | a chain of Add (times 1/n) |
| LayerNormalization | its optional Mean and InvStdDev outputs exposed, which the gradient reads |
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import count

import numpy as np
import onnx_graphsurgeon as gs

class _Emitter:
    """Adds nodes and constants with names unique in the graph, derived from the node being rewritten."""

    def __init__(self, node: gs.Node) -> None:
        self.prefix, self.ids = f"{node.name or node.op}.grad_form", count()
        self.nodes: list[gs.Node] = []

    def const(self, value: float, dtype: np.dtype) -> gs.Constant:
        return gs.Constant(f"{self.prefix}.c{next(self.ids)}", np.array(value, dtype))

    def op(self, op: str, inputs: list, dtype: np.dtype | None = None) -> gs.Variable:
        """One node; its output has `dtype`, or else its first typed input's."""
        out = gs.Variable(f"{self.prefix}.t{next(self.ids)}", dtype=dtype or _dtype(inputs))
        self.nodes.append(gs.Node(op, f"{self.prefix}.n{next(self.ids)}", {}, inputs, [out]))
        return out


def _dtype(inputs: list) -> np.dtype | None:
    return next((t.dtype for t in inputs if isinstance(t, gs.Tensor) and t.dtype is not None), None)


def _hard_sigmoid(e: _Emitter, x: gs.Variable, alpha: float, beta: float) -> gs.Variable:
    dtype = x.dtype or np.float32
    shifted = e.op("Add", [e.op("Mul", [x, e.const(alpha, dtype)]), e.const(beta, dtype)])
    return e.op("Clip", [shifted, e.const(0.0, dtype), e.const(1.0, dtype)])


def _elu_like(e: _Emitter, x: gs.Variable, alpha: float, scale: float = 1.0, divide: bool = False) -> gs.Variable:
    dtype = x.dtype or np.float32
    negative = e.op("Min", [x, e.const(0.0, dtype)])
    if divide:
        negative = e.op("Mul", [negative, e.const(1.0 / alpha, dtype)])
    tail = e.op("Mul", [e.op("Sub", [e.op("Exp", [negative]), e.const(1.0, dtype)]), e.const(alpha, dtype)])
    result = e.op("Add", [e.op("Relu", [x]), tail])
    return result if scale == 1.0 else e.op("Mul", [result, e.const(scale, dtype)])


def _softplus(e: _Emitter, x: gs.Variable) -> gs.Variable:
    dtype = x.dtype or np.float32
    tail = e.op("Log", [e.op("Add", [e.op("Exp", [e.op("Neg", [e.op("Abs", [x])])]), e.const(1.0, dtype)])])
    return e.op("Add", [e.op("Relu", [x]), tail])


def _chain(e: _Emitter, inputs: list, mean: bool) -> gs.Variable:
    total = inputs[0]
    for term in inputs[1:]:
        total = e.op("Add", [total, term])
    return e.op("Mul", [total, e.const(1.0 / len(inputs), total.dtype or np.float32)]) if mean else total


def _attr(node: gs.Node, name: str, default: float) -> float:
    return float(node.attrs.get(name, default))


FORMS: dict[str, Callable[[_Emitter, gs.Node], gs.Variable]] = {
    "HardSigmoid": lambda e, n: _hard_sigmoid(e, n.inputs[0], _attr(n, "alpha", 0.2), _attr(n, "beta", 0.5)),
    "HardSwish": lambda e, n: e.op("Mul", [n.inputs[0], _hard_sigmoid(e, n.inputs[0], 1 / 6, 0.5)]),
    "PRelu": lambda e, n: e.op("Add", [e.op("Relu", [n.inputs[0]]), e.op("Mul", [
        n.inputs[1], e.op("Min", [n.inputs[0], e.const(0.0, n.inputs[0].dtype or np.float32)])])]),
    "Elu": lambda e, n: _elu_like(e, n.inputs[0], _attr(n, "alpha", 1.0)),
    "Selu": lambda e, n: _elu_like(e, n.inputs[0], _attr(n, "alpha", 1.67326319217681884765625),
                                   _attr(n, "gamma", 1.05070102214813232421875)),
    "Celu": lambda e, n: _elu_like(e, n.inputs[0], _attr(n, "alpha", 1.0), divide=True),
    "Softplus": lambda e, n: _softplus(e, n.inputs[0]),
    "Softsign": lambda e, n: e.op("Div", [n.inputs[0], e.op("Add", [
        e.op("Abs", [n.inputs[0]]), e.const(1.0, n.inputs[0].dtype or np.float32)])]),
    "Mish": lambda e, n: e.op("Mul", [n.inputs[0], e.op("Tanh", [_softplus(e, n.inputs[0])])]),
    "ThresholdedRelu": lambda e, n: e.op("Where", [
        e.op("Greater", [n.inputs[0], e.const(_attr(n, "alpha", 1.0), n.inputs[0].dtype or np.float32)],
             dtype=np.bool_),
        n.inputs[0], e.const(0.0, n.inputs[0].dtype or np.float32)]),
    "Sum": lambda e, n: _chain(e, list(n.inputs), mean=False),
    "Mean": lambda e, n: _chain(e, list(n.inputs), mean=True),
}


def differentiable_forms(graph: gs.Graph) -> bool:
    """Rewrite every op of FORMS into its differentiable form and expose LayerNormalization's statistics; return
    whether anything changed. The rewritten node's output tensor becomes the last new node's output."""
    changed = False
    for node in list(graph.nodes):
        if node.op == "LayerNormalization" and len(node.outputs) == 1:
            node.outputs += [gs.Variable(f"{node.name}.mean", dtype=np.float32),
                             gs.Variable(f"{node.name}.inv_std_dev", dtype=np.float32)]
            changed = True
        elif node.op in FORMS and (node.op not in ("Sum", "Mean") or len(node.inputs) > 1):
            emitter = _Emitter(node)
            FORMS[node.op](emitter, node)
            output = node.outputs[0]
            node.inputs.clear()
            node.outputs.clear()
            last = emitter.nodes[-1]  # it computes the result: make it write the original tensor
            last.outputs.clear()
            last.outputs.append(output)
            graph.nodes.extend(emitter.nodes)
            changed = True
    if changed:
        graph.cleanup().toposort()
    return changed
