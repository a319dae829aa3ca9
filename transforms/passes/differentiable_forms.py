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
| ReduceMax, ReduceMin (known rank, constant axes) | GatherElements of x, reduced axes moved last and flattened, at its ArgMax or ArgMin: the gradient goes to the first extreme element |
| Sqrt | Where(x > 0, Sqrt(Where(x > 0, x, 1)), 0): gradient 0 instead of ∞ at 0 (the op gives NaN below 0, the form 0) |
| Pad, reflect or edge mode (constant non-negative pads) | per padded axis, a Gather of x with the reflected or repeated indices, computed from x's shape |
| LayerNormalization | its optional Mean and InvStdDev outputs exposed, which the gradient reads |
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import count

import numpy as np
import onnx_graphsurgeon as gs

_FORM = ".grad_form"  # in the names of the nodes a form adds


class _Emitter:
    """Adds nodes and constants with names unique in the graph, derived from the node being rewritten."""

    def __init__(self, node: gs.Node) -> None:
        self.prefix, self.ids = f"{node.name or node.op}{_FORM}", count()
        self.nodes: list[gs.Node] = []

    def const(self, value: float, dtype: np.dtype) -> gs.Constant:
        return gs.Constant(f"{self.prefix}.c{next(self.ids)}", np.array(value, dtype))

    def op(self, op: str, inputs: list, dtype: np.dtype | None = None, **attrs: object) -> gs.Variable:
        """One node; its output has `dtype`, or else its first typed input's."""
        out = gs.Variable(f"{self.prefix}.t{next(self.ids)}", dtype=dtype or _dtype(inputs))
        self.nodes.append(gs.Node(op, f"{self.prefix}.n{next(self.ids)}", attrs, inputs, [out]))
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


def _pads(node: gs.Node) -> list[tuple[int, int, int]] | None:
    """(axis, before, after) per padded axis of a reflect or edge Pad with constant non-negative pads; else None."""
    if node.op != "Pad" or _mode(node) not in ("reflect", "edge"):
        return None
    if "pads" in node.attrs:  # opset < 11
        pads, axes = list(node.attrs["pads"]), None
    else:
        pads_input, axes_input = node.inputs[1], node.inputs[3] if len(node.inputs) > 3 else None
        if axes_input is not None and not axes_input.name:
            axes_input = None
        if not all(isinstance(t, gs.Constant) for t in (pads_input, axes_input) if t is not None):
            return None
        pads = pads_input.values.astype(np.int64).tolist()
        axes = axes_input.values.astype(np.int64).tolist() if axes_input is not None else None
    if any(p < 0 for p in pads):
        return None
    half = len(pads) // 2
    return [(axis, pads[i], pads[half + i]) for i, axis in enumerate(axes if axes is not None else range(half))
            if pads[i] or pads[half + i]]


def _mode(node: gs.Node) -> str:
    mode = node.attrs.get("mode", "constant")
    return mode.decode() if isinstance(mode, bytes) else mode


def _pad(e: _Emitter, node: gs.Node) -> gs.Variable:
    """Reflect or edge padding as a Gather of x along each padded axis in turn (what the op computes); the
    indices come from x's shape, so dynamic lengths work."""
    reflect = _mode(node) == "reflect"
    x, dtype = node.inputs[0], node.inputs[0].dtype or np.float32
    for axis, before, after in _pads(node):
        length = e.op("Gather", [e.op("Shape", [x], np.int64), e.const(axis, np.int64)], np.int64, axis=0)
        # reflect: before, ..., 1 | 0, ..., n-1 | n-2, ..., n-1-after; edge: 0, ..., 0 | 0, ..., n-1 | n-1, ...
        left = e.const(np.arange(before, 0, -1) if reflect else np.zeros(before), np.int64)
        last = e.op("Sub", [length, e.const(1, np.int64)], np.int64)
        right = e.op("Sub", [last, e.const(np.arange(1, after + 1) if reflect else np.zeros(after), np.int64)],
                     np.int64)
        middle = e.op("Range", [e.const(0, np.int64), length, e.const(1, np.int64)], np.int64)
        indices = e.op("Concat", [left, middle, right], np.int64, axis=0)
        x = e.op("Gather", [x, indices], dtype, axis=axis)
    return x


def _reduce_axes(node: gs.Node) -> list[int] | None:
    """The sorted non-negative axes a ReduceMax or ReduceMin with a known input rank and constant axes reduces;
    None otherwise (and for the identity of empty axes with noop_with_empty_axes)."""
    x = node.inputs[0]
    if x.shape is None:
        return None
    if "axes" in node.attrs:  # opset < 18
        axes = list(node.attrs["axes"])
    elif len(node.inputs) > 1 and node.inputs[1].name:
        if not isinstance(node.inputs[1], gs.Constant):
            return None
        axes = node.inputs[1].values.astype(np.int64).tolist()
    else:
        axes = []
    if not axes:
        return None if node.attrs.get("noop_with_empty_axes", 0) else list(range(len(x.shape)))
    return sorted(axis % len(x.shape) for axis in axes)


def _reduce_extreme(e: _Emitter, node: gs.Node) -> gs.Variable:
    """ReduceMax or ReduceMin as the element its ArgMax or ArgMin picks over the reduced axes, moved last and
    flattened: the same value, and the gradient goes to that one element (the first extreme). The index and the
    shapes are read behind inputs the training runtime does not differentiate."""
    x, dtype, axes = node.inputs[0], node.inputs[0].dtype or np.float32, _reduce_axes(node)
    kept = [axis for axis in range(len(x.shape)) if axis not in axes]
    moved = x if kept + axes == sorted(kept + axes) else e.op("Transpose", [x], dtype, perm=kept + axes)
    kept_dims = e.op("Gather", [e.op("Shape", [x], np.int64), e.const(kept, np.int64)], np.int64, axis=0)
    flat_shape = e.op("Concat", [kept_dims, e.const([-1], np.int64)], np.int64, axis=0)
    flat = e.op("Reshape", [moved, flat_shape], dtype)
    index = e.op("ArgMax" if node.op == "ReduceMax" else "ArgMin", [flat], np.int64, axis=-1, keepdims=1)
    picked = e.op("GatherElements", [flat, index], dtype, axis=-1)
    result_shape = e.op("Shape", [e.op(node.op, list(node.inputs), dtype, **node.attrs)], np.int64)
    return e.op("Reshape", [picked, result_shape], dtype)


def _sqrt(e: _Emitter, node: gs.Node) -> gs.Variable:
    """Sqrt with the gradient 0 instead of ∞ (and 0 · ∞ = NaN further back) at 0: a quantized magnitude
    √(re² + im²) is exactly 0 wherever both parts round to 0."""
    x, dtype = node.inputs[0], node.inputs[0].dtype or np.float32
    positive = e.op("Greater", [x, e.const(0.0, dtype)], np.bool_)
    root = e.op("Sqrt", [e.op("Where", [positive, x, e.const(1.0, dtype)], dtype)], dtype)
    return e.op("Where", [positive, root, e.const(0.0, dtype)], dtype)


def _rewritten(node: gs.Node) -> bool:
    """Whether `node` gets its form: Sum and Mean of several inputs, Pad as `_pads` says, ReduceMax and ReduceMin
    as `_reduce_axes` says, all other FORMS ops; never the ops of a form (the ReduceMax whose shape it reads, the
    Sqrt of positive values)."""
    if _FORM in node.name:
        return False
    if node.op in ("Sum", "Mean"):
        return len(node.inputs) > 1
    if node.op == "Pad":
        return bool(_pads(node))
    if node.op in ("ReduceMax", "ReduceMin"):
        return _reduce_axes(node) is not None
    return node.op in FORMS


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
    "Pad": _pad,
    "ReduceMax": _reduce_extreme,
    "ReduceMin": _reduce_extreme,
    "Sqrt": _sqrt,
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
        elif _rewritten(node):
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
