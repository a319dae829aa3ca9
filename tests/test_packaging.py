"""Deployment packages (issue 12): layout, manifest, serving configs, verified loading, atomic writes, bad input."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn, save_tiny_cnn_models
from onnx import helper
from test_cli_errors import run_cli, snapshot

from onnxcompress.errors import DatasetError, PackageError
from onnxcompress.packaging.build import build_package
from onnxcompress.packaging.manifest import verify_package
from onnxcompress.packaging.predictor import load_package


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("packaging")
    models = save_tiny_cnn_models(folder)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 3, 16, 16)).astype(np.float32)
    np.savez(folder / "eval.npz", **{TINY_CNN_INPUT: x}, labels=np.arange(12) % 10)
    np.savez(folder / "in.npz", **{TINY_CNN_INPUT: x[:4]})
    package = build_package(models["int8"], folder / "pkg", name="tiny", reference=models["fp32"],
                            data=folder / "eval.npz")
    return {**models, "package": package, "folder": folder}


def test_the_layout_is_what_model_server_and_triton_serve(built: dict[str, Path]) -> None:
    package = built["package"]
    files = sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file())
    assert files == ["README.md", "before_after.png", "manifest.json", "openvino/tiny/1/model.bin",
                     "openvino/tiny/1/model.xml", "triton/tiny/1/model.onnx", "triton/tiny/config.pbtxt"]
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["serving"] == {"openvino_model_server": "openvino/tiny", "triton_model_repository": "triton"}
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    assert manifest["onnx_model"] == "triton/tiny/1/model.onnx"
    assert manifest["openvino_ir"] == "openvino/tiny/1/model.xml"


def test_config_pbtxt_matches_the_models_real_signature(built: dict[str, Path]) -> None:
    text = (built["package"] / "triton" / "tiny" / "config.pbtxt").read_text()
    assert re.search(r'^name: "tiny"$', text, re.M) and re.search(r'^backend: "onnxruntime"$', text, re.M)
    assert re.search(r"^max_batch_size: 0$", text, re.M)  # so dims are the model's own, batch included
    model = onnx.load(built["int8"])
    blocks = dict(re.findall(r"^(input|output) \[\n(.*?)\n\]", text, re.M | re.S))
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        entries = re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[ ([^\]]*) \]', blocks[kind])
        expected = [(v.name, "TYPE_FP32", ", ".join(str(d.dim_value) if d.HasField("dim_value") else "-1"
                                                    for d in v.type.tensor_type.shape.dim)) for v in values]
        assert entries == expected
    assert "kind: KIND_CPU" in text


def test_manifest_records_signature_settings_runtimes_and_sources(built: dict[str, Path]) -> None:
    manifest = verify_package(built["package"])
    assert [(s.name, s.dtype, s.shape) for s in manifest.inputs] == [("x", "float32", ("N", 3, 16, 16))]
    assert [(s.name, s.dtype, s.shape) for s in manifest.outputs] == [("logits", "float32", ("N", 10))]
    assert manifest.compression and manifest.compression[0]["algorithm"] == "quantization"
    assert manifest.runtimes["onnxruntime"].int8_layers == manifest.runtimes["onnxruntime"].heavy_layers == 3
    assert manifest.runtimes["openvino"].int8_layers == 3
    assert manifest.safe_without_vnni
    import hashlib

    assert manifest.source_sha256 == hashlib.sha256(built["int8"].read_bytes()).hexdigest()
    assert {"onnxcompress", "onnxruntime", "openvino", "onnx"} <= set(manifest.versions)
    card = (built["package"] / "README.md").read_text()
    assert "| top-1 (12 samples) |" in card and "| file size (MB) |" in card and "latency ONNX Runtime" in card
    assert re.search(r"^\| zip-compressed size \(MB\) \| \d+\.\d\d \| \d+\.\d\d \|$", card, re.M)
    assert "before_after.png" in card


def test_the_card_gives_the_zip_size_in_which_sparsity_pays(tmp_path: Path) -> None:
    """Raw size cannot tell a sparse model from a dense one; the zip-compressed size, what a download costs, can."""
    from onnxcompress.packaging.card import measure_card
    from onnxcompress.runtime.model_io import compressed_model_size

    rng = np.random.default_rng(0)
    dense = rng.standard_normal((256, 256)).astype(np.float32)
    sparse = np.where(rng.random(dense.shape) < 0.9, 0, dense).astype(np.float32)
    paths = {}
    for name, weight in (("dense", dense), ("sparse", sparse)):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], name,
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 256])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 256])],
            [onnx.numpy_helper.from_array(weight, "w")])
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths[name])
    card = measure_card(onnx.load(paths["sparse"]), paths["sparse"], ("onnxruntime",), reference=paths["dense"],
                        data=None, folder=tmp_path)
    assert card.size_bytes["packaged"] == pytest.approx(card.size_bytes["reference"], rel=0.01)
    assert card.compressed_bytes == {who: compressed_model_size(paths[name])
                                     for who, name in (("packaged", "sparse"), ("reference", "dense"))}
    assert card.compressed_bytes["packaged"] < 0.3 * card.size_bytes["packaged"]
    assert card.compressed_bytes["reference"] > 0.8 * card.size_bytes["reference"]
    text = card.render("sparse", {}, "safe")
    for label, sizes in (("file size", card.size_bytes), ("zip-compressed size", card.compressed_bytes)):
        assert f"| {label} (MB) | {sizes['reference'] / 1e6:.2f} | {sizes['packaged'] / 1e6:.2f} |" in text
    assert (tmp_path / "before_after.png").read_bytes()[:4] == b"\x89PNG"


def test_run_in_a_fresh_process_equals_the_direct_run_of_the_packaged_files(built: dict[str, Path]) -> None:
    folder, package = built["folder"], built["package"]
    feed = dict(np.load(folder / "in.npz"))
    direct_ort = ort.InferenceSession(str(package / "triton/tiny/1/model.onnx"),
                                      providers=["CPUExecutionProvider"]).run(None, feed)[0]
    compiled = ov.Core().compile_model(str(package / "openvino/tiny/1/model.xml"), "CPU")
    direct_ov = [compiled(feed)[compiled.outputs[0]] for _ in range(2)]
    for runtime in ("onnxruntime", "openvino"):
        result = run_cli(folder, "run", "pkg", "--input", "in.npz", "-o", f"out-{runtime}.npz", "--runtime", runtime)
        assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(folder / "out-onnxruntime.npz")["logits"], direct_ort)
    tolerance = float(np.abs(direct_ov[0] - direct_ov[1]).max())  # OpenVINO's own run-to-run difference
    assert float(np.abs(np.load(folder / "out-openvino.npz")["logits"] - direct_ov[0]).max()) <= tolerance + 1e-6


def test_load_package_is_a_callable_predictor(built: dict[str, Path]) -> None:
    import onnxcompress

    predictor = onnxcompress.load_package(built["package"], runtime="onnxruntime")
    x = np.load(built["folder"] / "in.npz")[TINY_CNN_INPUT]
    assert predictor({"x": x})["logits"].shape == (4, 10)
    with pytest.raises(DatasetError, match="unknown \\['image'\\], missing \\['x'\\]"):
        predictor({"image": x})
    with pytest.raises(DatasetError, match="is float64, the package takes float32"):
        predictor({"x": x.astype(np.float64)})
    with pytest.raises(DatasetError, match=r"shape \[4, 3, 8, 8\], the package takes \[\?, 3, 16, 16\]"):
        predictor({"x": x[:, :, :8, :8]})


def _copy(package: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(package, to, symlinks=True)
    return to


FILES = ["README.md", "before_after.png", "openvino/tiny/1/model.bin", "openvino/tiny/1/model.xml",
         "triton/tiny/1/model.onnx", "triton/tiny/config.pbtxt"]


@pytest.mark.parametrize("name", FILES)
def test_a_changed_byte_in_any_file_is_refused_naming_it(built: dict[str, Path], tmp_path: Path, name: str) -> None:
    package = _copy(built["package"], tmp_path / "pkg")
    data = bytearray((package / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (package / name).write_bytes(bytes(data))
    with pytest.raises(PackageError, match=f"package file {re.escape(name)} was changed"):
        load_package(package)


def _edit_manifest(package: Path, edit) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    edit(manifest)
    (package / "manifest.json").write_text(json.dumps(manifest))


BROKEN = {
    "missing-file": (lambda p: (p / "README.md").unlink(), "package file README.md is missing"),
    "extra-file": (lambda p: (p / "notes.txt").write_text("x"), "does not list: notes.txt"),
    "unknown-version": (lambda p: _edit_manifest(p, lambda m: m.update(format_version=99)),
                        "manifest format version 99"),
    "malformed-manifest": (lambda p: (p / "manifest.json").write_text("{not json"), "is not valid JSON"),
    "manifest-wrong-field": (lambda p: _edit_manifest(p, lambda m: m.update(inputs="x")), "is malformed"),
    "file-outside": (lambda p: _edit_manifest(p, lambda m: m["files"].update({"../secret": "0" * 64})),
                     "lists a file outside the package: '../secret'"),
    "absolute-file": (lambda p: _edit_manifest(p, lambda m: m["files"].update({"/etc/passwd": "0" * 64})),
                      "outside the package"),
    "symlinked-file": (lambda p: ((p / "README.md").unlink(), (p / "README.md").symlink_to(p / "manifest.json")),
                       "README.md goes through a symlink"),
    "no-manifest": (lambda p: (p / "manifest.json").unlink(), "has no manifest.json"),
}


@pytest.mark.parametrize(("break_it", "message"), [pytest.param(*case, id=k) for k, case in BROKEN.items()])
def test_broken_packages_are_refused_before_any_model_is_read(built: dict[str, Path], tmp_path: Path, break_it,
                                                              message: str) -> None:
    package = _copy(built["package"], tmp_path / "pkg")
    break_it(package)
    (tmp_path / "secret").write_text("never read")
    result = run_cli(tmp_path, "run", "pkg", "--input", str(built["folder"] / "in.npz"), "-o", "out.npz")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: [package] ") and message in result.stderr, result.stderr
    assert not (tmp_path / "out.npz").exists()


def test_run_refuses_inputs_that_do_not_match(built: dict[str, Path], tmp_path: Path) -> None:
    np.savez(tmp_path / "wrong.npz", x=np.zeros((1, 3, 16, 16), np.float64))
    result = run_cli(tmp_path, "run", str(built["package"]), "--input", "wrong.npz", "-o", "out.npz")
    assert result.returncode == 2 and "error: [data] input 'x' is float64, the package takes float32" in result.stderr


def test_an_existing_folder_that_is_not_a_package_is_never_replaced(built: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    with pytest.raises(PackageError, match="exists and is not a package"):
        build_package(built["int8"], tmp_path / "pkg", runtimes=("onnxruntime",))
    assert snapshot(tmp_path) == before


def test_an_existing_package_is_replaced_whole(built: dict[str, Path], tmp_path: Path) -> None:
    package = _copy(built["package"], tmp_path / "pkg")
    build_package(built["fp32"], package, name="plain", runtimes=("onnxruntime",))
    manifest = verify_package(package)
    assert manifest.name == "plain" and manifest.compression == () and manifest.openvino_ir is None
    assert not (package / "openvino").exists() and [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_a_runtime_that_cannot_compile_the_model_is_named(tmp_path: Path) -> None:
    model = build_tiny_cnn()
    model.graph.node[2].op_type, model.graph.node[2].domain = "MyRelu", "example.custom"
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    onnx.save(model, tmp_path / "custom.onnx")
    with pytest.raises(PackageError, match="does not compile in onnxruntime.*--runtimes openvino"):
        build_package(tmp_path / "custom.onnx", tmp_path / "pkg")
    assert [p.name for p in tmp_path.iterdir()] == ["custom.onnx"]


def test_killing_the_package_step_never_leaves_a_complete_looking_folder(built: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """SIGKILL at several moments: the destination is absent or a package that verifies; only a hidden staging
    folder (without a manifest, or not yet renamed) may be left beside it."""
    args = [sys.executable, "-m", "onnxcompress.cli", "package", str(built["int8"]), "-o", "pkg",
            "--reference", str(built["fp32"]), "--data", str(built["folder"] / "eval.npz")]
    for delay in (1.0, 2.0, 3.0, 4.5, 6.0):
        process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        if (tmp_path / "pkg").exists():
            verify_package(tmp_path / "pkg")
        assert all(p.name == "pkg" or p.name.startswith(".pkg.") for p in tmp_path.iterdir())


def _tfidf_model(path: Path) -> Path:
    """An op ONNX Runtime runs and OpenVINO cannot compile."""
    from onnx import TensorProto

    node = helper.make_node("TfIdfVectorizer", ["x"], ["y"], mode="TF", min_gram_length=1, max_gram_length=1,
                            max_skip_count=0, ngram_counts=[0], ngram_indexes=[0, 1], pool_int64s=[2, 3])
    graph = helper.make_graph([node], "tfidf", [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_a_runtime_the_model_cannot_run_in_is_named_and_can_be_left_out(tmp_path: Path) -> None:
    _tfidf_model(tmp_path / "tfidf.onnx")
    before = snapshot(tmp_path)
    refused = run_cli(tmp_path, "package", "tfidf.onnx", "-o", "pkg")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "error: [package] the model does not compile in openvino" in refused.stderr
    assert "--runtimes onnxruntime" in refused.stderr and snapshot(tmp_path) == before
    made = run_cli(tmp_path, "package", "tfidf.onnx", "-o", "pkg", "--runtimes", "onnxruntime")
    assert made.returncode == 0, made.stderr
    manifest = verify_package(tmp_path / "pkg")
    assert set(manifest.runtimes) == {"onnxruntime"} and manifest.openvino_ir is None
    predictor = load_package(tmp_path / "pkg", runtime="onnxruntime")
    np.testing.assert_array_equal(predictor({"x": np.array([[1, 2, 3, 2, 3, 4]], np.int64)})["y"], [[2.0, 2.0]])
    with pytest.raises(PackageError, match="has no OpenVINO IR"):
        load_package(tmp_path / "pkg", runtime="openvino")


@pytest.mark.parametrize(("extra", "prepare", "message"), [
    pytest.param(["--runtimes", "tensorrt"], None, "--runtimes takes onnxruntime, openvino; got tensorrt",
                 id="unknown-runtime"),
    pytest.param(["--name", "../up"], None, "invalid model name '../up'", id="bad-name"),
    pytest.param([], lambda t: ((t / "pkg").mkdir(), (t / "pkg" / "notes.txt").write_text("mine")),
                 "exists and is not a package", id="not-a-package"),
    pytest.param([], lambda t: (t / "pkg").write_text("a file"), "exists and is not a package folder",
                 id="output-is-a-file"),
    pytest.param(["--data", "eval.npy"], lambda t: np.save(t / "eval.npy", np.zeros(3)),
                 "evaluation data must be an .npz", id="data-not-npz"),
    pytest.param(["--data", "eval.npz"],
                 lambda t: np.savez(t / "eval.npz", image=np.zeros((2, 3, 16, 16), np.float32)),
                 "unknown input(s) 'image'", id="data-wrong-input"),
])
def test_bad_package_requests_fail_cleanly_and_touch_nothing(built: dict[str, Path], tmp_path: Path,
                                                             extra: list[str], prepare, message: str) -> None:
    import shutil

    shutil.copy(built["int8"], tmp_path / "model.onnx")
    if prepare is not None:
        prepare(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, "package", "model.onnx", "-o", "pkg", *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: [") and message in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_the_model_cannot_be_packaged_into_a_folder_that_holds_it(built: dict[str, Path], tmp_path: Path) -> None:
    package = _copy(built["package"], tmp_path / "pkg")
    with pytest.raises(PackageError, match="inside the package folder"):
        build_package(package / "triton/tiny/1/model.onnx", package)
    verify_package(package)
