"""Shared fixtures and model builders.

The builders are plain functions so other tests can import them:

    from conftest import build_tiny_cnn, save_tiny_cnn, make_calib_npz
"""

from __future__ import annotations

import os

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import TrainingRuntimeMissing
from onnxcompress.runtime.training_env import TrainingRuntime, ensure_training_runtime

TINY_CNN_OPSET = 17
TINY_CNN_IR_VERSION = 8
TINY_CNN_INPUT = "x"
TINY_CNN_OUTPUT = "logits"
TINY_CNN_CLASSES = 10
TINY_CNN_NODE_NAMES = (
    "conv1", "bn1", "relu1", "pool", "conv2", "residual_add", "relu2", "gap", "flatten", "fc",
)


def build_tiny_cnn(seed: int = 0, *, dynamic_spatial: bool = False) -> onnx.ModelProto:
    """A small CNN: x[N,3,16,16] → Conv+BN+Relu → MaxPool → Conv → residual Add → Relu → GAP → Flatten
    → Gemm.

    Output "logits" [N,10]; opset 17, IR 8; weights drawn from `seed`. With `dynamic_spatial`, H and W are
    symbolic as well (the graph is fully convolutional up to the global pooling, so any size ≥ 2 works).
    """
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    channels = 8
    initializers = [
        weight("conv1.weight", channels, 3, 3, 3),
        weight("conv1.bias", channels, scale=0.1),
        numpy_helper.from_array((1.0 + 0.1 * rng.standard_normal(channels)).astype(np.float32), "bn1.scale"),
        weight("bn1.bias", channels, scale=0.1),
        weight("bn1.mean", channels, scale=0.1),
        numpy_helper.from_array((0.5 + rng.random(channels)).astype(np.float32), "bn1.var"),
        weight("conv2.weight", channels, channels, 3, 3, scale=0.2),
        weight("conv2.bias", channels, scale=0.1),
        weight("fc.weight", TINY_CNN_CLASSES, channels),
        weight("fc.bias", TINY_CNN_CLASSES, scale=0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1",
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["conv1_out", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"],
                         ["bn1_out"], name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["bn1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("MaxPool", ["relu1_out"], ["pool_out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool_out", "conv2.weight", "conv2.bias"], ["conv2_out"], name="conv2",
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Add", ["conv2_out", "pool_out"], ["add_out"], name="residual_add"),
        helper.make_node("Relu", ["add_out"], ["relu2_out"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat_out", "fc.weight", "fc.bias"], [TINY_CNN_OUTPUT], name="fc", transB=1),
    ]
    spatial: list[int | str] = ["H", "W"] if dynamic_spatial else [16, 16]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info(TINY_CNN_INPUT, TensorProto.FLOAT, ["N", 3, *spatial])],
        [helper.make_tensor_value_info(TINY_CNN_OUTPUT, TensorProto.FLOAT, ["N", TINY_CNN_CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", TINY_CNN_OPSET)],
                              producer_name="onnxcompress-tests")
    model.ir_version = TINY_CNN_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def save_tiny_cnn(path: Path, seed: int = 0, **options) -> Path:
    """Build the tiny CNN and save it (single file) at `path`."""
    path = Path(path)
    onnx.save_model(build_tiny_cnn(seed, **options), path)
    return path


def make_calib_npz(path: Path, samples: int = 20, seed: int = 1, *, name: str = TINY_CNN_INPUT,
                   shape: tuple[int, ...] = (3, 16, 16), dtype: type = np.float32) -> Path:
    """An .npz holding one array `name` of shape [samples, *shape], standard normal."""
    path = Path(path)
    data = np.random.default_rng(seed).standard_normal((samples, *shape)).astype(dtype)
    np.savez(path, **{name: data})
    return path


@pytest.fixture
def tiny_cnn_path(tmp_path: Path) -> Path:
    """The tiny CNN saved as tmp_path/tiny_cnn.onnx."""
    return save_tiny_cnn(tmp_path / "tiny_cnn.onnx")


@pytest.fixture
def tiny_calib_npz(tmp_path: Path) -> Path:
    """tmp_path/tiny.npz with "x": [20,3,16,16] float32 standard normal."""
    return make_calib_npz(tmp_path / "tiny.npz")


def save_tiny_cnn_models(folder: Path, samples: int = 8, seed: int = 1) -> dict[str, Path]:
    """The tiny CNN and its INT8 (QDQ) version from our own quantizer, calibrated on `samples` standard-normal
    images, saved as folder/tiny_fp32.onnx and folder/tiny_int8.onnx; returns {"fp32": path, "int8": path}."""
    from onnxcompress.api import quantize  # here, not at the top: only the runtime tests need the quantizer

    folder = Path(folder)
    model = build_tiny_cnn()
    rng = np.random.default_rng(seed)
    dataset = [{TINY_CNN_INPUT: rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(samples)]
    paths = {"fp32": folder / "tiny_fp32.onnx", "int8": folder / "tiny_int8.onnx"}
    onnx.save(model, str(paths["fp32"]))
    onnx.save(quantize(model, dataset, progress=False), str(paths["int8"]))
    return paths


@pytest.fixture(scope="session", autouse=True)
def private_score_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scores cached by one test never answer another's search (CLI runs inherit the variable)."""
    from onnxcompress.evaluation.cache import FOLDER_ENV

    folder = tmp_path_factory.mktemp("score-cache")
    os.environ[FOLDER_ENV] = str(folder)
    return folder


@pytest.fixture(scope="session")
def runtime() -> TrainingRuntime:
    """The private onnxruntime-training runtime (installed on first use); skips where it cannot exist."""
    try:
        return ensure_training_runtime(install=True)
    except TrainingRuntimeMissing as exc:
        pytest.skip(f"onnxruntime-training cannot be installed on this machine: {exc}")


def build_post_ln_block(seed: int = 0) -> onnx.ModelProto:
    """x[1,4,8] → LayerNorm → MatMul, and a residual Add of the LayerNorm output and the MatMul's (a post-LN
    block, as in BERT): node names ln, dense, residual."""
    rng = np.random.default_rng(seed)
    initializers = [numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "g"),
                    numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b"),
                    numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")]
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1),
         helper.make_node("MatMul", ["ln", "w"], ["h"], name="dense"),
         helper.make_node("Add", ["ln", "h"], ["y"], name="residual")],
        "post_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
