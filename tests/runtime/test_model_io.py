"""Tests for onnxcompress.runtime.model_io: safe loading, atomic saving, output-path checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import ModelLoadError, OutputError, UnsafeModelError, UnsupportedModelError
from onnxcompress.runtime import model_io
from onnxcompress.runtime.model_io import (check_output_path, compressed_model_size, load_model, model_file_size,
                                           save_model)

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 16)).astype(np.float32)  # 512 bytes: stays inline
B = RNG.standard_normal(16).astype(np.float32)
BIG = RNG.standard_normal((64, 16)).astype(np.float32)  # 4 KiB: goes to external data


def make_model(opset: int = 13) -> onnx.ModelProto:
    """x[2,8] @ W + B, then @ a tensor large enough for external data."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "B"], ["y"]),
        helper.make_node("MatMul", ["y", "BIG_T"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(a, n) for a, n in ((W, "W"), (B, "B"), (BIG.T.copy(), "BIG_T"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    """A model saved with its large tensor in model.onnx.data."""
    path = save_model(make_model(), tmp_path / "model.onnx", external_data=True)
    assert (tmp_path / "model.onnx.data").is_file()
    return path


def relocate_external_data(model_path: Path, location: str) -> None:
    """Point every external tensor of the saved model at `location` (written with plain onnx)."""
    model = onnx.load(model_path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, model_path)


# ---------------------------------------------------------------------------------------------
# load_model / save_model round trips
# ---------------------------------------------------------------------------------------------


def test_round_trip_keeps_graph_and_weights(tmp_path: Path) -> None:
    model = make_model()
    saved = save_model(model, tmp_path / "model.onnx")

    assert saved == tmp_path / "model.onnx"
    assert not (tmp_path / "model.onnx.data").exists()  # small model: automatic mode stays inline
    loaded = load_model(saved)
    assert [n.op_type for n in loaded.graph.node] == ["MatMul", "Add", "MatMul"]
    assert loaded.opset_import[0].version == 13
    for name, value in weights(model).items():
        np.testing.assert_array_equal(weights(loaded)[name], value)
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run(loaded, x=x)[0], (x @ W + B) @ BIG.T, rtol=1e-5, atol=1e-5)


def test_load_caps_the_ir_version_at_10(tmp_path: Path) -> None:
    model = make_model()
    assert model.ir_version > 10  # onnx stamps its newest IR version
    assert load_model(save_model(model, tmp_path / "model.onnx")).ir_version == 10


def test_external_data_round_trip(external_model: Path, tmp_path: Path) -> None:
    on_disk = onnx.load(external_model, load_external_data=False)
    external = [t.name for t in on_disk.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external == ["BIG_T"]  # only tensors of 1 KiB and more leave the model file

    loaded = load_model(external_model)
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)
    for name, value in weights(make_model()).items():
        np.testing.assert_array_equal(weights(loaded)[name], value)
    assert model_file_size(external_model) == sum(
        (tmp_path / name).stat().st_size for name in ("model.onnx", "model.onnx.data")
    )


@pytest.mark.parametrize("name", ["plain", "location"])
def test_size_of_a_self_contained_model_is_its_file(tmp_path: Path, name: str) -> None:
    """The byte scan that skips parsing must not be fooled by weights that happen to spell the key."""
    model = make_model()
    model.graph.initializer.append(numpy_helper.from_array(np.frombuffer(name.encode() * 4, np.uint8), "bytes"))
    path = save_model(model, tmp_path / "model.onnx", external_data=False)
    assert model_file_size(path) == path.stat().st_size


def test_size_of_a_missing_model_is_a_load_error(tmp_path: Path) -> None:
    for size in (model_file_size, compressed_model_size):
        with pytest.raises(ModelLoadError, match="no such file"):
            size(tmp_path / "absent.onnx")


def test_compressed_size_is_each_file_deflated_as_zip_does(external_model: Path, tmp_path: Path) -> None:
    import zlib

    files = [external_model, tmp_path / "model.onnx.data"]
    assert compressed_model_size(external_model) == sum(len(zlib.compress(f.read_bytes(), 6)) for f in files)
    zeros = make_model()
    zeros.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.zeros_like(BIG.T), "BIG_T"))
    inline = save_model(zeros, tmp_path / "zeros.onnx", external_data=False)
    assert compressed_model_size(inline) < 0.2 * model_file_size(inline)


def test_external_round_trip_of_constant_and_sparse_tensors_is_exact(tmp_path: Path) -> None:
    constant = np.arange(1024, dtype=np.float32).reshape(256, 4)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.arange(1, 401, dtype=np.float32), "S"),
        numpy_helper.from_array(np.arange(0, 800, 2, dtype=np.int64), "S_idx"),
        [800],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(constant, "c")),
            helper.make_node("Add", ["x", "c"], ["y"]),
            helper.make_node("Identity", ["S"], ["s"]),
        ],
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 4]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [800]),
        ],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = save_model(model, tmp_path / "model.onnx", external_data=True)

    on_disk = onnx.load(path, load_external_data=False)
    assert on_disk.graph.node[0].attribute[0].t.data_location == TensorProto.EXTERNAL
    assert on_disk.graph.sparse_initializer[0].values.data_location == TensorProto.DEFAULT  # kept inline
    loaded = load_model(path)
    assert loaded.graph == model.graph
    y, s = run(loaded, x=np.ones((256, 4), np.float32))
    np.testing.assert_array_equal(y, constant + 1)
    np.testing.assert_array_equal(s[::2], np.arange(1, 401))


def test_save_does_not_mutate_the_callers_model(tmp_path: Path) -> None:
    model = make_model()
    before = model.SerializeToString()
    save_model(model, tmp_path / "model.onnx", external_data=True)
    assert model.SerializeToString() == before


def test_automatic_mode_switches_to_external_data_for_big_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_io, "_SINGLE_FILE_LIMIT", 1000)
    save_model(make_model(), tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").stat().st_size >= BIG.nbytes
    np.testing.assert_array_equal(weights(load_model(tmp_path / "model.onnx"))["BIG_T"], BIG.T)


def test_save_refuses_a_model_still_pointing_at_external_data(external_model: Path, tmp_path: Path) -> None:
    unloaded = onnx.load(external_model, load_external_data=False)
    with pytest.raises(OutputError, match="still references external data"):
        save_model(unloaded, tmp_path / "copy.onnx")


@pytest.mark.parametrize("external_data", [True, False])
def test_lazy_external_data_is_mapped_and_streamed_into_the_copy(external_model: Path, tmp_path: Path,
                                                                 external_data: bool) -> None:
    lazy = load_model(external_model, lazy_external_data=True)
    big = next(t for t in lazy.graph.initializer if t.name == "BIG_T")
    assert big.data_location == TensorProto.EXTERNAL
    mapped = model_io.external_array(big, external_model)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, BIG.T)
    (tmp_path / "copy").mkdir()
    with pytest.raises(OutputError, match="still references external data"):
        save_model(lazy, tmp_path / "copy" / "copy.onnx")
    copy = save_model(lazy, tmp_path / "copy" / "copy.onnx", external_data=external_data,
                      external_source=external_model)
    assert (tmp_path / "copy" / "copy.onnx.data").exists() == external_data
    for name, value in weights(make_model()).items():
        np.testing.assert_array_equal(weights(load_model(copy))[name], value)
    with pytest.raises(OutputError, match="would overwrite the external data it reads"):
        save_model(lazy, external_model, external_data=True, external_source=external_model)


def test_a_mapped_tensor_must_fit_its_file(external_model: Path) -> None:
    lazy = load_model(external_model, lazy_external_data=True)
    big = next(t for t in lazy.graph.initializer if t.name == "BIG_T")
    for entry in big.external_data:
        if entry.key == "offset":
            entry.value = str(1 << 20)
    if not any(entry.key == "offset" for entry in big.external_data):
        big.external_data.add(key="offset", value=str(1 << 20))
    with pytest.raises(ModelLoadError, match="does not fit"):
        model_io.external_array(big, external_model)


def test_load_leaves_files_on_disk_unchanged(tmp_path: Path) -> None:
    path = save_model(make_model(opset=9), tmp_path / "model.onnx", external_data=True)
    files = [path, tmp_path / "model.onnx.data"]
    before = digest(*files)
    loaded = load_model(path)  # converts opset 9 to 13 and lowers the IR version, in memory only
    assert digest(*files) == before
    assert (loaded.opset_import[0].version, loaded.ir_version) == (13, 10)
    np.testing.assert_array_equal(weights(loaded)["BIG_T"], BIG.T)  # external data survived the conversion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


# ---------------------------------------------------------------------------------------------
# Bad input files
# ---------------------------------------------------------------------------------------------


def serialized_model() -> bytes:
    return make_model().SerializeToString()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a valid ONNX model: the file is empty"),
        (b"\xff\xfe definitely not a protobuf \x00\x01\x02", "not a valid ONNX model"),
        (serialized_model()[: len(serialized_model()) // 2], "not a valid ONNX model: truncated or corrupt"),
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_load_rejects_files_that_are_not_onnx(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


@pytest.mark.parametrize("name", ["missing.onnx", "folder"])
def test_load_rejects_missing_files_and_folders(tmp_path: Path, name: str) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match=r"no such file: .*" + name):
        load_model(tmp_path / name)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of mode")
def test_load_rejects_unreadable_file(tmp_path: Path) -> None:
    path = save_model(make_model(), tmp_path / "model.onnx")
    path.chmod(0)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(path)


@pytest.mark.parametrize("external_data", [False, True])
def test_load_rejects_model_failing_the_checker(tmp_path: Path, external_data: bool) -> None:
    """The checker reads the bytes already loaded, or the file itself when its data lies beside it."""
    model = make_model()
    model.graph.node[1].input[0] = "undefined"
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=external_data, location="model.onnx.data", size_threshold=0)
    assert (tmp_path / "model.onnx.data").exists() == external_data
    with pytest.raises(ModelLoadError, match="fails the ONNX checker"):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# External data safety
# ---------------------------------------------------------------------------------------------


def test_missing_external_data_is_named(external_model: Path, tmp_path: Path) -> None:
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match=r"missing: no such file: .*model.onnx.data"):
        load_model(external_model)


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../outside.bin", "points outside the model folder"),
        ("sub/../../outside.bin", "points outside the model folder"),
        ("/tmp/absolute.bin", "absolute path"),
    ],
)
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, location: str, message: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "sub").mkdir()
    path = save_model(make_model(), folder / "model.onnx", external_data=True)
    (tmp_path / "outside.bin").write_bytes((folder / "model.onnx.data").read_bytes())
    relocate_external_data(path, location)
    with pytest.raises(UnsafeModelError, match=message):
        load_model(path)


def test_dot_dot_inside_the_model_folder_is_allowed(external_model: Path, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    relocate_external_data(external_model, "sub/../model.onnx.data")
    np.testing.assert_array_equal(weights(load_model(external_model))["BIG_T"], BIG.T)


@pytest.mark.parametrize("linked", ["file", "folder"])
def test_symlinked_external_data_is_refused(external_model: Path, tmp_path: Path, linked: str) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "model.onnx.data").rename(real / "model.onnx.data")
    if linked == "file":
        (tmp_path / "model.onnx.data").symlink_to(real / "model.onnx.data")
    else:
        (tmp_path / "link").symlink_to(real, target_is_directory=True)
        relocate_external_data(external_model, "link/model.onnx.data")
    with pytest.raises(UnsafeModelError, match="symlink"):
        load_model(external_model)


# ---------------------------------------------------------------------------------------------
# Opset conversion
# ---------------------------------------------------------------------------------------------


def make_opset9_model() -> onnx.ModelProto:
    """Unsqueeze and Clip take attributes in opset 9 but inputs in opset 13: the converter must rewrite them."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "B"], ["a"]),
        helper.make_node("Clip", ["a"], ["c"], min=-0.5, max=0.5),
        helper.make_node("Unsqueeze", ["c"], ["y"], axes=[0]),
    ]
    graph = helper.make_graph(
        nodes,
        "opset9",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 16])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])


def test_old_opset_is_upgraded_with_identical_results(tmp_path: Path) -> None:
    original = make_opset9_model()
    path = tmp_path / "model.onnx"
    onnx.save(original, path)

    upgraded = load_model(path)

    assert [(o.domain, o.version) for o in upgraded.opset_import] == [("", 13)]
    unsqueeze = next(n for n in upgraded.graph.node if n.op_type == "Unsqueeze")
    assert len(unsqueeze.input) == 2  # axes moved from attribute to input
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(upgraded, x=x)[0], run(original, x=x)[0])


def test_too_old_opset_that_cannot_be_converted(tmp_path: Path) -> None:
    # ImageScaler is an opset-1 experimental op without a schema or adapter in later opsets.
    graph = helper.make_graph(
        [helper.make_node("ImageScaler", ["x"], ["y"], scale=2.0)],
        "experimental",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)]), path)
    with pytest.raises(UnsupportedModelError, match=r"opset 1 is too old to upgrade to 13: .*ImageScaler"):
        load_model(path)


def test_converter_output_with_unknown_ops_is_refused(tmp_path: Path) -> None:
    # The converter passes experimental ConstantFill through unchanged although opset 13 lacks it.
    graph = helper.make_graph(
        [helper.make_node("ConstantFill", [], ["y"], shape=[2], value=1.0)],
        "passthrough",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)]), path)
    with pytest.raises(UnsupportedModelError, match="op ConstantFill does not exist in opset 13"):
        load_model(path)


def test_new_opset_is_converted_down(tmp_path: Path) -> None:
    path = save_model(make_model(opset=21), tmp_path / "model.onnx")
    assert load_model(path, target_opset_max=17).opset_import[0].version == 17


def test_new_opset_that_cannot_be_converted_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    path = save_model(make_model(opset=21), tmp_path / "model.onnx")
    with pytest.raises(UnsupportedModelError, match="opset 21 is too new to convert down to 17: no adapter"):
        load_model(path, target_opset_max=17)


def test_the_converter_never_sees_large_tables_and_both_models_keep_them(monkeypatch: pytest.MonkeyPatch) -> None:
    table = RNG.standard_normal((512, 1024)).astype(np.float32)  # 2 MB: set aside
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
                              [numpy_helper.from_array(table, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    convert = onnx.version_converter.convert_version
    seen = []

    def spy(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
        seen.append(proto.ByteSize())
        return convert(proto, target)

    monkeypatch.setattr(onnx.version_converter, "convert_version", spy)
    upgraded = model_io.upgrade_opset(model, 21)
    assert seen[0] < 10_000 and upgraded.opset_import[0].version == 21
    np.testing.assert_array_equal(numpy_helper.to_array(upgraded.graph.initializer[0]), table)
    assert model.SerializeToString() == before

    def refuse(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    with pytest.raises(UnsupportedModelError, match="no adapter"):
        model_io.upgrade_opset(model, 21)
    assert model.SerializeToString() == before


# ---------------------------------------------------------------------------------------------
# Output paths and failed saves
# ---------------------------------------------------------------------------------------------


def test_save_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"cannot write .*model.onnx: folder .*missing does not exist"):
        save_model(make_model(), tmp_path / "missing" / "model.onnx")


def test_save_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match=r"cannot write .*model.onnx: .*file is not a folder"):
        save_model(make_model(), tmp_path / "file" / "model.onnx")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes regardless of mode")
def test_save_into_unwritable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(OutputError, match="not writable"):
        save_model(make_model(), folder / "model.onnx")


def test_save_into_folder_without_write_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too, where chmod cannot take the permission away.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match=r"cannot write .*model.onnx: folder .* is not writable"):
        save_model(make_model(), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("external_data", [False, True])
@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_save_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, external_data: bool
) -> None:
    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OutputError, match=r"cannot write .*No space left"):
        save_model(make_model(), tmp_path / "model.onnx", external_data=external_data)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_model(make_model(), tmp_path / "model.onnx")
    before = digest(path)

    def fail(*args: object) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError):
        save_model(make_model(opset=14), path)
    assert digest(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_saved_file_has_normal_permissions(tmp_path: Path) -> None:
    path = save_model(make_model(), tmp_path / "model.onnx")
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_check_output_path_accepts_a_new_file(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "in.onnx", tmp_path / "out.onnx") == (tmp_path / "out.onnx").resolve()


@pytest.mark.parametrize("spelling", ["model.onnx", "./x/../model.onnx", "link.onnx"])
def test_check_output_path_refuses_the_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str) -> None:
    save_model(make_model(), tmp_path / "model.onnx")
    (tmp_path / "x").mkdir()
    (tmp_path / "link.onnx").symlink_to(tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="output path is the input model"):
        check_output_path(tmp_path / "model.onnx", spelling)


def test_check_output_path_refuses_a_hard_link_to_the_input(tmp_path: Path) -> None:
    path = save_model(make_model(), tmp_path / "model.onnx")
    os.link(path, tmp_path / "hard.onnx")
    with pytest.raises(OutputError, match="output path is the input model"):
        check_output_path(path, tmp_path / "hard.onnx")


@pytest.mark.parametrize("output", ["missing/out.onnx", "file/out.onnx", "folder"])
def test_check_output_path_refuses_unwritable_destinations(tmp_path: Path, output: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match="cannot write"):
        check_output_path(tmp_path / "model.onnx", tmp_path / output)


def test_runtime_source_hands_runtimes_the_checked_bytes_not_the_path(tmp_path):
    """External data swapped after the check cannot redirect what ONNX Runtime reads."""
    import onnxruntime as ort
    from conftest import build_tiny_cnn

    from onnxcompress.runtime.model_io import runtime_source

    path = tmp_path / "model.onnx"
    onnx.save_model(build_tiny_cnn(), path, save_as_external_data=True, location="w.data", size_threshold=0)
    feed = {"x": np.ones((1, 3, 16, 16), np.float32)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with runtime_source(path) as source:
        (tmp_path / "w.data").write_bytes(bytes((tmp_path / "w.data").stat().st_size))  # all weights now zero
        assert isinstance(source.readable, bytes)
        got = ort.InferenceSession(source.readable, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(got, expected)
    swapped = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert not np.array_equal(swapped, expected)  # the swap is real: reading the path again sees it


def test_stored_bytes_count_4_bit_values_two_per_byte() -> None:
    import ml_dtypes

    assert model_io.stored_bytes(numpy_helper.from_array(np.zeros(5, ml_dtypes.int4), "q")) == 3
    assert model_io.stored_bytes(numpy_helper.from_array(np.zeros((2, 3), np.float32), "w")) == 24
