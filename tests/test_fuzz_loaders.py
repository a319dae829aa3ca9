"""Seeded fuzzing of the loaders (issue 11): mutated model files, .npz/.npy data, YAML/JSON configs and package
manifests, each derived from a valid seed. Every input must load or fail with an OnnxCompressError; any other
exception (or a crash) is a bug. Derandomized and bounded, so CI runs the same cases every time in well under two minutes;
ONNXCOMPRESS_FUZZ_EXAMPLES=N runs N fresh random cases per loader instead (a longer hunt)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcompress.config import FinetuneConfig, QuantizationConfig, read_config_file
from onnxcompress.data import calibration_batches, model_inputs
from onnxcompress.errors import OnnxCompressError
from onnxcompress.training.data import LabelledData, LabelSpec
from onnxcompress.config import Loss
from onnxcompress.runtime.model_io import load_model

_HUNT = os.environ.get("ONNXCOMPRESS_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_HUNT or 300), deadline=None, derandomize=_HUNT is None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few byte flips, insertions, deletions, duplicated spans or a truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate", "interesting"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 256))]
        elif kind == "truncate":
            del data[at:]
        elif data:  # values that break size and count fields: varint extremes, 0xFF runs, zeros
            data[at:at + 8] = draw(st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\xff\xff\xff\xff\x0f",
                                                    b"\x80\x80\x80\x80\x80\x80\x80\x80"]))
    return bytes(data)


def _expect_typed(action) -> None:
    try:
        action()
    except OnnxCompressError:
        pass


_MODEL_SEED = build_tiny_cnn().SerializeToString()


@FUZZ
@given(mutated(_MODEL_SEED))
def test_mutated_model_bytes_load_or_fail_typed(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(blob)
        _expect_typed(lambda: model_inputs(load_model(path)))


def _npz_seed() -> bytes:
    stream = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(stream, **{TINY_CNN_INPUT: rng.standard_normal((3, 3, 16, 16)).astype(np.float32),
                        "labels": np.arange(3)})
    return stream.getvalue()


def _npy_seed() -> bytes:
    stream = io.BytesIO()
    np.save(stream, np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
    return stream.getvalue()


_INPUTS = model_inputs(build_tiny_cnn())


@FUZZ
@given(mutated(_npz_seed()))
def test_mutated_npz_reads_or_fails_typed(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.npz"
        path.write_bytes(blob)
        _expect_typed(lambda: list(calibration_batches(path, _INPUTS, subset_size=4, batch_size=2)))
        _expect_typed(lambda: LabelledData(path, _INPUTS, LabelSpec(Loss.CROSS_ENTROPY, (None, 10))))


@FUZZ
@given(mutated(_npy_seed()))
def test_mutated_npy_reads_or_fails_typed(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "000.npy").write_bytes(blob)
        _expect_typed(lambda: list(calibration_batches(folder, _INPUTS, subset_size=4, batch_size=2)))


_YAML_SEED = b"""preset: mixed
subset_size: 64
calibration: percentile
ignored_scope:
  names: [conv1]
  patterns: ["fc.*"]
compression:
  - algorithm: quantization
    target: portable
training: {epochs: 2, batch_size: 8, learning_rate: 0.001}
anchors: &a [1, 2, *a]
"""


@FUZZ
@given(mutated(_YAML_SEED), st.sampled_from(["config.yaml", "config.json"]))
def test_mutated_configs_parse_or_fail_typed(blob: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(blob)

        def build() -> None:
            values = read_config_file(path)
            for config in (QuantizationConfig, FinetuneConfig):
                _expect_typed(lambda: config.build(values, source=name))

        _expect_typed(build)


def test_the_model_mutator_reaches_past_the_parser() -> None:
    """The corpus is not all garbage: some mutants still parse, so later checks are exercised too."""
    from hypothesis import find

    def parses(blob: bytes) -> bool:
        try:
            return onnx.ModelProto.FromString(blob).graph.node[0].op_type == "Conv" and blob != _MODEL_SEED
        except Exception:  # noqa: BLE001 - any parse failure means "no"
            return False

    assert parses(find(mutated(_MODEL_SEED), parses, settings=settings(derandomize=True, database=None)))


pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (ONNX Runtime only) package of the tiny CNN, whose manifest the test mutates."""
    from onnxcompress.packaging.build import build_package

    folder = tmp_path_factory.mktemp("fuzz-package")
    onnx.save(build_tiny_cnn(), folder / "model.onnx")
    return build_package(folder / "model.onnx", folder / "pkg", runtimes=("onnxruntime",))


@FUZZ
@given(data=st.data())
def test_mutated_package_manifests_verify_or_fail_typed(package: Path, data: st.DataObject) -> None:
    import shutil

    from onnxcompress.packaging.manifest import verify_package

    blob = data.draw(mutated((package / "manifest.json").read_bytes()))
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "pkg"
        shutil.copytree(package, copy)
        (copy / "manifest.json").write_bytes(blob)
        _expect_typed(lambda: verify_package(copy))
