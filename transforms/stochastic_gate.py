"""Build the float subgraphs of RB sparsity's stochastic gates and complexity loss (commands StochasticGateWeight,
ComplexityLoss; arithmetic in their docstrings).

The gates' noise is computed in the graph from counters and the training step (a counter-based generator). A
weight seen as a matrix (rows = its first axis) gets u = frac(a + r_t + c_t): a per weight, r_t per row and c_t
per column at step t, each value h(counter, t) of the hash h(k, t) = frac(HIGH[x div 2^16] + LOW[x mod 2^16]),
x = (k·A + t'·WEYL) mod 2^32 (tabulation hashing; t' = 0 for a, t + 1 for rows and columns), the tables holding
fixed random multiples of 2^-21. a does not depend on the step, so ONNX Runtime folds it once; every step then
hashes only rows + columns values and adds three matrices, whatever the weight's size. Each weight's noise is
fresh at every step (its row and column values are), and weights are independent of each other through a.
Integer arithmetic and exact float sums make u the same on every run of every session for a given step: a
resumed run draws the noise an uninterrupted one draws, and one scalar per training step is all that changes.

Only ops with gradients in onnxruntime-training are on the way from the logits to the loss (Mul, Add, Sub, Div,
Sigmoid, ReduceSum) plus Round, whose straight-through gradient the RB controller declares; the noise subgraph
has no trainable input.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.transforms.commands import ComplexityLoss, StochasticGateWeight

_HALF = 1 << 16
_WORD = 1 << 32
#: Odd, below 2^30 so that k·A stays within int64 for counters below 2^33.
_A = 0x2C1B3C6D
#: Odd and about 2^32 / golden ratio.
_WEYL = 2654435761
#: Hash values are multiples of 2^-21; a carries an extra 2^-22, so that a + r + c (< 3) is exact in float32 and
#: u an odd multiple of 2^-22, strictly inside (0, 1): logit(u) stays finite (|logit(u)| < 15.3).
_LEVELS = 1 << 21
_TABLE_SEED = 20240613


def _op(graph: gs.Graph, op: str, inputs: list[gs.Tensor], name: str, attrs: dict | None = None,
        dtype: type = np.float32) -> gs.Variable:
    output = gs.Variable(name, dtype=dtype)
    graph.nodes.append(gs.Node(op, f"{name}.{op}", attrs or {}, inputs, [output]))
    return output


def _int(name: str, value: int | list[int]) -> gs.Constant:
    return gs.Constant(name, np.asarray(value, np.int64))


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if len(shape) > 1 else 1
    return rows, int(np.prod(shape)) // rows


def counters_used(shape: tuple[int, ...]) -> int:
    """How many counters the gate of a weight of `shape` takes: one per weight, row and column."""
    rows, columns = _matrix(shape)
    return rows * columns + rows + columns


def noise_tables() -> tuple[np.ndarray, np.ndarray]:
    """HIGH and LOW of the hash (2^16 entries each), fixed."""
    rng = np.random.default_rng(_TABLE_SEED)
    high, low = (rng.integers(0, _LEVELS, _HALF, dtype=np.int64) for _ in range(2))
    return (high / _LEVELS).astype(np.float32), (low / _LEVELS).astype(np.float32)


def _hash(counters: np.ndarray, offset: int) -> np.ndarray:
    high, low = noise_tables()
    x = (counters * _A + offset) % _WORD
    total = high[x // _HALF] + low[x % _HALF]
    return total - np.floor(total)


def uniform_noise(first: int, shape: tuple[int, ...], step: int) -> np.ndarray:
    """u of a gate whose counters start at `first`, at `step`, as the graph computes it."""
    rows, columns = _matrix(shape)
    size = rows * columns
    a = _hash(np.arange(first, first + size), 0).reshape(rows, columns) + np.float32(0.5 / _LEVELS)
    offset = (step + 1) * _WEYL % _WORD
    r = _hash(np.arange(first + size, first + size + rows), offset).reshape(rows, 1)
    c = _hash(np.arange(first + size + rows, first + size + rows + columns), offset).reshape(1, columns)
    total = a + r + c
    return (total - np.floor(total)).reshape(shape)


def _tables(graph: gs.Graph, tensors: dict[str, gs.Tensor], step: str) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
    """HIGH, LOW and (step + 1)·WEYL mod 2^32 (int64 scalar), built once per step input."""
    names = [f"{step}.high", f"{step}.low", f"{step}.offset"]
    if names[2] not in tensors:
        if step not in tensors:
            tensors[step] = gs.Constant(step, np.zeros((), np.float32))
        steps = _op(graph, "Cast", [tensors[step]], f"{step}.int", {"to": 7}, np.int64)
        following = _op(graph, "Add", [steps, _int(f"{step}.one", 1)], f"{step}.following", dtype=np.int64)
        weyl = _op(graph, "Mul", [following, _int(f"{step}.weyl", _WEYL)], f"{step}.weyl_step", dtype=np.int64)
        tensors[names[2]] = _op(graph, "Mod", [weyl, _int(f"{step}.word", _WORD)], names[2], dtype=np.int64)
        for name, table in zip(names, noise_tables()):
            tensors[name] = gs.Constant(name, table)
    high, low, offset = (tensors[name] for name in names)
    return high, low, offset


def _hashed(graph: gs.Graph, tensors: dict[str, gs.Tensor], step: str, name: str, first: int, count: int, *,
            stepped: bool) -> gs.Variable:
    """h(k, t) for the counters first .. first + count - 1 (t' = t + 1 if `stepped`, else 0), a 1-D float tensor."""
    high, low, step_offset = _tables(graph, tensors, step)
    x = _op(graph, "Range", [_int(f"{name}.first", first * _A), _int(f"{name}.end", (first + count) * _A),
                             _int(f"{name}.stride", _A)], f"{name}.scaled", dtype=np.int64)
    if stepped:
        x = _op(graph, "Add", [x, step_offset], f"{name}.shifted", dtype=np.int64)
    x = _op(graph, "Mod", [x, _int(f"{name}.word", _WORD)], f"{name}.x", dtype=np.int64)
    half = _int(f"{name}.half", _HALF)
    total = _op(graph, "Add", [
        _op(graph, "Gather", [high, _op(graph, "Div", [x, half], f"{name}.high_index", dtype=np.int64)],
            f"{name}.high"),
        _op(graph, "Gather", [low, _op(graph, "Mod", [x, half], f"{name}.low_index", dtype=np.int64)],
            f"{name}.low")], f"{name}.sum")
    return _op(graph, "Sub", [total, _op(graph, "Floor", [total], f"{name}.floor")], f"{name}.hash")


def _uniform(graph: gs.Graph, tensors: dict[str, gs.Tensor], cmd: StochasticGateWeight,
             shape: tuple[int, ...]) -> gs.Variable:
    """u of every weight of the gate, shaped like the weight (see the module docstring)."""
    n, (rows, columns) = cmd.name, _matrix(shape)
    size = rows * columns
    per_weight = _hashed(graph, tensors, cmd.step, f"{n}.a", cmd.counter, size, stepped=False)
    a = _op(graph, "Add", [
        _op(graph, "Reshape", [per_weight, _int(f"{n}.matrix", [rows, columns])], f"{n}.a_matrix"),
        gs.Constant(f"{n}.half_level", np.asarray(0.5 / _LEVELS, np.float32))], f"{n}.a_centred")
    row = _op(graph, "Reshape", [_hashed(graph, tensors, cmd.step, f"{n}.r", cmd.counter + size, rows, stepped=True),
                                 _int(f"{n}.column_vector", [rows, 1])], f"{n}.r_column")
    column = _hashed(graph, tensors, cmd.step, f"{n}.c", cmd.counter + size + rows, columns, stepped=True)
    total = _op(graph, "Add", [_op(graph, "Add", [a, row], f"{n}.a_r"), column], f"{n}.a_r_c")
    u = _op(graph, "Sub", [total, _op(graph, "Floor", [total], f"{n}.floor")], f"{n}.u_matrix")
    return _op(graph, "Reshape", [u, _int(f"{n}.shape", list(shape))], f"{n}.u")


def insert_stochastic_gate(graph: gs.Graph, tensors: dict[str, gs.Tensor], node: gs.Node,
                           cmd: StochasticGateWeight) -> None:
    weight = node.inputs[cmd.port]
    if not isinstance(weight, gs.Constant):
        raise ValueError(f"input {cmd.port} of node {node.name!r} is not a constant weight")
    shape = tuple(weight.values.shape)
    if cmd.noise not in tensors:
        tensors[cmd.noise] = gs.Constant(cmd.noise, np.ones((), np.float32))
    delta = gs.Constant(cmd.delta, np.broadcast_to(np.float32(cmd.logit0) / np.float32(cmd.lr_scale), shape)
                        .astype(np.float32))
    scale = gs.Constant(f"{cmd.name}.lr_scale", np.asarray(cmd.lr_scale, np.float32))
    one = gs.Constant(f"{cmd.name}.one", np.ones((), np.float32))
    logits = _op(graph, "Mul", [scale, delta], cmd.logits)
    logits.shape = list(shape)
    u = _uniform(graph, tensors, cmd, shape)
    odds = _op(graph, "Div", [u, _op(graph, "Sub", [one, u], f"{cmd.name}.one_minus_u")], f"{cmd.name}.odds")
    noise = _op(graph, "Log", [odds], f"{cmd.name}.logit_u")
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
