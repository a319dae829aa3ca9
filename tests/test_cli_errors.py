"""Bad input to `onnxcompress quantize`, run through the real console entry point in a subprocess.

Every case must exit non-zero with one `error: [stage] ...` line naming the problem, print no traceback, and leave
the working folder exactly as it was (no output file, no temporary, input files untouched).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn, make_calib_npz, save_tiny_cnn
from onnx import TensorProto, helper

OUTPUT = "quantized.onnx"


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "onnxcompress.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` with the sha256 of its content (symlinks and folders by kind)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = "symlink → " + os.readlink(path)
        elif path.is_dir():
            entries[key] = "<dir>"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Case builders: each prepares files in `tmp` and returns the CLI arguments.
# ---------------------------------------------------------------------------------------------


def _good_model_and_data(tmp: Path) -> None:
    save_tiny_cnn(tmp / "model.onnx")
    make_calib_npz(tmp / "calib.npz")


def _quantize(model: str = "model.onnx", data: str = "calib.npz", *extra: str) -> list[str]:
    return ["quantize", model, "--data", data, "-o", OUTPUT, "--no-progress", *extra]


def case_missing_model(tmp: Path) -> list[str]:
    make_calib_npz(tmp / "calib.npz")
    return _quantize("missing.onnx")


def case_model_is_folder(tmp: Path) -> list[str]:
    make_calib_npz(tmp / "calib.npz")
    (tmp / "folder.onnx").mkdir()
    return _quantize("folder.onnx")


def case_text_file(tmp: Path) -> list[str]:
    make_calib_npz(tmp / "calib.npz")
    (tmp / "model.onnx").write_text("this is a plain text file, not a protobuf\n")
    return _quantize()


def case_truncated_protobuf(tmp: Path) -> list[str]:
    make_calib_npz(tmp / "calib.npz")
    data = build_tiny_cnn().SerializeToString()
    (tmp / "model.onnx").write_bytes(data[: len(data) // 2])
    return _quantize()


def case_checker_failure(tmp: Path) -> list[str]:
    make_calib_npz(tmp / "calib.npz")
    model = build_tiny_cnn()
    model.graph.node[2].input[0] = "nowhere"  # relu1 reads a tensor nothing produces
    onnx.save_model(model, tmp / "model.onnx")
    return _quantize()


def case_opset_too_old(tmp: Path) -> list[str]:
    # ImageScaler is an experimental opset-1 op that has no schema (and no adapter) in opset 13.
    graph = helper.make_graph(
        [helper.make_node("ImageScaler", ["x"], ["y"], scale=2.0, name="scale")],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)]), tmp / "model.onnx")
    make_calib_npz(tmp / "calib.npz")
    return _quantize()


def _external_model(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(build_tiny_cnn(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert (folder / "model.onnx.data").is_file()
    return path


def _relocate_external_data(model_path: Path, location: str) -> None:
    model = onnx.load_model(model_path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, model_path)


def case_external_data_missing(tmp: Path) -> list[str]:
    make_calib_npz(tmp / "calib.npz")
    _external_model(tmp / "m")
    (tmp / "m" / "model.onnx.data").unlink()
    return _quantize("m/model.onnx")


def case_external_data_outside(tmp: Path) -> list[str]:
    make_calib_npz(tmp / "calib.npz")
    path = _external_model(tmp / "m")
    (tmp / "m" / "model.onnx.data").rename(tmp / "secret.data")
    _relocate_external_data(path, "../secret.data")
    return _quantize("m/model.onnx")


def case_external_data_symlink(tmp: Path) -> list[str]:
    make_calib_npz(tmp / "calib.npz")
    _external_model(tmp / "m")
    (tmp / "m" / "model.onnx.data").rename(tmp / "real.data")
    (tmp / "m" / "model.onnx.data").symlink_to(tmp / "real.data")
    return _quantize("m/model.onnx")


def case_npz_wrong_input_name(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    make_calib_npz(tmp / "calib.npz", name="image")
    return _quantize()


def case_npz_wrong_shape(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    make_calib_npz(tmp / "calib.npz", shape=(3, 8, 8))
    return _quantize()


def case_npz_wrong_dtype(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    make_calib_npz(tmp / "calib.npz", dtype=np.float64)
    return _quantize()


def case_npz_empty(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    np.savez(tmp / "calib.npz", x=np.zeros((0, 3, 16, 16), np.float32))
    return _quantize()


def case_npz_corrupt(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    (tmp / "calib.npz").write_text("not a zip archive")
    return _quantize()


def case_npy_folder_wrong_shape(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    (tmp / "feeds").mkdir()
    np.save(tmp / "feeds" / "000.npy", np.zeros((2, 3, 16, 16), np.float32))
    np.save(tmp / "feeds" / "001.npy", np.zeros((2, 3, 16, 12), np.float32))
    return _quantize(data="feeds")


def case_ignored_scope_unmatched(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    return _quantize("model.onnx", "calib.npz", "--ignore-names", "conv1,nope_a", "--ignore-names", "nope_b",
                     "--ignore-types", "Softmax", "--ignore-patterns", "zz.*")


def case_config_unknown_key(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    (tmp / "config.yaml").write_text("presett: mixed\nsubset_size: 10\n")
    return _quantize("model.onnx", "calib.npz", "--config", "config.yaml")


def case_config_unknown_target(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    (tmp / "config.yaml").write_text("target: avx2\n")
    return _quantize("model.onnx", "calib.npz", "--config", "config.yaml")


def case_config_unknown_nested_key(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    (tmp / "config.yaml").write_text("ignored_scope:\n  namez: [conv1]\n")
    return _quantize("model.onnx", "calib.npz", "--config", "config.yaml")


def case_config_subset_size_zero(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    (tmp / "config.yaml").write_text("subset_size: 0\n")
    return _quantize("model.onnx", "calib.npz", "--config", "config.yaml")


def case_output_is_input(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    return ["quantize", "model.onnx", "--data", "calib.npz", "-o", "model.onnx", "--no-progress"]


def case_output_is_input_other_spelling(tmp: Path) -> list[str]:
    (tmp / "dir").mkdir()
    save_tiny_cnn(tmp / "dir" / "model.onnx")
    make_calib_npz(tmp / "calib.npz")
    return ["quantize", "dir/model.onnx", "--data", "calib.npz", "-o", "dir/../dir/model.onnx", "--no-progress"]


def case_output_is_calibration_data(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    return ["quantize", "model.onnx", "--data", "calib.npz", "-o", "calib.npz", "--no-progress"]


def case_output_is_config(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    (tmp / "q.yaml").write_text("preset: mixed\n")
    return ["quantize", "model.onnx", "--data", "calib.npz", "--config", "q.yaml", "-o", "q.yaml", "--no-progress"]


def case_output_is_external_data(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    model = onnx.load(tmp / "model.onnx")
    onnx.save(model, tmp / "model.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    return ["quantize", "model.onnx", "--data", "calib.npz", "-o", "w.bin", "--no-progress"]


def _calibration_with(tmp: Path, value: float) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    data = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    data[4, 1, 2, 3] = value
    np.savez(tmp / "calib.npz", **{TINY_CNN_INPUT: data})
    return ["quantize", "model.onnx", "--data", "calib.npz", "-o", OUTPUT, "--no-progress"]


def case_npy_without_samples(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    (tmp / "calib").mkdir()
    np.save(tmp / "calib" / "a.npy", np.zeros((0, 3, 16, 16), np.float32))
    return ["quantize", "model.onnx", "--data", "calib", "-o", OUTPUT, "--no-progress"]


def case_npy_forged_header(tmp: Path) -> list[str]:
    """A header asking for petabytes: refused from the file size, before any allocation."""
    save_tiny_cnn(tmp / "model.onnx")
    (tmp / "calib").mkdir()
    with open(tmp / "calib" / "a.npy", "wb") as stream:
        np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (10**12, 3, 16, 16)})
        stream.write(bytes(100))
    return ["quantize", "model.onnx", "--data", "calib", "-o", OUTPUT, "--no-progress"]


def case_calibration_nan(tmp: Path) -> list[str]:
    return _calibration_with(tmp, float("nan"))


def case_calibration_inf(tmp: Path) -> list[str]:
    return _calibration_with(tmp, float("-inf"))


def case_output_folder_unwritable(tmp: Path) -> list[str]:
    _good_model_and_data(tmp)
    (tmp / "plainfile").write_text("a regular file, so nothing can be created under it, even by root\n")
    return ["quantize", "model.onnx", "--data", "calib.npz", "-o", "plainfile/out.onnx", "--no-progress"]


Builder = Callable[[Path], list[str]]

# (builder, stage, fragments that must all appear in stderr)
CASES: dict[str, tuple[Builder, str, tuple[str, ...]]] = {
    "missing-model": (case_missing_model, "load", ("no such file", "missing.onnx")),
    "model-is-folder": (case_model_is_folder, "load", ("no such file", "it is a folder")),
    "text-file": (case_text_file, "load", ("not a valid ONNX model",)),
    "truncated-protobuf": (case_truncated_protobuf, "load", ("not a valid ONNX model", "truncated or corrupt")),
    "checker-failure": (case_checker_failure, "load", ("fails the ONNX checker", "nowhere")),
    "opset-too-old": (case_opset_too_old, "load", ("opset 1 is too old to upgrade to 13", "ImageScaler")),
    "external-data-missing": (case_external_data_missing, "load", ("external data of tensor", "is missing",
                                                                   "no such file")),
    "external-data-outside": (case_external_data_outside, "load", ("outside the model folder",
                                                                   "../secret.data")),
    "external-data-symlink": (case_external_data_symlink, "load", ("goes through a symlink",)),
    "npz-wrong-input-name": (case_npz_wrong_input_name, "data", ("unknown input(s) 'image'",
                                                                 "missing input(s) 'x'")),
    "npz-wrong-shape": (case_npz_wrong_shape, "data", ("input 'x' has shape [1, 3, 8, 8]",
                                                       "the model expects [?, 3, 16, 16]")),
    "npz-wrong-dtype": (case_npz_wrong_dtype, "data", ("dtype float64", "the model expects float32")),
    "npz-empty": (case_npz_empty, "data", ("calibration dataset is empty",)),
    "npy-folder-wrong-shape": (case_npy_folder_wrong_shape, "data", ("sample 1", "shape [2, 3, 16, 12]",
                                                                     "[?, 3, 16, 16]")),
    "config-unknown-key": (case_config_unknown_key, "config", ("unknown key 'presett'",)),
    "config-unknown-target": (case_config_unknown_target, "config", ("'target'", "'portable' or 'vnni'")),
    "config-unknown-nested-key": (case_config_unknown_nested_key, "config",
                                  ("unknown key 'ignored_scope.namez'",)),
    "config-subset-size-zero": (case_config_subset_size_zero, "config", ("'subset_size'",
                                                                         "greater than or equal to 1")),
    "npz-corrupt": (case_npz_corrupt, "data", ("cannot read", "calib.npz")),
    "output-is-input": (case_output_is_input, "output", ("output path is the input model",)),
    "npy-without-samples": (case_npy_without_samples, "data", ("a.npy", "holds no sample")),
    "npy-forged-header": (case_npy_forged_header, "data", ("a.npy", "the file holds 100")),
    "calibration-nan": (case_calibration_nan, "data", ("sample 4", "NaN values")),
    "calibration-inf": (case_calibration_inf, "data", ("sample 4", "infinite values")),
    "output-is-calibration-data": (case_output_is_calibration_data, "output",
                                   ("would overwrite", "calib.npz", "which this command reads")),
    "output-is-config": (case_output_is_config, "output", ("would overwrite", "q.yaml")),
    "output-is-external-data": (case_output_is_external_data, "output", ("would overwrite", "w.bin")),
    "output-is-input-other-spelling": (case_output_is_input_other_spelling, "output",
                                       ("output path is the input model", "dir/../dir/model.onnx")),
    "output-folder-unwritable": (case_output_folder_unwritable, "output", ("cannot write", "plainfile",
                                                                           "is not a folder")),
}

def assert_clean_failure(tmp_path: Path, args: list[str], stage: str, fragments: tuple[str, ...]) -> str:
    """Run the CLI, check the failure contract and return the error message."""
    before = snapshot(tmp_path)

    result = run_cli(tmp_path, *args)

    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: [{stage}] "), result.stderr
    message = result.stderr[result.stderr.index("error: "):]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "wrote" not in result.stdout
    assert not (tmp_path / OUTPUT).exists()
    assert snapshot(tmp_path) == before  # no output, no temporary, inputs untouched
    return message


@pytest.mark.parametrize(("build", "stage", "fragments"),
                         [pytest.param(*case, id=name) for name, case in CASES.items()])
def test_bad_input_fails_cleanly(tmp_path: Path, build: Builder, stage: str, fragments: tuple[str, ...]) -> None:
    assert_clean_failure(tmp_path, build(tmp_path), stage, fragments)


def test_ignored_scope_entries_matching_nothing_are_all_listed(tmp_path: Path) -> None:
    message = assert_clean_failure(tmp_path, case_ignored_scope_unmatched(tmp_path), "config", (
        "ignored scope entries match no node", "name 'nope_a'", "name 'nope_b'", "type 'Softmax'",
        "pattern 'zz.*'"))
    assert "'conv1'" not in message  # conv1 exists: only the unmatched entries are listed


def test_quantize_succeeds_and_leaves_the_input_untouched(tmp_path: Path) -> None:
    model = save_tiny_cnn(tmp_path / "tiny_cnn.onnx")
    make_calib_npz(tmp_path / "tiny.npz")
    digest = sha256(model)
    mtime = model.stat().st_mtime_ns

    result = run_cli(tmp_path, "quantize", "tiny_cnn.onnx", "--data", "tiny.npz", "--no-progress")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    output = tmp_path / "tiny_cnn.int8.onnx"  # the default output name
    assert output.is_file()
    assert sha256(model) == digest and model.stat().st_mtime_ns == mtime
    match = re.fullmatch(r"wrote (.+) \((\d+\.\d\d) MB, (\d+\.\d\d)× of (\d+\.\d\d) MB\)\n", result.stdout)
    assert match, result.stdout
    assert Path(match[1]) == output.resolve()
    after, before = output.stat().st_size, model.stat().st_size
    assert float(match[3]) == pytest.approx(after / before, abs=0.006)
    quantized = onnx.load_model(output)
    onnx.checker.check_model(quantized)
    ops = {node.op_type for node in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    assert [i.name for i in quantized.graph.input] == ["x"]
    assert [o.name for o in quantized.graph.output] == ["logits"]
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["tiny.npz", "tiny_cnn.int8.onnx", "tiny_cnn.onnx"]


def test_unknown_target_flag_is_refused_before_any_work(tmp_path: Path) -> None:
    _good_model_and_data(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, *_quantize("model.onnx", "calib.npz", "--target", "avx2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Invalid value for '--target'" in result.stderr and "'portable', 'vnni'" in result.stderr
    assert snapshot(tmp_path) == before


def test_target_flag_wins_over_the_config_file_and_says_so(tmp_path: Path) -> None:
    from onnxcompress.portability import check_portability

    _good_model_and_data(tmp_path)
    (tmp_path / "config.yaml").write_text("target: vnni\nsubset_size: 10\n")
    result = run_cli(tmp_path, *_quantize("model.onnx", "calib.npz", "--config", "config.yaml", "--target",
                                          "portable"))
    assert result.returncode == 0, result.stderr
    assert "note: --target portable overrides the target set in config.yaml" in result.stderr
    assert check_portability(onnx.load(tmp_path / OUTPUT)).safe_without_vnni
    vnni = run_cli(tmp_path, *_quantize("model.onnx", "calib.npz", "--config", "config.yaml", "-o", "vnni.onnx"))
    assert vnni.returncode == 0 and "note:" not in vnni.stderr  # no flag: the file's setting, silently
    assert not check_portability(onnx.load(tmp_path / "vnni.onnx")).safe_without_vnni


_INTERRUPT_SCRIPT = """
import signal, threading
import onnxcompress.cli as command_line
command_line.CLEANUP_GRACE_S = 1
try:
    command_line.cli.on_interrupt(signal.SIGINT, None)
except KeyboardInterrupt:
    pass
{after}
print("not reached", flush=True)
"""


@pytest.mark.parametrize(("after", "message"), [
    # The clean-up waits on a lock the interruption left held: the alarm ends it.
    ("lock = threading.Lock(); lock.acquire(); lock.acquire()", "clean-up did not finish within 1 s"),
    ("command_line.cli.on_interrupt(signal.SIGINT, None)", "interrupted again"),
])
def test_an_interrupted_run_ends_with_130_even_when_its_clean_up_hangs(after: str, message: str) -> None:
    script = _INTERRUPT_SCRIPT.format(after=after)
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert ended.returncode == 130, ended.stderr
    assert message in ended.stderr and "not reached" not in ended.stdout and "Traceback" not in ended.stderr


def test_quantize_with_accuracy_control_reports_what_it_left_in_float(tmp_path: Path) -> None:
    save_tiny_cnn(tmp_path / "tiny_cnn.onnx")
    make_calib_npz(tmp_path / "tiny.npz")
    (tmp_path / "strict.py").write_text(
        "import onnx\n"
        "def no_quantized_weights(path):\n"
        "    ops = [n.op_type for n in onnx.load(path).graph.node]\n"
        "    return -float(ops.count('DequantizeLinear'))\n")
    # Every DequantizeLinear costs one point: only a fully float model is within 0.5 of the float model.
    result = run_cli(tmp_path, "quantize", "tiny_cnn.onnx", "--data", "tiny.npz", "--no-progress",
                     "--max-drop", "0.5", "--metric", "strict.py:no_quantized_weights")
    assert result.returncode == 0, result.stderr
    assert re.search(r"accuracy control: strict.py:no_quantized_weights float -0, quantized -\d+, final -0 after "
                     r"\d+ evaluations; in float: \S", result.stdout), result.stdout
    # Every unit is float: the fully quantized and the final (float) model's latency, in both runtimes.
    assert re.search(r"speed \(median latency, batch 1\): openvino [\d.]+ ms compressed, [\d.]+ ms final \([+-][\d.]+%\); "
                     r"onnxruntime", result.stdout), result.stdout
    ops = {n.op_type for n in onnx.load(tmp_path / "tiny_cnn.int8.onnx").graph.node}
    assert "DequantizeLinear" not in ops


@pytest.mark.parametrize(("flags", "fragment"), [
    (("--max-drop", "0.01"), "needs both --max-drop and --metric"),
    (("--metric", "top1"), "needs both --max-drop and --metric"),
    (("--max-drop", "-0.1", "--metric", "top1"), "-0.1 is not in the range x>=0"),
    (("--max-drop", "0.01", "--metric", "top1"), "metric top1 needs evaluation data"),
    (("--max-drop", "0.01", "--metric", "missing.py:f"), "metric file not found"),
    (("--ranking", "noise"), "--ranking and --no-speed belong to accuracy control: they need --max-drop"),
    (("--workers", "2"), "--workers and --ray-address score candidates of accuracy control"),
    (("--criterion", "hessian"), "--criterion costs the 4-bit weights of mixed precision: it needs --max-size"),
    (("--max-size", "0.2", "--max-bit-complexity", "0.7"), "are two budgets for mixed precision: choose one"),
    (("--max-bit-complexity", "0.3"), "with every weight in 4 bits the bit complexity is 0.5"),
    (("--max-size", "0.18", "--max-drop", "0.01", "--metric", "top1"), "--max-size and --max-drop cannot be combined"),
    (("--max-size", "0.01"), "--max-size 0.01 cannot be met: with every weight in 4 bits the model keeps"),
    (("--max-drop", "0.01", "--metric", "cosine", "--eval-data", "tiny.npz", "--ray-address", "nowhere"),
     "Ray address 'nowhere' is not HOST:PORT or ray://HOST:PORT"),
])
def test_impossible_accuracy_control_settings_are_refused(tmp_path: Path, flags: tuple[str, ...],
                                                          fragment: str) -> None:
    save_tiny_cnn(tmp_path / "tiny_cnn.onnx")
    make_calib_npz(tmp_path / "tiny.npz")
    result = run_cli(tmp_path, "quantize", "tiny_cnn.onnx", "--data", "tiny.npz", "--no-progress", *flags)
    assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "tiny_cnn.int8.onnx").exists()
