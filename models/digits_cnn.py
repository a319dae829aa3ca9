"""Builder for the ``digits_cnn`` sample: a small ResNet-style CNN trained on
scikit-learn's digits data set with NumPy only, exported to ONNX.

Run ``python -m onnxcompress.models.digits_cnn`` (or ``python models/digits_cnn.py``)
to re-create the bundled files in ``models/data/``:

* ``digits_cnn.onnx``   the float32 model (opset 17, IR version 8)
* ``digits_calib.npz``  ``input`` [300, 1, 32, 32] float32: calibration samples
* ``digits_test.npz``   ``input`` [n, 1, 32, 32] float32 and ``labels`` [n] int64
* ``digits_cnn.json``   metadata (accuracy, split sizes, seed, architecture, timings)

Data
----
``sklearn.datasets.load_digits``: 1797 grey-scale 8x8 images with values 0..16.
Each image is scaled to [0, 1] by dividing by 16 and bilinearly upsampled to
32x32 (``scipy.ndimage.zoom``, order 1).  That scaled image *is* the model
input: no mean/std normalisation is applied anywhere, neither in the data files
nor in the graph -- the BatchNormalization after the first convolution takes
care of the activation scale.

The split is stratified by class with a fixed seed (``SEED``):

* test        500 images, held out; never seen by training or calibration;
* train       the remaining 1297 images (trained on with random +-2 px shifts);
* calibration 300 images drawn (stratified) from the *train* split, stored
  without augmentation.  Calibration and test are therefore disjoint.

Architecture (NCHW; input ``"input"`` [N, 1, 32, 32], output ``"logits"`` [N, 10])
------------------------------------------------------------------------------------

::

    Conv 3x3  1->32  pad 1  (no bias)   BN  ReLU          32x32
    Conv 3x3 32->64  pad 1  (no bias)   BN  ReLU          32x32
    MaxPool 2x2                                           16x16
    residual block:                                       16x16
        Conv 3x3 64->64 (no bias)  BN  ReLU
        Conv 3x3 64->64 (no bias)  BN
        Add(block input)  ReLU
    MaxPool 2x2                                            8x8
    Conv 3x3 64->128 pad 1 (no bias)    BN  ReLU           8x8
    GlobalAveragePool  Flatten  Gemm 128->10

The convolutions have no bias (the following BN has one), and the
BatchNormalization nodes are exported unfolded, with their running statistics,
so that the toolkit's BN-folding pass has something to do.  The residual ``Add``
joins two activations, which exercises unified quantization scales.

Training
--------
Mini-batch Adam on softmax cross-entropy, cosine learning-rate decay, decoupled
weight decay on conv/linear weights.  Convolutions are im2col + matmul.
Internally activations are kept NHWC (so im2col needs no transposes); weights
use the ONNX layout [out, in, kh, kw] throughout.  BN uses batch statistics in
training and exponential running averages (momentum 0.1, unbiased variance,
like PyTorch) at inference.  Everything is seeded, so a rebuild reproduces the
same weights (up to BLAS threading non-determinism).

Before anything is written, the builder checks that the exported graph passes
``onnx.checker`` and that ONNX Runtime reproduces the NumPy eval-mode forward
pass within 1e-4.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

SEED = 20240531
N_TEST = 500
N_CALIB = 300
IMAGE_SIZE = 32
MAX_SHIFT = 2
EPOCHS = 12
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 5e-4
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
OPSET = 17
IR_VERSION = 8

DATA_DIR = Path(__file__).resolve().parent / "data"

# Conv layers of the network: name -> (in_channels, out_channels). All are 3x3, pad 1,
# each followed by a BatchNormalization of the same name with "bn" instead of "conv".
CONVS = {
    "conv1": (1, 32),
    "conv2": (32, 64),
    "res_conv1": (64, 64),
    "res_conv2": (64, 64),
    "conv3": (64, 128),
}
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------


def upsample(images8: np.ndarray) -> np.ndarray:
    """[n, 8, 8] in 0..16 -> [n, 1, 32, 32] float32 in [0, 1] (bilinear)."""
    from scipy.ndimage import zoom

    factor = IMAGE_SIZE / images8.shape[-1]
    big = zoom(images8.astype(np.float64) / 16.0, (1, factor, factor), order=1)
    return np.clip(big, 0.0, 1.0).astype(np.float32)[:, None]


def load_splits(seed: int = SEED) -> dict[str, np.ndarray]:
    """Stratified train / test split, calibration drawn from train."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = upsample(digits.images)
    y = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=N_TEST, stratify=y, random_state=seed
    )
    idx_calib, _ = train_test_split(
        idx_train, train_size=N_CALIB, stratify=y[idx_train], random_state=seed + 1
    )
    assert not set(idx_calib) & set(idx_test)
    return {
        "x_train": x[idx_train], "y_train": y[idx_train],
        "x_test": x[idx_test], "y_test": y[idx_test],
        "x_calib": x[idx_calib],
    }


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int = MAX_SHIFT) -> np.ndarray:
    """Shift every image by an independent random (dy, dx) in [-max_shift, max_shift]."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    shifts = rng.integers(0, 2 * max_shift + 1, size=(n, 2))
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(shifts):
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


# ----------------------------------------------------------------------------------
# Layers (NHWC activations, ONNX-layout weights).  forward -> (out, cache);
# backward(dout, cache) -> (dx, grads...)
# ----------------------------------------------------------------------------------


def im2col(x: np.ndarray) -> np.ndarray:
    """[N, H, W, C] -> [N*H*W, 3*3*C] patches of a 3x3, pad 1, stride 1 convolution.

    Patch features are ordered (kh, kw, C): concatenating the 9 shifted views keeps
    every copy contiguous over C, which is much faster than a strided 3x3 gather.
    """
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
    return np.concatenate(shifted, axis=-1).reshape(n * h * w, 9 * c)


def conv_forward(x, weight):
    """3x3 pad-1 convolution; x is NHWC, weight is ONNX layout [out, in, 3, 3]."""
    w2d = weight.transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (kh, kw, C) order
    cols = im2col(x)
    out = cols @ w2d.T
    return out.reshape(*x.shape[:3], weight.shape[0]), (cols, x.shape, w2d)


def col2im(dcols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Adjoint of im2col: scatter-add [N*H*W, 3*3*C] patch gradients back to [N, H, W, C]."""
    n, h, w, c = shape
    dcols = dcols.reshape(n, h, w, 3, 3, c)
    dpadded = np.zeros((n, h + 2, w + 2, c), dtype=dcols.dtype)
    for i in range(3):
        for j in range(3):
            dpadded[:, i:i + h, j:j + w, :] += dcols[:, :, :, i, j, :]
    return dpadded[:, 1:-1, 1:-1, :]


def conv_backward(dout, cache, need_dx=True):
    """Gradients w.r.t. the weight (ONNX layout) and, unless need_dx is False, the input."""
    cols, x_shape, w2d = cache
    cout = w2d.shape[0]
    dout = dout.reshape(-1, cout)
    dweight = (dout.T @ cols).reshape(cout, 3, 3, -1).transpose(0, 3, 1, 2)
    dx = col2im(dout @ w2d, x_shape) if need_dx else None
    return dx, dweight


def bn_forward(x, gamma, beta, running, train):
    """BatchNorm over N, H, W (channels last). ``running`` = {"mean", "var"} is updated in train."""
    if train:
        flat = x.reshape(-1, x.shape[-1])
        count = len(flat)
        mean = flat.mean(axis=0)
        var = np.maximum((flat * flat).mean(axis=0) - mean * mean, 0.0)
        running["mean"] += BN_MOMENTUM * (mean - running["mean"])
        running["var"] += BN_MOMENTUM * (var * count / (count - 1) - running["var"])
    else:
        mean, var = running["mean"], running["var"]
    inv_std = 1.0 / np.sqrt(var + BN_EPS)
    x_hat = (x - mean) * inv_std
    return x_hat * gamma + beta, (x_hat, inv_std, gamma)


def bn_backward(dout, cache):
    x_hat, inv_std, gamma = cache
    m = dout.size // dout.shape[-1]
    dbeta = dout.reshape(-1, dout.shape[-1]).sum(axis=0)
    dgamma = (dout * x_hat).reshape(-1, dout.shape[-1]).sum(axis=0)
    dx = (gamma * inv_std / m) * (m * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def relu_forward(x):
    out = np.maximum(x, 0)
    return out, out > 0


def relu_backward(dout, mask):
    return dout * mask


def maxpool_forward(x):
    """2x2, stride 2."""
    n, h, w, c = x.shape
    blocks = x.reshape(n, h // 2, 2, w // 2, 2, c)
    out = blocks.max(axis=(2, 4))
    mask = blocks == out[:, :, None, :, None, :]
    return out, mask


def maxpool_backward(dout, mask):
    n, h2, _, w2, _, c = mask.shape
    dx = mask * dout[:, :, None, :, None, :]
    return dx.reshape(n, h2 * 2, w2 * 2, c)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy and its gradient w.r.t. the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -log_probs[np.arange(n), labels].mean()
    dlogits = np.exp(log_probs)
    dlogits[np.arange(n), labels] -= 1.0
    return loss, dlogits / n


# ----------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------


def init_params(rng: np.random.Generator) -> tuple[dict, dict]:
    """He-initialised weights and BN parameters; running BN statistics in a separate dict."""
    params, bn_state = {}, {}
    for name, (cin, cout) in CONVS.items():
        bn = name.replace("conv", "bn")
        params[f"{name}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9)))
        params[f"{bn}.gamma"] = np.ones(cout)
        params[f"{bn}.beta"] = np.zeros(cout)
        bn_state[bn] = {"mean": np.zeros(cout, np.float32), "var": np.ones(cout, np.float32)}
    # Zero-init the last BN of the residual branch: the block starts as identity.
    params["res_bn2.gamma"] = np.zeros(CONVS["res_conv2"][1])
    cin = CONVS["conv3"][1]
    params["fc.weight"] = rng.standard_normal((NUM_CLASSES, cin)) * np.sqrt(1.0 / cin)
    params["fc.bias"] = np.zeros(NUM_CLASSES)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    return params, bn_state


def conv_bn(x, name, params, bn_state, train, caches):
    """Conv (no bias) + BatchNormalization; caches are appended for the backward pass."""
    bn = name.replace("conv", "bn")
    x, c_conv = conv_forward(x, params[f"{name}.weight"])
    x, c_bn = bn_forward(x, params[f"{bn}.gamma"], params[f"{bn}.beta"], bn_state[bn], train)
    caches[name] = (c_conv, c_bn)
    return x


def conv_bn_backward(dout, name, caches, grads, need_dx=True):
    c_conv, c_bn = caches[name]
    bn = name.replace("conv", "bn")
    dout, grads[f"{bn}.gamma"], grads[f"{bn}.beta"] = bn_backward(dout, c_bn)
    dx, grads[f"{name}.weight"] = conv_backward(dout, c_conv, need_dx)
    return dx


def forward(params, bn_state, x_nchw, train=False):
    """Logits [N, 10] for NCHW float32 input; returns (logits, caches)."""
    caches = {}
    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))  # -> NHWC
    x, caches["relu1"] = relu_forward(conv_bn(x, "conv1", params, bn_state, train, caches))
    x, caches["relu2"] = relu_forward(conv_bn(x, "conv2", params, bn_state, train, caches))
    x, caches["pool1"] = maxpool_forward(x)
    skip = x
    x, caches["res_relu1"] = relu_forward(conv_bn(x, "res_conv1", params, bn_state, train, caches))
    x = conv_bn(x, "res_conv2", params, bn_state, train, caches)
    x, caches["res_relu2"] = relu_forward(x + skip)
    x, caches["pool2"] = maxpool_forward(x)
    x, caches["relu3"] = relu_forward(conv_bn(x, "conv3", params, bn_state, train, caches))
    caches["gap_shape"] = x.shape
    features = x.mean(axis=(1, 2))
    caches["features"] = features
    logits = features @ params["fc.weight"].T + params["fc.bias"]
    return logits, caches


def backward(params, caches, dlogits):
    """Gradients of all parameters given dLoss/dlogits."""
    grads = {}
    grads["fc.weight"] = dlogits.T @ caches["features"]
    grads["fc.bias"] = dlogits.sum(axis=0)
    n, h, w, c = caches["gap_shape"]
    dx = np.broadcast_to((dlogits @ params["fc.weight"])[:, None, None, :] / (h * w), (n, h, w, c))
    dx = relu_backward(dx, caches["relu3"])
    dx = conv_bn_backward(dx, "conv3", caches, grads)
    dx = maxpool_backward(dx, caches["pool2"])
    dx = relu_backward(dx, caches["res_relu2"])
    dskip = dx
    dx = conv_bn_backward(dx, "res_conv2", caches, grads)
    dx = relu_backward(dx, caches["res_relu1"])
    dx = conv_bn_backward(dx, "res_conv1", caches, grads) + dskip
    dx = maxpool_backward(dx, caches["pool1"])
    dx = relu_backward(dx, caches["relu2"])
    dx = conv_bn_backward(dx, "conv2", caches, grads)
    dx = relu_backward(dx, caches["relu1"])
    conv_bn_backward(dx, "conv1", caches, grads, need_dx=False)  # no gradient w.r.t. the image
    return grads


def predict(params, bn_state, x, batch_size=256):
    """Eval-mode logits, batched."""
    return np.concatenate(
        [forward(params, bn_state, x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)]
    )


# ----------------------------------------------------------------------------------
# Optimiser and training loop
# ----------------------------------------------------------------------------------


class Adam:
    """Adam with decoupled weight decay (AdamW) on weight tensors only."""

    def __init__(self, params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads, lr):
        self.t += 1
        b1, b2 = self.betas
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            if k.endswith(".weight"):
                params[k] -= lr * self.weight_decay * params[k]
            params[k] -= (lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(np.float32)


def train(splits, seed=SEED, epochs=EPOCHS, log=print):
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
            logits, caches = forward(params, bn_state, xb, train=True)
            loss, dlogits = softmax_cross_entropy(logits, yb)
            opt.step(params, backward(params, caches, dlogits.astype(np.float32)), lr)
            losses.append(loss)
            correct += int((logits.argmax(1) == yb).sum())
            step += 1
        log(f"epoch {epoch + 1:2d}/{epochs}  loss {np.mean(losses):.4f}  "
            f"train acc (augmented, train-mode BN) {correct / len(x_train):.4f}  "
            f"({time.perf_counter() - t0:.1f}s)")
    return params, bn_state


def accuracy(logits, labels) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


# ----------------------------------------------------------------------------------
# ONNX export
# ----------------------------------------------------------------------------------


def export_onnx(params, bn_state):
    """Build the ONNX graph (unfolded BN, symbolic batch dimension "N")."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv_bn(x, conv):
        bn = conv.replace("conv", "bn")
        x = node("Conv", [x, init(f"{conv}.weight", params[f"{conv}.weight"])], conv,
                 kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        return node("BatchNormalization", [
            x,
            init(f"{bn}.scale", params[f"{bn}.gamma"]),
            init(f"{bn}.bias", params[f"{bn}.beta"]),
            init(f"{bn}.running_mean", bn_state[bn]["mean"]),
            init(f"{bn}.running_var", bn_state[bn]["var"]),
        ], bn, epsilon=BN_EPS)

    def maxpool(x, name):
        return node("MaxPool", [x], name, kernel_shape=[2, 2], strides=[2, 2])

    x = node("Relu", [conv_bn("input", "conv1")], "relu1")
    x = node("Relu", [conv_bn(x, "conv2")], "relu2")
    skip = maxpool(x, "pool1")
    x = node("Relu", [conv_bn(skip, "res_conv1")], "res_relu1")
    x = node("Add", [conv_bn(x, "res_conv2"), skip], "res_add")
    x = node("Relu", [x], "res_relu2")
    x = maxpool(x, "pool2")
    x = node("Relu", [conv_bn(x, "conv3")], "relu3")
    x = node("GlobalAveragePool", [x], "gap")
    x = node("Flatten", [x], "flatten", axis=1)
    nodes.append(helper.make_node(
        "Gemm", [x, init("fc.weight", params["fc.weight"]), init("fc.bias", params["fc.bias"])],
        ["logits"], name="fc", transB=1))

    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxcompress.models.digits_cnn", producer_version="1",
        doc_string="ResNet-style CNN for sklearn digits upsampled to 32x32 (input = pixel/16).",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def check_against_onnxruntime(model, params, bn_state, x, atol=1e-4):
    """Assert ONNX Runtime reproduces the NumPy eval-mode forward pass."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = predict(params, bn_state, x)
    got = sess.run(["logits"], {"input": x})[0]
    max_err = float(np.abs(got - expected).max())
    assert max_err <= atol, f"ONNX Runtime differs from NumPy forward: max |diff| = {max_err}"
    return max_err


# ----------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------


def build(out_dir: Path = DATA_DIR, seed: int = SEED, epochs: int = EPOCHS) -> dict:
    import onnx

    np.random.seed(seed)  # nothing should use the global RNG; belt and braces
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    splits = load_splits(seed)
    t_train = time.perf_counter()
    params, bn_state = train(splits, seed=seed, epochs=epochs)
    train_seconds = time.perf_counter() - t_train

    test_acc = accuracy(predict(params, bn_state, splits["x_test"]), splits["y_test"])
    train_acc = accuracy(predict(params, bn_state, splits["x_train"]), splits["y_train"])
    model = export_onnx(params, bn_state)
    max_err = check_against_onnxruntime(model, params, bn_state, splits["x_test"])

    onnx.save(model, out_dir / "digits_cnn.onnx")
    np.savez_compressed(out_dir / "digits_calib.npz", input=splits["x_calib"])
    np.savez_compressed(out_dir / "digits_test.npz", input=splits["x_test"], labels=splits["y_test"])
    write_finetune_data(splits, out_dir)
    meta = {
        "name": "digits_cnn",
        "description": "ResNet-style CNN on sklearn digits (8x8 -> bilinear 32x32), trained with NumPy.",
        "input": {"name": "input", "shape": ["N", 1, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32",
                  "preprocessing": "pixel / 16 (range [0, 1]), bilinear upsample 8x8 -> 32x32; "
                                   "no mean/std normalisation"},
        "output": {"name": "logits", "shape": ["N", NUM_CLASSES], "dtype": "float32"},
        "opset": OPSET, "ir_version": IR_VERSION,
        "architecture": [
            "Conv3x3(1->32,pad1,no bias) BN ReLU",
            "Conv3x3(32->64,pad1,no bias) BN ReLU",
            "MaxPool2x2",
            "Residual[Conv3x3(64->64) BN ReLU Conv3x3(64->64) BN] Add ReLU",
            "MaxPool2x2",
            "Conv3x3(64->128,pad1,no bias) BN ReLU",
            "GlobalAveragePool Flatten Gemm(128->10)",
        ],
        "num_parameters": int(sum(v.size for v in params.values())),
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "onnxruntime_max_abs_diff": max_err,
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
    (out_dir / "digits_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_finetune_data(splits: dict[str, np.ndarray], out_dir: Path) -> None:
    """The training split with labels, for fine-tuning (quantization-aware training) of the bundled model."""
    np.savez_compressed(out_dir / "digits_train.npz", input=splits["x_train"], labels=splits["y_train"])


def main() -> None:
    meta = build()
    print(f"test accuracy {meta['test_accuracy']:.4f}  "
          f"(train {meta['training']['train_seconds']}s, total {meta['training']['total_seconds']}s)")
    print(f"wrote digits_cnn.onnx / .json, digits_calib.npz, digits_test.npz, digits_train.npz to {DATA_DIR}")


if __name__ == "__main__":
    main()
