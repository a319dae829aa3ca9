"""Which ops of opset <= 21 the private onnxruntime-training 1.19.2 runtime can differentiate (issue 13, part 2).

For each op, a graph `x -> Mul(x, w) -> op -> ReduceSum -> loss` (w trainable, so the gradient must flow through
the op to reach it) is handed to `generate_artifacts`; an op without a gradient builder fails there. Ops whose
inputs are not differentiable by nature (shapes, indices, comparisons) are not listed.

    .venv/bin/python bench/gradient_probe.py --out bench/out/gradient_probe.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common import DEFAULT_OUT_DIR, log

SHAPE = [2, 4, 6, 6]


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


# op -> (node builder taking the input tensor name and producing "y", extra initializers, opset)
def _cases() -> dict[str, tuple]:
    unary = ["Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus",
             "Softsign", "Erf", "Exp", "Abs", "Neg", "Sqrt", "Reciprocal", "Log", "Identity", "Sin", "Cos",
             "Celu", "ThresholdedRelu", "Mish", "Floor", "Ceil", "Round", "Sign"]
    cases = {op: (lambda x, op=op: [helper.make_node(op, [x], ["y"])], [], 18) for op in unary}
    cases["Gelu"] = (lambda x: [helper.make_node("Gelu", [x], ["y"])], [], 20)
    cases["Clip"] = (lambda x: [helper.make_node("Clip", [x, "lo", "hi"], ["y"])],
                     [_const("lo", np.float32(0)), _const("hi", np.float32(6))], 18)
    cases["PRelu"] = (lambda x: [helper.make_node("PRelu", [x, "slope"], ["y"])],
                      [_const("slope", np.full((4, 1, 1), 0.1, np.float32))], 18)
    cases["Pow"] = (lambda x: [helper.make_node("Pow", [x, "two"], ["y"])], [_const("two", np.float32(2))], 18)
    for op in ("Min", "Max", "Sum", "Mean", "Add", "Sub", "Mul", "Div"):
        cases[op] = (lambda x, op=op: [helper.make_node(op, [x, "other"], ["y"])],
                     [_const("other", np.full(SHAPE, 0.5, np.float32))], 18)
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceLogSumExp",
               "ReduceSumSquare", "ReduceProd", "ReduceL1"):
        cases[op] = (lambda x, op=op: [helper.make_node(op, [x, "axes"], ["y"], keepdims=1)],
                     [_const("axes", np.array([2, 3], np.int64))], 18)
    for op in ("GlobalAveragePool", "GlobalMaxPool"):
        cases[op] = (lambda x, op=op: [helper.make_node(op, [x], ["y"])], [], 18)
    for op in ("AveragePool", "MaxPool", "LpPool"):
        cases[op] = (lambda x, op=op: [helper.make_node(op, [x], ["y"], kernel_shape=[2, 2])], [], 18)
    cases["Softmax"] = (lambda x: [helper.make_node("Softmax", [x], ["y"], axis=1)], [], 18)
    cases["LogSoftmax"] = (lambda x: [helper.make_node("LogSoftmax", [x], ["y"], axis=1)], [], 18)
    cases["Resize"] = (lambda x: [helper.make_node("Resize", [x, "", "scales"], ["y"], mode="nearest")],
                       [_const("scales", np.array([1, 1, 2, 2], np.float32))], 18)
    cases["Resize(linear)"] = (lambda x: [helper.make_node("Resize", [x, "", "scales"], ["y"], mode="linear")],
                               [_const("scales", np.array([1, 1, 2, 2], np.float32))], 18)
    cases["Pad"] = (lambda x: [helper.make_node("Pad", [x, "pads"], ["y"])],
                    [_const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], 18)
    cases["Transpose"] = (lambda x: [helper.make_node("Transpose", [x], ["y"], perm=[0, 2, 3, 1])], [], 18)
    cases["Flatten"] = (lambda x: [helper.make_node("Flatten", [x], ["y"])], [], 18)
    cases["Reshape"] = (lambda x: [helper.make_node("Reshape", [x, "shape"], ["y"])],
                        [_const("shape", np.array([2, -1], np.int64))], 18)
    cases["Concat"] = (lambda x: [helper.make_node("Concat", [x, x], ["y"], axis=1)], [], 18)
    cases["Split"] = (lambda x: [helper.make_node("Split", [x], ["y", "y2"], axis=1, num_outputs=2)], [], 18)
    cases["Slice"] = (lambda x: [helper.make_node("Slice", [x, "starts", "ends", "axes"], ["y"])],
                      [_const("starts", np.array([1], np.int64)), _const("ends", np.array([3], np.int64)),
                       _const("axes", np.array([1], np.int64))], 18)
    cases["Gather"] = (lambda x: [helper.make_node("Gather", [x, "indices"], ["y"], axis=1)],
                       [_const("indices", np.array([0, 2], np.int64))], 18)
    cases["Expand"] = (lambda x: [helper.make_node("Expand", [x, "eshape"], ["y"])],
                       [_const("eshape", np.array([2, 2, 4, 6, 6], np.int64))], 18)
    cases["Tile"] = (lambda x: [helper.make_node("Tile", [x, "repeats"], ["y"])],
                     [_const("repeats", np.array([1, 2, 1, 1], np.int64))], 18)
    cases["Squeeze/Unsqueeze"] = (lambda x: [helper.make_node("Unsqueeze", [x, "ax"], ["u"]),
                                             helper.make_node("Squeeze", ["u", "ax"], ["y"])],
                                  [_const("ax", np.array([0], np.int64))], 18)
    cases["Where"] = (lambda x: [helper.make_node("Where", ["cond", x, "other"], ["y"])],
                      [_const("cond", np.ones(SHAPE, bool)), _const("other", np.zeros(SHAPE, np.float32))], 18)
    cases["Cast"] = (lambda x: [helper.make_node("Cast", [x], ["y"], to=TensorProto.FLOAT)], [], 18)
    cases["CumSum"] = (lambda x: [helper.make_node("CumSum", [x, "axis"], ["y"])],
                       [_const("axis", np.array(1, np.int64))], 18)
    cases["Einsum"] = (lambda x: [helper.make_node("Einsum", [x, x], ["y"], equation="nchw,nchw->nc")], [], 18)
    cases["MatMul"] = (lambda x: [helper.make_node("MatMul", [x, "m"], ["y"])],
                       [_const("m", np.ones((6, 3), np.float32))], 18)
    cases["Conv"] = (lambda x: [helper.make_node("Conv", [x, "k"], ["y"], pads=[1, 1, 1, 1])],
                     [_const("k", np.ones((3, 4, 3, 3), np.float32))], 18)
    cases["Conv(depthwise)"] = (lambda x: [helper.make_node("Conv", [x, "kd"], ["y"], group=4, pads=[1, 1, 1, 1])],
                                [_const("kd", np.ones((4, 1, 3, 3), np.float32))], 18)
    cases["ConvTranspose"] = (lambda x: [helper.make_node("ConvTranspose", [x, "kt"], ["y"], strides=[2, 2])],
                              [_const("kt", np.ones((4, 3, 2, 2), np.float32))], 18)
    cases["BatchNormalization"] = (lambda x: [helper.make_node("BatchNormalization", [x, "g", "b", "m", "v"], ["y"])],
                                   [_const(n, np.ones(4, np.float32)) for n in ("g", "b", "m", "v")], 18)
    cases["InstanceNormalization"] = (lambda x: [helper.make_node("InstanceNormalization", [x, "g", "b"], ["y"])],
                                      [_const(n, np.ones(4, np.float32)) for n in ("g", "b")], 18)
    cases["LayerNormalization"] = (lambda x: [helper.make_node("LayerNormalization", [x, "lg", "lb"], ["y"], axis=-1)],
                                   [_const("lg", np.ones(6, np.float32)), _const("lb", np.zeros(6, np.float32))], 18)
    cases["GroupNormalization"] = (lambda x: [helper.make_node("GroupNormalization", [x, "gg", "gb"], ["y"],
                                                               num_groups=2)],
                                   [_const("gg", np.ones(4, np.float32)), _const("gb", np.zeros(4, np.float32))], 21)
    cases["DepthToSpace"] = (lambda x: [helper.make_node("DepthToSpace", [x], ["y"], blocksize=2)], [], 18)
    cases["SpaceToDepth"] = (lambda x: [helper.make_node("SpaceToDepth", [x], ["y"], blocksize=2)], [], 18)
    cases["TopK"] = (lambda x: [helper.make_node("TopK", [x, "k1"], ["y", "idx"], axis=1)],
                     [_const("k1", np.array([2], np.int64))], 18)
    cases["Dropout"] = (lambda x: [helper.make_node("Dropout", [x], ["y"])], [], 18)
    return cases


def _model(build, extra: list, opset: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]), *build("xw"),
             helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
                              [_const("w", np.full(SHAPE, 0.5, np.float32)), *extra])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    return model


def main() -> int:
    from onnxcompress.runtime.training import TrainingRuntimeSession

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "gradient_probe.json")
    args = parser.parse_args()
    results: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, (op, (build, extra, opset)) in enumerate(_cases().items()):
            path = Path(folder) / f"{index}.onnx"
            onnx.save(_model(build, extra, opset), path)
            with TrainingRuntimeSession() as session:  # one per op: a failed generation may end the worker
                try:
                    session.generate_artifacts(path, Path(folder) / f"a{index}", trainable=["w"], loss="none",
                                               optimizer="adamw")
                    results[op] = "ok"
                except Exception as error:  # noqa: BLE001 - the failure text is the result
                    line = next((ln for ln in str(error).splitlines() if "gradient" in ln.lower()), str(error))
                    results[op] = "fails: " + line.strip()[:200]
            log(f"{op}: {results[op]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    missing = sorted(op for op, result in results.items() if result != "ok")
    log(f"{len(results)} ops probed; without a gradient: {', '.join(missing) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
