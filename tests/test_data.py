"""Unit tests for onnxcompress.data: calibration sources, validation, subset limiting and batching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_CNN_NODE_NAMES, build_tiny_cnn, make_calib_npz
from onnx import TensorProto, helper

from onnxcompress.data import (InputSpec, calibration_batches, count_samples, feeds_from, model_inputs,
                               validate_feed)
from onnxcompress.errors import DatasetError, OnnxCompressError

F32 = np.dtype(np.float32)
RNG = np.random.default_rng(42)


@pytest.fixture(scope="module")
def inputs() -> list[InputSpec]:
    """The tiny CNN's only input: x float32 [?, 3, 16, 16]."""
    return model_inputs(build_tiny_cnn())


@pytest.fixture(scope="module")
def spatial_inputs() -> list[InputSpec]:
    """x float32 [?, 3, ?, ?]."""
    return model_inputs(build_tiny_cnn(dynamic_spatial=True))


STATIC = [InputSpec("x", F32, (1, 3, 16, 16))]
TWO_INPUTS = [InputSpec("ids", np.dtype(np.int64), (None, 4)), InputSpec("mask", F32, (None, 4))]


def sample(n: int = 1, h: int = 16, w: int = 16) -> np.ndarray:
    return RNG.standard_normal((n, 3, h, w)).astype(np.float32)


def batches(source: Any, specs: list[InputSpec], subset_size: int = 300, batch_size: int = 8) -> list[dict]:
    return list(calibration_batches(source, specs, subset_size=subset_size, batch_size=batch_size))


def sizes(feeds: list[dict], name: str = "x") -> list[int]:
    return [feed[name].shape[0] for feed in feeds]


class Reader:
    """Like onnxruntime.quantization.CalibrationDataReader: get_next() returns a dict, then None."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = list(feeds)
        self.calls = 0

    def get_next(self) -> dict | None:
        self.calls += 1
        return self.feeds.pop(0) if self.feeds else None


# ---------------------------------------------------------------------------------------------
# Model inputs
# ---------------------------------------------------------------------------------------------


def test_model_inputs_of_the_tiny_cnn(inputs: list[InputSpec]) -> None:
    assert inputs == [InputSpec("x", F32, (None, 3, 16, 16))]
    assert inputs[0].dynamic_batch
    assert inputs[0].describe_shape() == "[?, 3, 16, 16]"
    assert not STATIC[0].dynamic_batch


def test_model_inputs_skip_initializers_listed_as_inputs() -> None:
    model = build_tiny_cnn()
    weight = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 7])
    model.graph.input.append(ids)
    assert [(i.name, i.dtype, i.shape) for i in model_inputs(model)] == [
        ("x", F32, (None, 3, 16, 16)), ("ids", np.dtype(np.int64), (None, 7))]


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def test_npz_yields_one_feed_per_sample_as_a_batch_of_one(tmp_path: Path, inputs: list[InputSpec]) -> None:
    path = make_calib_npz(tmp_path / "calib.npz", samples=5)
    data = np.load(path)["x"]
    feeds = list(feeds_from(path, inputs))
    assert len(feeds) == 5
    for index, feed in enumerate(feeds):
        assert list(feed) == ["x"]
        assert feed["x"].shape == (1, 3, 16, 16) and feed["x"].dtype == np.float32
        np.testing.assert_array_equal(feed["x"], data[index:index + 1])


def test_npz_samples_are_read_on_demand_not_mapped(tmp_path: Path, inputs: list[InputSpec]) -> None:
    # A memory map would keep every page it touched resident: memory would grow with the samples fed.
    path = make_calib_npz(tmp_path / "calib.npz", samples=3)
    fortran = tmp_path / "fortran.npz"
    np.savez(fortran, x=np.asfortranarray(np.load(path)["x"]))
    for feed in feeds_from(path, inputs):
        assert not isinstance(feed["x"], np.memmap) and feed["x"].base is None
    # Fortran-ordered members cannot be read row by row: they are loaded whole.
    assert [f["x"].shape for f in feeds_from(fortran, inputs)] == [(1, 3, 16, 16)] * 3


def test_npz_with_several_inputs_slices_each_array(tmp_path: Path) -> None:
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    mask = np.ones((3, 4), np.float32) * np.arange(3, dtype=np.float32)[:, None]
    np.savez(tmp_path / "calib.npz", ids=ids, mask=mask)
    feeds = batches(str(tmp_path / "calib.npz"), TWO_INPUTS, batch_size=1)
    assert len(feeds) == 3
    for index, feed in enumerate(feeds):
        np.testing.assert_array_equal(feed["ids"], ids[index:index + 1])
        np.testing.assert_array_equal(feed["mask"], mask[index:index + 1])


def test_npy_folder_yields_whole_files_in_name_order(tmp_path: Path, inputs: list[InputSpec]) -> None:
    second, first = sample(2), sample(3)
    np.save(tmp_path / "b.npy", second)
    np.save(tmp_path / "a.npy", first)
    (tmp_path / "notes.txt").write_text("ignored")
    feeds = list(feeds_from(tmp_path, inputs))
    assert [list(f) for f in feeds] == [["x"], ["x"]]
    np.testing.assert_array_equal(feeds[0]["x"], first)
    np.testing.assert_array_equal(feeds[1]["x"], second)
    # Whole files stay whole when they are not merged (batch_size 1).
    assert sizes(batches(str(tmp_path), inputs, batch_size=1)) == [3, 2]


def test_iterable_of_dicts(inputs: list[InputSpec]) -> None:
    data = [{"x": sample()} for _ in range(3)]
    feeds = batches(data, inputs, batch_size=1)
    assert len(feeds) == 3
    for feed, original in zip(feeds, data):
        np.testing.assert_array_equal(feed["x"], original["x"])
    # A one-shot generator works as well.
    assert sizes(batches((d for d in data), inputs, batch_size=1)) == [1, 1, 1]


def test_calibration_data_reader(inputs: list[InputSpec]) -> None:
    data = [{"x": sample()} for _ in range(4)]
    reader = Reader(data)
    feeds = batches(reader, inputs, batch_size=1)
    assert len(feeds) == 4
    for feed, original in zip(feeds, data):
        np.testing.assert_array_equal(feed["x"], original["x"])
    assert reader.calls == 5  # four feeds, then the None that ends the stream


def test_lists_of_values_are_converted_to_arrays() -> None:
    feed = validate_feed({"ids": [[1, 2, 3, 4]], "mask": np.ones((1, 4), np.float32)}, TWO_INPUTS, 0)
    assert isinstance(feed["ids"], np.ndarray) and feed["ids"].dtype == np.int64


# ---------------------------------------------------------------------------------------------
# subset_size counts samples
# ---------------------------------------------------------------------------------------------


def test_subset_size_limits_npz_samples(tmp_path: Path, inputs: list[InputSpec]) -> None:
    path = make_calib_npz(tmp_path / "calib.npz", samples=20)
    assert sizes(batches(path, inputs, subset_size=7, batch_size=1)) == [1] * 7
    merged = batches(path, inputs, subset_size=7, batch_size=8)
    assert sizes(merged) == [7]
    np.testing.assert_array_equal(merged[0]["x"], np.load(path)["x"][:7])


def test_subset_size_counts_samples_not_feeds(inputs: list[InputSpec]) -> None:
    data = [{"x": sample(4)} for _ in range(5)]
    # 8 samples = two feeds of 4, not 8 feeds.
    assert sizes(batches(data, inputs, subset_size=8, batch_size=1)) == [4, 4]
    # A feed that would overshoot the subset is left out whole (feeds are never cut).
    assert sizes(batches(data, inputs, subset_size=10, batch_size=1)) == [4, 4]
    # ... except the first one: calibration never runs on nothing.
    assert sizes(batches(data, inputs, subset_size=2, batch_size=1)) == [4]


def test_subset_size_stops_reading_the_source(inputs: list[InputSpec]) -> None:
    reader = Reader([{"x": sample()} for _ in range(10)])
    assert sizes(batches(reader, inputs, subset_size=3, batch_size=1)) == [1, 1, 1]
    assert reader.calls == 3 and len(reader.feeds) == 7


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def test_batching_merges_consecutive_feeds_up_to_batch_size(tmp_path: Path, inputs: list[InputSpec]) -> None:
    path = make_calib_npz(tmp_path / "calib.npz", samples=20)
    feeds = batches(path, inputs, batch_size=8)
    assert sizes(feeds) == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), np.load(path)["x"])


def test_batching_respects_batch_size_with_multi_sample_feeds(inputs: list[InputSpec]) -> None:
    data = [{"x": sample(3)} for _ in range(5)]
    feeds = batches(data, inputs, batch_size=7)
    assert sizes(feeds) == [6, 6, 3]
    np.testing.assert_array_equal(feeds[0]["x"], np.concatenate([data[0]["x"], data[1]["x"]]))
    # A feed larger than batch_size is passed on whole.
    assert sizes(batches([{"x": sample(5)}, {"x": sample(1)}], inputs, batch_size=4)) == [5, 1]


def test_no_batching_when_the_model_batch_dimension_is_static() -> None:
    data = [{"x": sample()} for _ in range(5)]
    assert sizes(batches(data, STATIC, batch_size=8)) == [1] * 5


def test_no_batching_when_any_input_has_a_static_batch_dimension() -> None:
    specs = [InputSpec("ids", np.dtype(np.int64), (None, 4)), InputSpec("mask", F32, (1, 4))]
    data = [{"ids": np.zeros((1, 4), np.int64), "mask": np.zeros((1, 4), np.float32)} for _ in range(3)]
    assert sizes(batches(data, specs, batch_size=8), "ids") == [1, 1, 1]


def test_batch_size_one_never_merges(inputs: list[InputSpec]) -> None:
    assert sizes(batches([{"x": sample()} for _ in range(3)], inputs, batch_size=1)) == [1, 1, 1]


def test_different_spatial_shapes_are_not_merged(spatial_inputs: list[InputSpec]) -> None:
    data = [{"x": sample(1, 16, 16)}, {"x": sample(1, 16, 16)}, {"x": sample(1, 8, 8)},
            {"x": sample(1, 16, 16)}, {"x": sample(1, 16, 12)}, {"x": sample(1, 16, 12)}]
    feeds = batches(data, spatial_inputs, batch_size=8)
    assert [f["x"].shape for f in feeds] == [(2, 3, 16, 16), (1, 3, 8, 8), (1, 3, 16, 16), (2, 3, 16, 12)]
    np.testing.assert_array_equal(feeds[0]["x"], np.concatenate([data[0]["x"], data[1]["x"]]))


def test_several_inputs_are_merged_together() -> None:
    data = [{"ids": np.full((1, 4), i, np.int64), "mask": np.full((1, 4), i, np.float32)} for i in range(3)]
    (feed,) = batches(data, TWO_INPUTS, batch_size=8)
    np.testing.assert_array_equal(feed["ids"][:, 0], [0, 1, 2])
    np.testing.assert_array_equal(feed["mask"][:, 0], [0, 1, 2])


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------


def _write_npy_folder(tmp: Path) -> Path:
    folder = tmp / "feeds"
    folder.mkdir()
    np.save(folder / "0.npy", sample(2))
    return folder


def _write_npz(tmp: Path, **arrays: np.ndarray) -> Path:
    np.savez(tmp / "calib.npz", **arrays)
    return tmp / "calib.npz"


def _single_npy_file(tmp: Path) -> Path:
    np.save(tmp / "one.npy", sample())
    return tmp / "one.npy"


def _folder_with_corrupt_npy(tmp: Path) -> Path:
    folder = _write_npy_folder(tmp)
    (folder / "1.npy").write_bytes(b"garbage")
    return folder


def _folder_with_wrong_shape_npy(tmp: Path) -> Path:
    folder = _write_npy_folder(tmp)
    np.save(folder / "1.npy", sample(2, 8, 8))
    return folder


BAD_SOURCES = {
    "unknown-input": (lambda tmp: [{"x": sample(), "y": sample()}], r"sample 0: unknown input\(s\) 'y' "
                      r"\(model inputs: x\)"),
    "missing-input": (lambda tmp: [{"image": sample()}], r"unknown input\(s\) 'image'; missing input\(s\) 'x'"),
    "wrong-dtype": (lambda tmp: [{"x": sample()}, {"x": sample().astype(np.float64)}],
                    r"sample 1: input 'x' has dtype float64, the model expects float32"),
    "wrong-rank": (lambda tmp: [{"x": np.zeros((3, 16, 16), np.float32)}],
                   r"sample 0: input 'x' has shape \[3, 16, 16\], the model expects \[\?, 3, 16, 16\]"),
    "wrong-static-dim": (lambda tmp: [{"x": sample(1, 16, 15)}],
                         r"has shape \[1, 3, 16, 15\], the model expects \[\?, 3, 16, 16\]"),
    "not-a-dict": (lambda tmp: [[sample()]], r"sample 0 is a list, expected a dict"),
    "single-dict": (lambda tmp: {"x": sample()}, r"single dict; pass a list of input dicts"),
    "unsupported-type": (lambda tmp: 42, r"unsupported calibration data of type int"),
    "missing-path": (lambda tmp: tmp / "nothere.npz", r"calibration data not found: .*nothere\.npz"),
    "single-npy-file": (_single_npy_file,
                        r"must be a folder of \.npy files or an \.npz file, got .*one\.npy"),
    "empty-folder": (lambda tmp: tmp, r"no \.npy files in calibration folder"),
    "empty-list": (lambda tmp: [], r"^\[data\] the calibration dataset is empty$"),
    "empty-reader": (lambda tmp: Reader([]), r"the calibration dataset is empty"),
    "empty-npz": (lambda tmp: _write_npz(tmp, x=np.zeros((0, 3, 16, 16), np.float32)),
                  r"the calibration dataset is empty"),
    "npz-without-arrays": (lambda tmp: _write_npz(tmp), r"the calibration dataset is empty"),
    "npz-sample-counts-disagree": (lambda tmp: _write_npz(tmp, x=sample(3), y=sample(2)),
                                   r"disagree on the number of samples \(axis 0\): \{'x': 3, 'y': 2\}"),
    "npz-wrong-name": (lambda tmp: make_calib_npz(tmp / "calib.npz", name="image"),
                       r"unknown input\(s\) 'image'; missing input\(s\) 'x'"),
    "corrupt-npy": (_folder_with_corrupt_npy, r"cannot read .*1\.npy"),
    "npy-wrong-shape": (_folder_with_wrong_shape_npy, r"sample 1: input 'x' has shape \[2, 3, 8, 8\]"),
}


@pytest.mark.parametrize(("make_source", "message"), BAD_SOURCES.values(), ids=BAD_SOURCES.keys())
def test_bad_sources_raise_dataset_error(tmp_path: Path, inputs: list[InputSpec], make_source, message: str) -> None:
    source = make_source(tmp_path)
    with pytest.raises(DatasetError, match=message) as caught:
        batches(source, inputs)
    assert str(caught.value).startswith("[data] ")
    assert isinstance(caught.value, OnnxCompressError)


def test_npy_folder_refuses_models_with_several_inputs(tmp_path: Path) -> None:
    folder = _write_npy_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"single-input models; this model has inputs ids, mask"):
        batches(folder, TWO_INPUTS)


def test_a_bad_sample_after_good_ones_is_reported_with_its_index(inputs: list[InputSpec]) -> None:
    data = [{"x": sample()}, {"x": sample()}, {"x": sample()}, {"x": sample(1, 8, 8)}]
    with pytest.raises(DatasetError, match=r"^\[data\] sample 3: input 'x' has shape \[1, 3, 8, 8\]"):
        batches(data, inputs, batch_size=1)
    # ... unless subset_size stops before it.
    assert sizes(batches(data, inputs, subset_size=3, batch_size=8)) == [3]


# ---------------------------------------------------------------------------------------------
# count_samples (progress bar totals)
# ---------------------------------------------------------------------------------------------


def test_count_samples_of_npz_and_lists(tmp_path: Path, inputs: list[InputSpec]) -> None:
    path = make_calib_npz(tmp_path / "calib.npz", samples=20)
    assert count_samples(path, inputs, 300) == 20
    assert count_samples(str(path), inputs, 7) == 7
    assert count_samples([{"x": sample()}] * 5, inputs, 300) == 5
    assert count_samples((d for d in [{"x": sample()}]), inputs, 300) is None
    assert count_samples(Reader([]), inputs, 300) is None


def test_count_samples_of_a_folder_given_as_str(tmp_path: Path, inputs: list[InputSpec]) -> None:
    folder = tmp_path / "feeds"
    folder.mkdir()
    for index in range(2):
        np.save(folder / f"{index}.npy", sample(1))
    assert count_samples(str(folder), inputs, 300) in (None, 2)


def test_count_samples_counts_samples_of_batched_feeds(inputs: list[InputSpec]) -> None:
    data = [{"x": sample(4)} for _ in range(3)]
    assert sum(sizes(batches(data, inputs))) == 12
    assert count_samples(data, inputs, 300) in (None, 12)


@pytest.mark.parametrize("content", ["scalar", "corrupt"])
def test_count_samples_of_bad_npz_is_unknown(tmp_path: Path, inputs: list[InputSpec], content: str) -> None:
    # Counting only feeds the progress bar; reading the data for calibration raises the DatasetError.
    path = tmp_path / "calib.npz"
    if content == "scalar":
        np.savez(path, x=np.float32(1.0))
    else:
        path.write_text("not a zip archive")
    assert count_samples(path, inputs, 300) is None


def test_bad_npz_is_a_dataset_error_when_read_for_calibration(tmp_path: Path, inputs: list[InputSpec]) -> None:
    path = tmp_path / "calib.npz"
    path.write_text("not a zip archive")
    with pytest.raises(DatasetError, match=r"cannot read .*calib\.npz"):
        batches(path, inputs)
    np.savez(path, x=np.float32(1.0))
    with pytest.raises(DatasetError, match="the calibration dataset is empty"):
        batches(path, inputs)


def test_tiny_cnn_fixture_shapes() -> None:
    # The batching tests rely on these: batch dynamic only, or batch and spatial dimensions dynamic.
    dims = build_tiny_cnn().graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, 16, 16]
    dims = build_tiny_cnn(dynamic_spatial=True).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]
    model = build_tiny_cnn()
    assert tuple(n.name for n in model.graph.node) == TINY_CNN_NODE_NAMES
    assert (model.ir_version, model.opset_import[0].version) == (8, 17)
