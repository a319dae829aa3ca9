"""Bad input to `onnxcompress finetune`, through the real console entry point: one `error: [stage] ...` line,
exit code 2, no traceback, and the folder exactly as before (no output, no checkpoint folder, no temporary)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import TINY_CNN_INPUT, save_tiny_cnn
from onnx import TensorProto, helper, numpy_helper
from test_cli_errors import OUTPUT, assert_clean_failure, run_cli

from onnxcompress.training.trainer import RunState
from onnxcompress.runtime.training_env import DIR_ENV


def _data(tmp: Path, name: str, *, inputs: str = TINY_CNN_INPUT, labels: np.ndarray | None = None) -> None:
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    np.savez(tmp / name, **{inputs: x, "labels": np.arange(8) % 10 if labels is None else labels})


def _setup(tmp: Path, config: dict | None = None, **data_options: object) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    _data(tmp, "train.npz", **data_options)
    _data(tmp, "val.npz")
    args = ["finetune", "model.onnx", "--train", "train.npz", "--val", "val.npz", "-o", OUTPUT, "--no-progress"]
    if config is not None:
        (tmp / "qat.yaml").write_text(yaml.safe_dump(config))
        args += ["--config", "qat.yaml"]
    return args


def _quantization(**options: object) -> dict:
    return {"compression": [{"algorithm": "quantization", **options}], "training": {"epochs": 1}}


def case_bits_1(tmp: Path) -> list[str]:
    return _setup(tmp, _quantization(weight_bits=1))


def case_bits_9(tmp: Path) -> list[str]:
    return _setup(tmp, _quantization(weight_bits=9))


def case_negative_epochs(tmp: Path) -> list[str]:
    return _setup(tmp, {"training": {"epochs": -2}})


def case_unknown_keys(tmp: Path) -> list[str]:
    return _setup(tmp, {"compression": [{"algorithm": "quantization", "bitz": 4}], "training": {"epochz": 1}})


def case_unknown_target(tmp: Path) -> list[str]:
    return _setup(tmp, _quantization(target="avx2"))


def case_target_flag_overrides_the_file(tmp: Path) -> list[str]:
    """The note that the flag wins comes before the run, which then stops at the missing training data."""
    args = _setup(tmp, _quantization(target="vnni"))
    (tmp / "train.npz").unlink()
    return [*args, "--target", "portable"]


def case_unknown_algorithm(tmp: Path) -> list[str]:
    return _setup(tmp, {"compression": [{"algorithm": "sparsity"}]})


def case_train_wrong_input(tmp: Path) -> list[str]:
    return _setup(tmp, inputs="image")


def case_labels_out_of_range(tmp: Path) -> list[str]:
    return _setup(tmp, labels=np.full(8, 12))


def case_labels_float(tmp: Path) -> list[str]:
    return _setup(tmp, labels=np.zeros(8, np.float32))


def case_output_is_validation_data(tmp: Path) -> list[str]:
    return [*_setup(tmp), "-o", "val.npz"]  # the last -o wins


def case_checkpoint_folder_unwritable(tmp: Path) -> list[str]:
    (tmp / "plainfile").write_text("a regular file, so nothing can be created under it, even by root\n")
    return [*_setup(tmp), "--checkpoint-dir", "plainfile/ckpt"]


def case_nothing_to_resume(tmp: Path) -> list[str]:
    return [*_setup(tmp), "--resume"]


def case_op_without_gradient(tmp: Path) -> list[str]:
    """Gemm → Sign → Gemm: the first Gemm's weights need a gradient through Sign, which has none."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Flatten", [TINY_CNN_INPUT], ["flat"], name="flatten"),
         helper.make_node("Gemm", ["flat", "w1"], ["h"], name="fc1", transB=1),
         helper.make_node("Sign", ["h"], ["s"], name="sign_gate"),
         helper.make_node("Gemm", ["s", "w2"], ["logits"], name="fc2", transB=1)],
        "sign", [helper.make_tensor_value_info(TINY_CNN_INPUT, TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(rng.standard_normal((4, 768)).astype(np.float32) * 0.05, "w1"),
         numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    args = _setup(tmp)
    onnx.save(model, tmp / "model.onnx")
    return args


def case_nan_in_training_data(tmp: Path) -> list[str]:
    args = _setup(tmp)
    with np.load(tmp / "train.npz") as stored:
        arrays = dict(stored)
    arrays[TINY_CNN_INPUT][5, 1, 2, 3] = np.nan
    np.savez(tmp / "train.npz", **arrays)
    return args


def case_model_input_named_like_the_labels(tmp: Path) -> list[str]:
    args = _setup(tmp)
    model = onnx.load(tmp / "model.onnx")
    model.graph.input[0].name = model.graph.node[0].input[0] = "labels"
    onnx.save(model, tmp / "model.onnx")
    return args


def case_training_section_is_a_list(tmp: Path) -> list[str]:
    return [*_setup(tmp, {"training": [1, 2]}), "--epochs", "1"]


def case_diverging_weights(tmp: Path) -> list[str]:
    return _setup(tmp, {"training": {"epochs": 1, "batch_size": 2, "optimizer": "sgd", "learning_rate": 1e30}})


Builder = Callable[[Path], list[str]]
CASES: dict[str, tuple[Builder, str, tuple[str, ...]]] = {
    "output-is-validation-data": (case_output_is_validation_data, "output", ("would overwrite", "val.npz")),
    "bits-1": (case_bits_1, "config", ("'compression.0.weight_bits'", "greater than or equal to 2")),
    "bits-9": (case_bits_9, "config", ("'compression.0.weight_bits'", "less than or equal to 8")),
    "negative-epochs": (case_negative_epochs, "config", ("'training.epochs'", "greater than or equal to 1")),
    "unknown-keys": (case_unknown_keys, "config", ("unknown key 'compression.0.bitz'",
                                                   "unknown key 'training.epochz'")),
    "unknown-target": (case_unknown_target, "config", ("'compression.0.target'", "'portable' or 'vnni'")),
    "unknown-algorithm": (case_unknown_algorithm, "config", ("'compression.0.algorithm'", "'quantization'")),
    "train-wrong-input": (case_train_wrong_input, "data", ("training data", "has arrays ['image', 'labels']",
                                                           "missing ['x']")),
    "labels-out-of-range": (case_labels_out_of_range, "data", ("labels range over [12, 12]",
                                                               "logits have 10 classes")),
    "labels-float": (case_labels_float, "data", ("1-D integer array of class indices", "float32[8]")),
    "checkpoint-folder-unwritable": (case_checkpoint_folder_unwritable, "output",
                                     ("checkpoint folder plainfile/ckpt is not writable",)),
    "nothing-to-resume": (case_nothing_to_resume, "config", ("nothing to resume",)),
    "op-without-gradient": (case_op_without_gradient, "training", ("cannot differentiate op Sign",
                                                                   "'sign_gate'")),
    "nan-in-training-data": (case_nan_in_training_data, "data", ("training data", "input 'x' of sample 5",
                                                                 "NaN or infinite")),
    "input-named-like-the-labels": (case_model_input_named_like_the_labels, "data",
                                    ("an input named 'labels'", "set training.labels")),
    "training-section-is-a-list": (case_training_section_is_a_list, "config",
                                   ("'training'", "valid dictionary")),
    "diverging-weights": (case_diverging_weights, "training", ("epoch 1, step", "the training loss is",
                                                               "learning_rate")),
}


@pytest.mark.parametrize(("build", "stage", "fragments"),
                         [pytest.param(*case, id=name) for name, case in CASES.items()])
def test_bad_finetune_input_fails_cleanly(tmp_path: Path, build: Builder, stage: str,
                                          fragments: tuple[str, ...]) -> None:
    assert_clean_failure(tmp_path, build(tmp_path), stage, fragments)


def test_missing_training_runtime_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, DIR_ENV, str(tmp_path / "no-runtime-here"))
    args = _setup(tmp_path)
    assert_clean_failure(tmp_path, args, "training", ("onnxruntime-training 1.19.2 runtime", "is not installed",
                                                      "--install"))


def test_target_flag_overrides_the_config_file_and_says_so(tmp_path: Path) -> None:
    assert_clean_failure(tmp_path, case_target_flag_overrides_the_file(tmp_path), "data", ("train.npz",))
    result = run_cli(tmp_path, *case_target_flag_overrides_the_file(tmp_path))
    assert "note: --target portable overrides the target set in qat.yaml" in result.stderr


def _finished_run(tmp: Path) -> list[str]:
    """A finished one-epoch run in the default checkpoint folder, its exported model removed again; returns the
    arguments that resume it (which reads the checkpoint folder and exports again)."""
    args = [*_setup(tmp, {"training": {"epochs": 1}})]
    result = run_cli(tmp, *args)
    assert result.returncode == 0, result.stderr
    (tmp / OUTPUT).unlink()
    return [*args, "--resume"]


def _current(folder: Path, kind: str) -> Path:
    """The file of the current checkpoint of `kind` ("last" or "best") that run.json names."""
    return folder / json.loads((folder / "run.json").read_text())["checkpoints"][kind]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CHECKPOINTS = OUTPUT + ".checkpoints"
TAMPERING: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "corrupt-run-state": (lambda folder: (folder / "run.json").write_text("{corrupt"),
                          ("run.json is not a run state written by onnxcompress",)),
    "changed-checkpoint": (lambda folder: _flip_last_byte(_current(folder, "last")),
                           ("last-0001.ckpt changed since it was written",)),
    "changed-artifact": (lambda folder: _flip_last_byte(folder / "artifacts" / "training_model.onnx"),
                         ("training_model.onnx changed since it was written",)),
    "extra-artifact": (lambda folder: (folder / "artifacts" / "training_model.onnx.data").write_bytes(b"0" * 64),
                       ("training_model.onnx.data was not written by this run",)),
    "missing-checkpoint": (lambda folder: _current(folder, "last").unlink(), ("last-0001.ckpt is missing",)),
    "symlinked-checkpoint": (lambda folder: (_current(folder, "last").unlink(),
                                             _current(folder, "last").symlink_to(_current(folder, "best"))),
                             ("is or holds a symlink",)),
}


@pytest.mark.parametrize(("tamper", "fragments"), [pytest.param(*case, id=name) for name, case in TAMPERING.items()])
def test_resume_refuses_a_checkpoint_folder_whose_files_changed(tmp_path: Path, tamper: Callable[[Path], None],
                                                                fragments: tuple[str, ...]) -> None:
    args = _finished_run(tmp_path)
    tamper(tmp_path / CHECKPOINTS)
    assert_clean_failure(tmp_path, args, "resume", ("cannot resume", *fragments))


def test_resume_of_an_untouched_folder_succeeds(tmp_path: Path) -> None:
    args = _finished_run(tmp_path)
    result = run_cli(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert onnx.load(tmp_path / OUTPUT).graph.output[0].name == "logits"
    state = json.loads((tmp_path / CHECKPOINTS / "run.json").read_text())
    assert set(state["files"]) >= {"last-0001.ckpt", "best-0001.ckpt", "artifacts/training_model.onnx"}


def test_ctrl_c_during_finetune_leaves_no_output_and_a_resumable_folder_or_none(tmp_path: Path) -> None:
    """Interrupted while starting, calibrating or training: no traceback, no exported model, and a checkpoint folder
    only where an epoch finished (it then holds the run state a resume needs)."""
    import signal
    import subprocess
    import sys
    import time

    args = _setup(tmp_path, {"training": {"epochs": 500, "batch_size": 4}})
    for delay in (0.5, 1.5, 2.5, 4.0):
        process = subprocess.Popen([sys.executable, "-m", "onnxcompress.cli", *args], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"still running 120 s after Ctrl-C at {delay} s:\n{process.communicate()[1][-3000:]}")
        # -SIGINT: interrupted before Python had installed its handler, which ends the process at once.
        assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in stderr, (delay, stderr)
        assert not (tmp_path / OUTPUT).exists()
        folder = tmp_path / CHECKPOINTS
        if folder.exists():
            assert (folder / "run.json").is_file(), (delay, sorted(p.name for p in folder.iterdir()))
            state = RunState.read(folder / "run.json")
            for name in state.checkpoints.values():
                state.verify(folder, name)
            shutil.rmtree(folder)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_a_label_array_of_another_name_is_named_with_a_flag(tmp_path: Path) -> None:
    args = _setup(tmp_path, {"training": {"epochs": 1}})
    for name in ("train.npz", "val.npz"):
        with np.load(tmp_path / name) as stored:
            arrays = dict(stored)
        np.savez(tmp_path / name, x=arrays["x"], target=arrays["labels"])
    refused = run_cli(tmp_path, *args)
    assert refused.returncode == 2 and "missing ['labels']" in refused.stderr
    accepted = run_cli(tmp_path, *args, "--labels", "target")
    assert accepted.returncode == 0, accepted.stderr
    assert (tmp_path / OUTPUT).is_file()
