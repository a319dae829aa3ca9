"""Builder for the ``digits_mobile`` sample: a small MobileNetV3-style classifier trained on
scikit-learn's digits data set with NumPy only, exported to ONNX.

Run ``python -m onnxcompress.models.digits_mobile`` (or ``python models/digits_mobile.py``)
to re-create the bundled files in ``models/data/``:

* ``digits_mobile.onnx``  the float32 model (opset 17, IR version 8)
* ``digits_mobile.json``  metadata (accuracy, split sizes, seed, architecture, timings)

Data
----
Exactly the data of the ``digits_cnn`` sample: ``load_splits`` and ``random_shift`` are
imported from ``digits_cnn.py`` and used with the same seed, so the inputs are pixel/16
bilinearly upsampled to 32x32 (no normalisation) and the split is the same stratified
1297 train / 500 test images with 300 calibration images drawn from train.  The bundled
``digits_calib.npz``, ``digits_test.npz`` and ``digits_train.npz`` (written by the
``digits_cnn`` builder) therefore serve both samples; before training, the builder checks
that its split equals those files, so the accuracy it records is that of the bundled test set.

Architecture (NCHW; input ``"input"`` [N, 1, 32, 32], output ``"logits"`` [N, 10])
------------------------------------------------------------------------------------

::

    stem    Conv 3x3 1->16 pad 1 (no bias)  BN  HardSwish                        32x32
    block1  inverted residual 16 -> 64 -> 24,  stride 2, expand act Relu        16x16
    block2  inverted residual 24 -> 72 -> 24,  stride 1, Add(block input)       16x16
    block3  inverted residual 24 -> 96 -> 40,  stride 2                          8x8
    block4  inverted residual 40 -> 120 -> 40, stride 1, Add(block input)        8x8
    head    Conv 1x1 40->160 (no bias)  BN  HardSwish
            GlobalAveragePool  Flatten  Gemm 160->10

    inverted residual, E expanded channels:
        Conv 1x1 in->E (expand, no bias)  BN  Relu | HardSwish
        Conv 3x3 depthwise (group = E, pad 1, stride s, no bias)  BN  HardSwish
        squeeze-excitation: GlobalAveragePool  Conv 1x1 E->E/4 (bias)  Relu
                            Conv 1x1 E/4->E (bias)  HardSigmoid(alpha=1/6, beta=0.5)
                            Mul(trunk, gate)
        Conv 1x1 E->out (project, no bias)  BN              (linear bottleneck)
        Add(block input) where stride is 1 and in == out

These are the cases that are hard for compression: depthwise convolutions (nine weights
per filter, widely different ranges per channel), HardSwish (outputs down to -3/8,
asymmetric), the squeeze-excitation Mul of two activations, residual Adds joining two
activations, and unfolded BatchNormalization nodes with their running statistics.

Training
--------
As for ``digits_cnn`` (whose layers, loss and optimiser are reused): mini-batch AdamW on
softmax cross-entropy with cosine learning-rate decay and random +-2 px shifts; BN with
batch statistics in training and running averages at inference.  Activations are NHWC
internally; each layer's forward returns its output and a closure that back-propagates
through it.  1x1 convolution weights are kept as [out, in] matrices and reshaped to
[out, in, 1, 1] on export.  Everything is seeded, so a rebuild reproduces the same weights
(up to BLAS threading non-determinism).

Before anything is written, the builder checks that the exported graph passes
``onnx.checker``, that ONNX Runtime reproduces the NumPy eval-mode forward pass within
1e-4, and that OpenVINO compiles it for the CPU and agrees within 1e-3.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from onnxcompress.models.digits_cnn import (
    BN_EPS,
    BN_MOMENTUM,
    DATA_DIR,
    IMAGE_SIZE,
    IR_VERSION,
    MAX_SHIFT,
    NUM_CLASSES,
    OPSET,
    SEED,
    Adam,
    accuracy,
    bn_backward,
    bn_forward,
    conv_backward,
    conv_forward,
    load_splits,
    random_shift,
    softmax_cross_entropy,
)

NAME = "digits_mobile"
EPOCHS = 20
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 5e-4
HARD_ALPHA = np.float32(1 / 6)  # HardSwish's fixed slope; HardSigmoid gets it as an attribute
HARD_BETA = np.float32(0.5)

STEM_CHANNELS = 16
# Inverted-residual blocks: name -> (in, expanded, out, depthwise stride, expand activation).
BLOCKS: dict[str, tuple[int, int, int, int, str]] = {
    "block1": (16, 64, 24, 2, "Relu"),
    "block2": (24, 72, 24, 1, "HardSwish"),
    "block3": (24, 96, 40, 2, "HardSwish"),
    "block4": (40, 120, 40, 1, "HardSwish"),
}
SE_REDUCTION = 4
HEAD_CHANNELS = 160

Params = dict[str, np.ndarray]
BNState = dict[str, dict[str, np.ndarray]]
# dL/d(output), gradient dict to fill -> dL/d(input) (None where nothing needs it: the image).
Backward = Callable[[np.ndarray, Params], np.ndarray | None]
Layer = Callable[[np.ndarray], tuple[np.ndarray, Backward]]


def is_residual(block: str) -> bool:
    cin, _, cout, stride, _ = BLOCKS[block]
    return stride == 1 and cin == cout


# ----------------------------------------------------------------------------------
# Layers (NHWC activations).  Each returns (output, backward closure).
# ----------------------------------------------------------------------------------


def sequential(x: np.ndarray, layers: list[Layer]) -> tuple[np.ndarray, Backward]:
    """Apply `layers` in order; the closure back-propagates through them in reverse."""
    backs = []
    for layer in layers:
        x, back = layer(x)
        backs.append(back)

    def backward(dout: np.ndarray, grads: Params) -> np.ndarray | None:
        for back in reversed(backs):
            dout = back(dout, grads)
        return dout

    return x, backward


def stem_conv(x: np.ndarray, params: Params) -> tuple[np.ndarray, Backward]:
    """3x3 pad-1 convolution of the image (digits_cnn's im2col kernel); no input gradient."""
    out, cache = conv_forward(x, params["stem.conv.weight"])

    def backward(dout: np.ndarray, grads: Params) -> None:
        _, grads["stem.conv.weight"] = conv_backward(dout, cache, need_dx=False)

    return out, backward


def pointwise(x: np.ndarray, params: Params, name: str) -> tuple[np.ndarray, Backward]:
    """1x1 convolution without bias; weight [out, in]."""
    weight = params[f"{name}.weight"]
    flat = x.reshape(-1, x.shape[-1])

    def backward(dout: np.ndarray, grads: Params) -> np.ndarray:
        dflat = dout.reshape(-1, weight.shape[0])
        grads[f"{name}.weight"] = dflat.T @ flat
        return (dflat @ weight).reshape(x.shape)

    return (flat @ weight.T).reshape(*x.shape[:3], weight.shape[0]), backward


def depthwise(x: np.ndarray, params: Params, name: str, stride: int) -> tuple[np.ndarray, Backward]:
    """3x3 depthwise convolution, pad 1; weight in ONNX layout [C, 1, 3, 3]."""
    weight = params[f"{name}.weight"]
    n, h, w, c = x.shape
    ho, wo = h // stride, w // stride
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Tap (i, j) of output pixel (y, x) reads padded pixel (stride*y + i, stride*x + j).
    taps = [(i, j, np.s_[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :])
            for i in range(3) for j in range(3)]
    out = np.zeros((n, ho, wo, c), x.dtype)
    for i, j, view in taps:
        out += padded[view] * weight[:, 0, i, j]

    def backward(dout: np.ndarray, grads: Params) -> np.ndarray:
        dweight = np.empty_like(weight)
        dpadded = np.zeros_like(padded)
        for i, j, view in taps:
            dweight[:, 0, i, j] = np.einsum("nhwc,nhwc->c", dout, padded[view])
            dpadded[view] += dout * weight[:, 0, i, j]
        grads[f"{name}.weight"] = dweight
        return dpadded[:, 1:-1, 1:-1, :]

    return out, backward


def dense(x: np.ndarray, params: Params, name: str) -> tuple[np.ndarray, Backward]:
    """[N, in] @ weight.T + bias: the SE's 1x1 convolutions on pooled features and the classifier."""
    weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]

    def backward(dout: np.ndarray, grads: Params) -> np.ndarray:
        grads[f"{name}.weight"] = dout.T @ x
        grads[f"{name}.bias"] = dout.sum(axis=0)
        return dout @ weight

    return x @ weight.T + bias, backward


def batchnorm(x: np.ndarray, params: Params, bn_state: BNState, name: str,
              train: bool) -> tuple[np.ndarray, Backward]:
    out, cache = bn_forward(x, params[f"{name}.gamma"], params[f"{name}.beta"], bn_state[name], train)

    def backward(dout: np.ndarray, grads: Params) -> np.ndarray:
        dx, grads[f"{name}.gamma"], grads[f"{name}.beta"] = bn_backward(dout, cache)
        return dx

    return out, backward


def relu(x: np.ndarray) -> tuple[np.ndarray, Backward]:
    out = np.maximum(x, 0)
    return out, lambda dout, grads: dout * (out > 0)


def hard_sigmoid(x: np.ndarray) -> tuple[np.ndarray, Backward]:
    """ONNX HardSigmoid(alpha=1/6, beta=0.5) = relu6(x + 3) / 6."""
    linear = x * HARD_ALPHA + HARD_BETA
    inside = (linear > 0) & (linear < 1)
    return np.clip(linear, 0, 1), lambda dout, grads: dout * (HARD_ALPHA * inside)


def hard_swish(x: np.ndarray) -> tuple[np.ndarray, Backward]:
    """ONNX HardSwish = x * HardSigmoid(x) with alpha 1/6, beta 0.5."""
    linear = x * HARD_ALPHA + HARD_BETA

    def backward(dout: np.ndarray, grads: Params) -> np.ndarray:
        # d/dx x * (a x + b) = 2 a x + b between the kinks; 1 above, 0 below.
        inside = (linear > 0) & (linear < 1)
        return dout * np.where(inside, 2 * HARD_ALPHA * x + HARD_BETA, (linear >= 1).astype(np.float32))

    return x * np.clip(linear, 0, 1), backward


ACTIVATIONS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, Backward]]] = {
    "Relu": relu, "HardSwish": hard_swish,
}


def squeeze_excite(x: np.ndarray, params: Params, name: str) -> tuple[np.ndarray, Backward]:
    """x * HardSigmoid(fc2(Relu(fc1(mean over H, W)))), the gate broadcast over H and W."""
    area = x.shape[1] * x.shape[2]
    gate, gate_backward = sequential(x.mean(axis=(1, 2)), [
        lambda t: dense(t, params, f"{name}.fc1"), relu,
        lambda t: dense(t, params, f"{name}.fc2"), hard_sigmoid,
    ])

    def backward(dout: np.ndarray, grads: Params) -> np.ndarray:
        dpooled = gate_backward(np.einsum("nhwc,nhwc->nc", dout, x), grads)
        return dout * gate[:, None, None, :] + dpooled[:, None, None, :] / area

    return x * gate[:, None, None, :], backward


def inverted_residual(x: np.ndarray, params: Params, bn_state: BNState, block: str,
                      train: bool) -> tuple[np.ndarray, Backward]:
    _, _, _, stride, expand_act = BLOCKS[block]
    out, trunk_backward = sequential(x, [
        lambda t: pointwise(t, params, f"{block}.expand"),
        lambda t: batchnorm(t, params, bn_state, f"{block}.expand_bn", train),
        ACTIVATIONS[expand_act],
        lambda t: depthwise(t, params, f"{block}.dw", stride),
        lambda t: batchnorm(t, params, bn_state, f"{block}.dw_bn", train),
        hard_swish,
        lambda t: squeeze_excite(t, params, f"{block}.se"),
        lambda t: pointwise(t, params, f"{block}.project"),
        lambda t: batchnorm(t, params, bn_state, f"{block}.project_bn", train),
    ])
    if not is_residual(block):
        return out, trunk_backward
    return out + x, lambda dout, grads: trunk_backward(dout, grads) + dout


def global_average_pool(x: np.ndarray) -> tuple[np.ndarray, Backward]:
    n, h, w, c = x.shape
    return x.mean(axis=(1, 2)), lambda dout, grads: np.broadcast_to(dout[:, None, None, :] / (h * w),
                                                                    (n, h, w, c))


def forward(params: Params, bn_state: BNState, x_nchw: np.ndarray,
            train: bool = False) -> tuple[np.ndarray, Backward]:
    """Logits [N, 10] for NCHW float32 input, and the closure that back-propagates dL/dlogits."""
    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))  # -> NHWC
    layers: list[Layer] = [
        lambda t: stem_conv(t, params),
        lambda t: batchnorm(t, params, bn_state, "stem.bn", train),
        hard_swish,
    ]
    layers += [lambda t, b=block: inverted_residual(t, params, bn_state, b, train) for block in BLOCKS]
    layers += [
        lambda t: pointwise(t, params, "head.conv"),
        lambda t: batchnorm(t, params, bn_state, "head.bn", train),
        hard_swish,
        global_average_pool,
        lambda t: dense(t, params, "fc"),
    ]
    return sequential(x, layers)


def predict(params: Params, bn_state: BNState, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Eval-mode logits, batched."""
    return np.concatenate(
        [forward(params, bn_state, x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)]
    )


# ----------------------------------------------------------------------------------
# Parameters and training
# ----------------------------------------------------------------------------------


def init_params(rng: np.random.Generator) -> tuple[Params, BNState]:
    """He-initialised weights (linear-scaled for the projections), unit BN; running statistics apart."""
    params: Params = {}
    bn_state: BNState = {}

    def conv(name: str, shape: tuple[int, ...], gain: float = 2.0) -> None:
        fan_in = int(np.prod(shape[1:]))
        params[f"{name}.weight"] = rng.standard_normal(shape) * np.sqrt(gain / fan_in)

    def bn(name: str, channels: int) -> None:
        params[f"{name}.gamma"] = np.ones(channels)
        params[f"{name}.beta"] = np.zeros(channels)
        bn_state[name] = {"mean": np.zeros(channels, np.float32), "var": np.ones(channels, np.float32)}

    conv("stem.conv", (STEM_CHANNELS, 1, 3, 3))
    bn("stem.bn", STEM_CHANNELS)
    for block, (cin, expanded, cout, _, _) in BLOCKS.items():
        squeezed = expanded // SE_REDUCTION
        conv(f"{block}.expand", (expanded, cin))
        bn(f"{block}.expand_bn", expanded)
        conv(f"{block}.dw", (expanded, 1, 3, 3))
        bn(f"{block}.dw_bn", expanded)
        conv(f"{block}.se.fc1", (squeezed, expanded))
        params[f"{block}.se.fc1.bias"] = np.zeros(squeezed)
        conv(f"{block}.se.fc2", (expanded, squeezed), gain=1.0)
        params[f"{block}.se.fc2.bias"] = np.zeros(expanded)
        conv(f"{block}.project", (cout, expanded), gain=1.0)
        bn(f"{block}.project_bn", cout)
        if is_residual(block):
            params[f"{block}.project_bn.gamma"][:] = 0.0  # the block starts as the identity
    conv("head.conv", (HEAD_CHANNELS, BLOCKS["block4"][2]))
    bn("head.bn", HEAD_CHANNELS)
    conv("fc", (NUM_CLASSES, HEAD_CHANNELS), gain=1.0)
    params["fc.bias"] = np.zeros(NUM_CLASSES)
    return {k: v.astype(np.float32) for k, v in params.items()}, bn_state


def train(splits: dict[str, np.ndarray], seed: int = SEED, epochs: int = EPOCHS,
          log: Callable[[str], None] = print) -> tuple[Params, BNState]:
    rng = np.random.default_rng(seed)
    params, bn_state = init_params(rng)
    opt = Adam(params, LEARNING_RATE, WEIGHT_DECAY)
    x_train, y_train = splits["x_train"], splits["y_train"]
    steps_per_epoch = int(np.ceil(len(x_train) / BATCH_SIZE))
    total_steps, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(x_train))
        x_aug = random_shift(x_train[order], rng)
        y_epoch = y_train[order]
        losses, correct = [], 0
        for i in range(0, len(x_train), BATCH_SIZE):
            lr = float(LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * step / total_steps)))
            xb, yb = x_aug[i:i + BATCH_SIZE], y_epoch[i:i + BATCH_SIZE]
            logits, backward = forward(params, bn_state, xb, train=True)
            loss, dlogits = softmax_cross_entropy(logits, yb)
            grads: Params = {}
            backward(dlogits.astype(np.float32), grads)
            opt.step(params, grads, lr)
            losses.append(loss)
            correct += int((logits.argmax(1) == yb).sum())
            step += 1
        log(f"epoch {epoch + 1:2d}/{epochs}  loss {np.mean(losses):.4f}  "
            f"train acc (augmented, train-mode BN) {correct / len(x_train):.4f}  "
            f"({time.perf_counter() - t0:.1f}s)")
    return params, bn_state


# ----------------------------------------------------------------------------------
# ONNX export and checks
# ----------------------------------------------------------------------------------


def export_onnx(params: Params, bn_state: BNState) -> onnx.ModelProto:
    """Build the ONNX graph (unfolded BN, symbolic batch dimension "N")."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(x: str, name: str, stride: int = 1, group: int = 1, bias: bool = False) -> str:
        weight = params[f"{name}.weight"]
        weight = weight if weight.ndim == 4 else weight[:, :, None, None]
        k = weight.shape[-1]
        inputs = [x, init(f"{name}.weight", weight)] + ([init(f"{name}.bias", params[f"{name}.bias"])]
                                                        if bias else [])
        return node("Conv", inputs, name, kernel_shape=[k, k], pads=[k // 2] * 4,
                    strides=[stride, stride], group=group)

    def bn(x: str, name: str) -> str:
        return node("BatchNormalization", [
            x,
            init(f"{name}.scale", params[f"{name}.gamma"]),
            init(f"{name}.bias", params[f"{name}.beta"]),
            init(f"{name}.running_mean", bn_state[name]["mean"]),
            init(f"{name}.running_var", bn_state[name]["var"]),
        ], name, epsilon=BN_EPS)

    x = node("HardSwish", [bn(conv("input", "stem.conv"), "stem.bn")], "stem.hardswish")
    for block, (_, expanded, _, stride, expand_act) in BLOCKS.items():
        skip = x
        x = node(expand_act, [bn(conv(x, f"{block}.expand"), f"{block}.expand_bn")],
                 f"{block}.expand_{expand_act.lower()}")
        x = bn(conv(x, f"{block}.dw", stride=stride, group=expanded), f"{block}.dw_bn")
        x = node("HardSwish", [x], f"{block}.dw_hardswish")
        gate = node("GlobalAveragePool", [x], f"{block}.se.pool")
        gate = node("Relu", [conv(gate, f"{block}.se.fc1", bias=True)], f"{block}.se.relu")
        gate = node("HardSigmoid", [conv(gate, f"{block}.se.fc2", bias=True)], f"{block}.se.hardsigmoid",
                    alpha=float(HARD_ALPHA), beta=float(HARD_BETA))
        x = node("Mul", [x, gate], f"{block}.se.mul")
        x = bn(conv(x, f"{block}.project"), f"{block}.project_bn")
        if is_residual(block):
            x = node("Add", [x, skip], f"{block}.add")
    x = node("HardSwish", [bn(conv(x, "head.conv"), "head.bn")], "head.hardswish")
    x = node("Flatten", [node("GlobalAveragePool", [x], "head.pool")], "head.flatten", axis=1)
    nodes.append(helper.make_node(
        "Gemm", [x, init("fc.weight", params["fc.weight"]), init("fc.bias", params["fc.bias"])],
        ["logits"], name="fc", transB=1))

    graph = helper.make_graph(
        nodes, NAME,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=f"onnxcompress.models.{NAME}", producer_version="1",
        doc_string="MobileNetV3-style classifier for sklearn digits upsampled to 32x32 (input = pixel/16).",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def check_bundled_data(splits: dict[str, np.ndarray], data_dir: Path = DATA_DIR) -> None:
    """The split must be the one in the npz files shared with digits_cnn."""
    expected = {
        ("digits_test.npz", "input"): splits["x_test"], ("digits_test.npz", "labels"): splits["y_test"],
        ("digits_train.npz", "input"): splits["x_train"], ("digits_train.npz", "labels"): splits["y_train"],
        ("digits_calib.npz", "input"): splits["x_calib"],
    }
    for (file, key), array in expected.items():
        with np.load(data_dir / file) as data:
            if not np.array_equal(data[key], array):
                raise RuntimeError(f"{file}[{key!r}] is not the split load_splits() makes; "
                                   "rebuild digits_cnn first")


def check_against_onnxruntime(model: onnx.ModelProto, expected: np.ndarray, x: np.ndarray,
                              atol: float = 1e-4) -> float:
    """ONNX Runtime must reproduce the NumPy eval-mode logits `expected`; returns the max |diff|."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    max_err = float(np.abs(sess.run(["logits"], {"input": x})[0] - expected).max())
    if max_err > atol:
        raise RuntimeError(f"ONNX Runtime differs from the NumPy forward: max |diff| = {max_err}")
    return max_err


def check_against_openvino(model: onnx.ModelProto, expected: np.ndarray, x: np.ndarray,
                           atol: float = 1e-3) -> float:
    """OpenVINO must compile the model for the CPU and agree with `expected`; returns the max |diff|."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{NAME}.onnx"
        onnx.save(model, path)
        # f32 explicitly: on bf16-capable CPUs the plugin would otherwise not run in float32.
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled({"input": x})[compiled.output(0)]
    max_err = float(np.abs(got - expected).max())
    if max_err > atol:
        raise RuntimeError(f"OpenVINO differs from the NumPy forward: max |diff| = {max_err}")
    return max_err


def architecture_summary() -> list[str]:
    lines = [f"Conv3x3(1->{STEM_CHANNELS},pad1,no bias) BN HardSwish"]
    for block, (cin, expanded, cout, stride, expand_act) in BLOCKS.items():
        lines.append(
            f"{block}: Conv1x1({cin}->{expanded}) BN {expand_act}, "
            f"DepthwiseConv3x3({expanded},group={expanded},stride{stride}) BN HardSwish, "
            f"SE[GlobalAveragePool Conv1x1({expanded}->{expanded // SE_REDUCTION},bias) Relu "
            f"Conv1x1({expanded // SE_REDUCTION}->{expanded},bias) HardSigmoid Mul], "
            f"Conv1x1({expanded}->{cout}) BN" + (", Add(block input)" if is_residual(block) else "")
        )
    lines.append(f"Conv1x1({BLOCKS['block4'][2]}->{HEAD_CHANNELS},no bias) BN HardSwish")
    lines.append(f"GlobalAveragePool Flatten Gemm({HEAD_CHANNELS}->{NUM_CLASSES})")
    return lines


# ----------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------


def build(out_dir: Path = DATA_DIR, seed: int = SEED, epochs: int = EPOCHS) -> dict:
    np.random.seed(seed)  # nothing should use the global RNG; belt and braces
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    splits = load_splits(seed)
    check_bundled_data(splits)
    t_train = time.perf_counter()
    params, bn_state = train(splits, seed=seed, epochs=epochs)
    train_seconds = time.perf_counter() - t_train

    test_logits = predict(params, bn_state, splits["x_test"])
    test_acc = accuracy(test_logits, splits["y_test"])
    train_acc = accuracy(predict(params, bn_state, splits["x_train"]), splits["y_train"])
    model = export_onnx(params, bn_state)
    ort_err = check_against_onnxruntime(model, test_logits, splits["x_test"])
    ov_err = check_against_openvino(model, test_logits, splits["x_test"])

    onnx.save(model, out_dir / f"{NAME}.onnx")
    meta = {
        "name": NAME,
        "description": "MobileNetV3-style classifier (inverted residuals, depthwise convs, squeeze-excitation, "
                       "HardSwish) on sklearn digits (8x8 -> bilinear 32x32), trained with NumPy.",
        "input": {"name": "input", "shape": ["N", 1, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32",
                  "preprocessing": "pixel / 16 (range [0, 1]), bilinear upsample 8x8 -> 32x32; "
                                   "no mean/std normalisation"},
        "output": {"name": "logits", "shape": ["N", NUM_CLASSES], "dtype": "float32"},
        "opset": OPSET, "ir_version": IR_VERSION,
        "architecture": architecture_summary(),
        "num_parameters": int(sum(v.size for v in params.values())),
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "onnxruntime_max_abs_diff": ort_err,
        "openvino_max_abs_diff": ov_err,
        "data": "digits_calib.npz, digits_test.npz, digits_train.npz (shared with digits_cnn)",
        "split": {"train": len(splits["y_train"]), "test": len(splits["y_test"]),
                  "calibration": len(splits["x_calib"]),
                  "calibration_source": "stratified subset of train (disjoint from test)",
                  "stratified": True},
        "seed": seed,
        "training": {"epochs": epochs, "batch_size": BATCH_SIZE, "optimizer": "AdamW",
                     "learning_rate": LEARNING_RATE, "lr_schedule": "cosine",
                     "weight_decay": WEIGHT_DECAY, "augmentation": f"random shift +-{MAX_SHIFT}px",
                     "bn_epsilon": BN_EPS, "bn_momentum": BN_MOMENTUM,
                     "train_seconds": round(train_seconds, 1),
                     "total_seconds": round(time.perf_counter() - t_start, 1),
                     "machine": platform.machine(), "numpy": np.__version__},
    }
    (out_dir / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    meta = build()
    print(f"test accuracy {meta['test_accuracy']:.4f}  "
          f"(train {meta['training']['train_seconds']}s, total {meta['training']['total_seconds']}s)")
    print(f"wrote {NAME}.onnx / .json to {DATA_DIR}")


if __name__ == "__main__":
    main()
