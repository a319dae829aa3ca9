"""Hostile and broken input to every command (issue 11), through the real console entry point.

Each case is built by code in a fresh folder. A refused case must exit 2 with one `error: [stage] ...` line that
names the problem, print no traceback, and leave the folder exactly as it was; a valid case must succeed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TINY_CNN_INPUT, build_tiny_cnn, make_calib_npz, save_tiny_cnn
from onnx import TensorProto, helper, numpy_helper
from test_cli_errors import assert_clean_failure, run_cli, snapshot

Builder = Callable[[Path], list[str]]
QUANTIZE = ("-o", "quantized.onnx", "--no-progress")
BENCHMARK = ("--rounds", "1", "--round-seconds", "0.05", "--no-progress")


def _model(nodes: list, inputs: list, outputs: list, initializers: tuple = ()) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "hostile", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _tiny(tmp: Path, edit: Callable[[onnx.ModelProto], None] | None = None, name: str = "model.onnx") -> None:
    model = build_tiny_cnn()
    if edit is not None:
        edit(model)
    onnx.save(model, tmp / name)
    make_calib_npz(tmp / "calib.npz")


def _external(tmp: Path) -> None:
    onnx.save_model(build_tiny_cnn(), tmp / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=0)
    make_calib_npz(tmp / "calib.npz")


def _relocate(tmp: Path, location: str) -> None:
    model = onnx.load_model(tmp / "model.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, tmp / "model.onnx")


# ----------------------------------------------------------------------------------------- model structure


def case_sequence_input(tmp: Path) -> list[str]:
    onnx.save(_model([helper.make_node("SequenceAt", ["s", "i"], ["y"])],
                     [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [1, 4])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                     [numpy_helper.from_array(np.array(0, np.int64), "i")]), tmp / "m.onnx")
    np.savez(tmp / "c.npz", s=np.zeros((2, 1, 4), np.float32))
    return ["quantize", "m.onnx", "--data", "c.npz", *QUANTIZE]


def case_untyped_input(tmp: Path) -> list[str]:
    _tiny(tmp, lambda m: m.graph.input[0].ClearField("type"))
    return ["benchmark", "model.onnx", *BENCHMARK]


def case_no_outputs(tmp: Path) -> list[str]:
    _tiny(tmp, lambda m: m.graph.ClearField("output"))
    return ["quantize", "model.onnx", "--data", "calib.npz", *QUANTIZE]


def case_no_outputs_finetune(tmp: Path) -> list[str]:
    _tiny(tmp, lambda m: m.graph.ClearField("output"))
    return ["finetune", "model.onnx", "--train", "calib.npz", "--val", "calib.npz", *QUANTIZE]


def case_no_inputs(tmp: Path) -> list[str]:
    constant = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones(3, np.float32)))
    onnx.save(_model([constant], [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]),
              tmp / "model.onnx")
    return ["benchmark", "model.onnx", *BENCHMARK]


def case_empty_graph(tmp: Path) -> list[str]:
    onnx.save(_model([], [], []), tmp / "model.onnx")
    return ["inspect", "model.onnx"]


# ----------------------------------------------------------------------------------------- external data


def case_external_data_short(tmp: Path) -> list[str]:
    _external(tmp)
    data = (tmp / "w.data").read_bytes()
    (tmp / "w.data").write_bytes(data[: len(data) // 2])
    return ["inspect", "model.onnx", "--no-runtimes"]


def case_external_data_is_the_model(tmp: Path) -> list[str]:
    _external(tmp)
    _relocate(tmp, "model.onnx")
    return ["quantize", "model.onnx", "--data", "calib.npz", *QUANTIZE]


def case_external_data_nul_byte(tmp: Path) -> list[str]:
    _external(tmp)
    _relocate(tmp, "w.data\0.txt")
    return ["quantize", "model.onnx", "--data", "calib.npz", *QUANTIZE]


# ----------------------------------------------------------------------------------------- data and config


def case_percentile_of_huge_finite_values(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    data = np.random.default_rng(0).random((6, 3, 16, 16)).astype(np.float32)
    data[2, 0, 0, 0], data[3, 0, 0, 1] = 3e38, -3e38
    np.savez(tmp / "calib.npz", **{TINY_CNN_INPUT: data})
    return ["quantize", "model.onnx", "--data", "calib.npz", "--calibration", "percentile", *QUANTIZE]


def case_text_file_named_npy(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx")
    (tmp / "calib").mkdir()
    (tmp / "calib" / "a.npy").write_text("hello\n")
    return ["quantize", "model.onnx", "--data", "calib", *QUANTIZE]


def _deep_config(text: str) -> Builder:
    def build(tmp: Path) -> list[str]:
        _tiny(tmp)
        (tmp / "config.yaml").write_text(text)
        return ["quantize", "model.onnx", "--data", "calib.npz", "--config", "config.yaml", *QUANTIZE]
    return build


def _scope_with_flag(text: str) -> Builder:
    """A malformed ignored scope in the file is reported, not replaced by the flag's."""
    def build(tmp: Path) -> list[str]:
        return [*_deep_config(text)(tmp), "--ignore-types", "Gemm"]
    return build


# ----------------------------------------------------------------------------------------- other commands


def case_benchmark_huge_static_input(tmp: Path) -> list[str]:
    def huge(model: onnx.ModelProto) -> None:
        for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
            dim.dim_value = 10**6
    _tiny(tmp, huge)
    return ["benchmark", "model.onnx", *BENCHMARK]


def case_benchmark_dynamic_without_inputs(tmp: Path) -> list[str]:
    save_tiny_cnn(tmp / "model.onnx", dynamic_spatial=True)
    return ["benchmark", "model.onnx", *BENCHMARK]


def case_benchmark_infinite_rounds(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["benchmark", "model.onnx", "--rounds", "1", "--round-seconds", "inf"]


def case_benchmark_report_into_missing_folder(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["benchmark", "model.onnx", *BENCHMARK, "--report", "missing/report.json"]


def case_compare_different_inputs(tmp: Path) -> list[str]:
    def rename(model: onnx.ModelProto) -> None:
        model.graph.input[0].name = model.graph.node[0].input[0] = "image"
    _tiny(tmp)
    _tiny(tmp, rename, name="other.onnx")
    return ["compare", "model.onnx", "other.onnx", "--data", "calib.npz", "--samples", "2"]


def case_compare_custom_op(tmp: Path) -> list[str]:
    def custom(model: onnx.ModelProto) -> None:
        model.graph.node[2].op_type, model.graph.node[2].domain = "MyRelu", "my.domain"
        model.opset_import.append(helper.make_opsetid("my.domain", 1))
    _tiny(tmp)
    _tiny(tmp, custom, name="other.onnx")
    return ["compare", "model.onnx", "other.onnx", "--data", "calib.npz", "--samples", "2"]


def case_compare_plot_over_data(tmp: Path) -> list[str]:
    _tiny(tmp)
    save_tiny_cnn(tmp / "other.onnx", seed=1)
    return ["compare", "model.onnx", "other.onnx", "--data", "calib.npz", "--plot", "calib.npz"]


def _export_into_own_folder(suffix: str) -> Builder:
    def build(tmp: Path) -> list[str]:
        save_tiny_cnn(tmp / f"model.{suffix}")
        return ["export", f"model.{suffix}", "-o", "."]
    return build


def case_nan_weight(tmp: Path) -> list[str]:
    def poison(model: onnx.ModelProto) -> None:
        weight = next(t for t in model.graph.initializer if t.name == "conv2.weight")
        values = numpy_helper.to_array(weight).copy()
        values[0, 0, 0, 0] = np.nan
        weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    _tiny(tmp, poison)
    return ["quantize", "model.onnx", "--data", "calib.npz", *QUANTIZE]


def case_demo_into_a_file(tmp: Path) -> list[str]:
    (tmp / "results").write_text("not a folder\n")
    return ["demo", "-o", "results", "--rounds", "1", "--round-seconds", "0.05"]


def case_demo_nan_round_seconds(tmp: Path) -> list[str]:
    return ["demo", "-o", "results", "--round-seconds", "nan"]


def case_sparsify_nothing_to_mask(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["sparsify", "model.onnx", "-o", "out.onnx", "--ignore-types", "Conv,Gemm"]


def case_sparsify_output_over_data(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["sparsify", "model.onnx", "-o", "calib.npz", "--data", "calib.npz"]


def case_sparsify_scope_matches_nothing(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["sparsify", "model.onnx", "-o", "out.onnx", "--ignore-names", "conv9"]


def case_prune_target_out_of_range(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["prune", "model.onnx", "-o", "out.onnx", "--target", "1.5"]


def case_prune_unreachable_flops(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["prune", "model.onnx", "-o", "out.onnx", "--target", "0.99", "--target-kind", "flops"]


def case_prune_nothing_prunable(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["prune", "model.onnx", "-o", "out.onnx", "--ignore-types", "Conv"]


def case_prune_scope_matches_nothing(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["prune", "model.onnx", "-o", "out.onnx", "--ignore-names", "conv9"]


def _compress_weights(*flags: str) -> Builder:
    def build(tmp: Path) -> list[str]:
        _tiny(tmp)
        return ["compress-weights", "model.onnx", "-o", "out.onnx", *flags]
    return build


# (builder, stage, fragments that must all appear in the message)
CASES: dict[str, tuple[Builder, str, tuple[str, ...]]] = {
    "sequence-input": (case_sequence_input, "load", ("input 's' is a sequence", "dense tensors")),
    "untyped-input": (case_untyped_input, "load", ("'type'", "required but missing")),
    "no-outputs": (case_no_outputs, "load", ("the model has no outputs",)),
    "no-outputs-finetune": (case_no_outputs_finetune, "load", ("the model has no outputs",)),
    "no-inputs": (case_no_inputs, "load", ("the model has no inputs", "constants")),
    "empty-graph": (case_empty_graph, "load", ("the model has no outputs",)),
    "external-data-short": (case_external_data_short, "load", ("external data of tensor", "exceeds available data")),
    "external-data-is-the-model": (case_external_data_is_the_model, "load", ("points into the model file itself",)),
    "external-data-nul-byte": (case_external_data_nul_byte, "load", ("control character", r"\x00")),
    "percentile-huge-values": (case_percentile_of_huge_finite_values, "calibration",
                               ("NaN or infinite values", "overflows float32")),
    "text-file-named-npy": (case_text_file_named_npy, "data", ("a.npy", "not a .npy file")),
    "config-deep-json-style": (_deep_config("[" * 5000 + "]" * 5000), "config", ("nests deeper",)),
    "config-deep-block-style": (_deep_config("a:\n" + "".join("  " * i + "  b:\n" for i in range(1, 3000))),
                                "config", ("nests deeper",)),
    "config-nested-40": (_deep_config("preset: " + "[" * 40 + "]" * 40 + "\n"), "config", ("deeper than 32",)),
    "config-alias-cycle": (_deep_config("preset: &a [*a]\n"), "config", ("alias refers to itself",)),
    "config-scope-list-with-flag": (_scope_with_flag("ignored_scope: [conv1]\n"), "config",
                                    ("'ignored_scope'", "valid dictionary")),
    "config-scope-string-with-flag": (_scope_with_flag("ignored_scope:\n  names: conv1\n"), "config",
                                      ("'ignored_scope.names'", "valid tuple")),
    "benchmark-huge-static-input": (case_benchmark_huge_static_input, "benchmark",
                                    ("GiB", "limit for generated inputs", "--inputs")),
    "benchmark-dynamic-without-inputs": (case_benchmark_dynamic_without_inputs, "benchmark",
                                         ("dynamic dimension 2 (H)", "--inputs FILE.npz")),
    "benchmark-infinite-rounds": (case_benchmark_infinite_rounds, "benchmark", ("round_seconds <= 3600",)),
    "benchmark-report-missing-folder": (case_benchmark_report_into_missing_folder, "output",
                                        ("does not exist",)),
    "compare-different-inputs": (case_compare_different_inputs, "evaluate",
                                 ("take different inputs", "x (float) against image (float)")),
    "compare-custom-op": (case_compare_custom_op, "evaluate", ("ONNX Runtime cannot run", "MyRelu")),
    "compare-plot-over-data": (case_compare_plot_over_data, "output", ("would overwrite", "calib.npz")),
    "export-bin-into-own-folder": (_export_into_own_folder("bin"), "output", ("would overwrite", "model.bin")),
    "export-xml-into-own-folder": (_export_into_own_folder("xml"), "output", ("would overwrite", "model.xml")),
    "nan-weight": (case_nan_weight, "load", ("weight 'conv2.weight' of 'conv2' holds NaN", "--ignore-names conv2")),
    "demo-into-a-file": (case_demo_into_a_file, "output", ("results", "it is a file, not a folder")),
    "sparsify-nothing-to-mask": (case_sparsify_nothing_to_mask, "sparsity", ("no weight sparsity can mask",)),
    "sparsify-output-over-data": (case_sparsify_output_over_data, "output", ("would overwrite", "calib.npz")),
    "sparsify-scope-matches-nothing": (case_sparsify_scope_matches_nothing, "config",
                                       ("ignored scope entries match no node", "name 'conv9'")),
    "demo-nan-round-seconds": (case_demo_nan_round_seconds, "benchmark", ("round_seconds", "nan")),
    "prune-target-out-of-range": (case_prune_target_out_of_range, "config", ("'target'", "less than 1")),
    "prune-unreachable-flops": (case_prune_unreachable_flops, "pruning",
                                ("a 99% MAC reduction cannot be reached", "of the MACs")),
    "prune-nothing-prunable": (case_prune_nothing_prunable, "pruning", ("no channel group can be pruned",)),
    "prune-scope-matches-nothing": (case_prune_scope_matches_nothing, "config",
                                    ("ignored scope entries match no node", "name 'conv9'")),
    "compress-weights-nothing-to-compress": (_compress_weights("--ignore-types", "Gemm"), "compress-weights",
                                             ("no constant 2-D table in a MatMul, Gemm or Gather",)),
    "compress-weights-group-not-power-of-two": (_compress_weights("--mode", "int4_sym", "--group-size", "48"),
                                                "config", ("group_size 48 is not a power of two",)),
    "compress-weights-ratio-with-int8": (_compress_weights("--ratio", "0.5"), "config",
                                         ("ratio 0.5 splits weights between 4 and 8 bits", "int4_sym")),
    "compress-weights-output-over-data": (_compress_weights("--data", "calib.npz", "-o", "calib.npz"), "output",
                                          ("would overwrite", "calib.npz")),
    "compress-weights-scope-matches-nothing": (_compress_weights("--ignore-names", "fc9"), "config",
                                               ("ignored scope entries match no node", "name 'fc9'")),
}


@pytest.mark.parametrize(("build", "stage", "fragments"),
                         [pytest.param(*case, id=name) for name, case in CASES.items()])
def test_hostile_input_fails_cleanly(tmp_path: Path, build: Builder, stage: str, fragments: tuple[str, ...]) -> None:
    assert_clean_failure(tmp_path, build(tmp_path), stage, fragments)


@pytest.mark.parametrize(("args", "fragment"), [
    pytest.param(["quantize", "model.onnx", "--data", "calib.npz", "-o", "new.onnx/"], "names a folder",
                 id="output-with-trailing-slash"),
    pytest.param(["compare", "model.onnx", "model.onnx", "--data", "calib.npz", "--samples", "0"],
                 "0 is not in the range x>=1", id="samples-zero"),
    pytest.param(["compare", "model.onnx", "model.onnx", "--data", "calib.npz", "--samples", "-5"],
                 "-5 is not in the range x>=1", id="samples-negative"),
    pytest.param(["demo", "-o", "results", "--rounds", "0"], "0 is not in the range x>=1", id="demo-rounds-zero"),
    pytest.param(["benchmark", "model.onnx", "--batch", "0"], "0 is not in the range x>=1", id="batch-zero"),
])
def test_impossible_option_values_are_usage_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    _tiny(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(tmp_path, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert fragment in result.stderr
    assert snapshot(tmp_path) == before


def test_an_unexpected_exception_is_one_line_naming_the_command_and_debug_shows_the_trace(tmp_path: Path) -> None:
    # A stand-in for any future bug: the API raising something outside the OnnxCompressError family.
    _tiny(tmp_path)
    script = ("import onnxcompress.api, onnxcompress.cli as cli\n"
              "def broken(*args, **kwargs):\n    raise KeyError('bug')\n"
              "onnxcompress.api.quantize = broken\ncli.main()\n")
    args = ["quantize", "model.onnx", "--data", "calib.npz", *QUANTIZE]
    plain = _run_script(tmp_path, script, args)
    assert plain.returncode == 3 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("error: [quantize] unexpected KeyError: 'bug'")
    assert "onnxcompress --debug quantize" in plain.stderr
    debug = _run_script(tmp_path, script, ["--debug", *args])
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "KeyError: 'bug'" in debug.stderr


def _run_script(cwd: Path, script: str, args: list[str]):
    import os
    import subprocess
    import sys

    env = {**os.environ, "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_model_with_an_if_node_quantizes_compares_and_exports(tmp_path: Path) -> None:
    """Control flow the quantizer does not enter still passes through every command."""
    model = build_tiny_cnn()
    graph = model.graph
    relu = next(node for node in graph.node if node.name == "relu2")
    then_branch = helper.make_graph([helper.make_node("Relu", ["add_out"], ["then_out"])], "then", [],
                                    [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Neg", ["add_out"], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    branch = [helper.make_node("ReduceMean", ["add_out"], ["mean"], keepdims=0),
              helper.make_node("Greater", ["mean", "zero"], ["positive"]),
              helper.make_node("If", ["positive"], ["relu2_out"], name="branch", then_branch=then_branch,
                               else_branch=else_branch)]
    nodes = list(graph.node)
    at = nodes.index(relu)
    nodes[at:at + 1] = branch
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.float32), "zero"))
    onnx.save(model, tmp_path / "model.onnx")
    make_calib_npz(tmp_path / "calib.npz")

    for args in (["quantize", "model.onnx", "--data", "calib.npz", *QUANTIZE],
                 ["compare", "model.onnx", "quantized.onnx", "--data", "calib.npz", "--samples", "4"],
                 ["export", "quantized.onnx", "-o", "ir"], ["inspect", "quantized.onnx"]):
        result = run_cli(tmp_path, *args)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (args, result.stderr)
    quantized = onnx.load(tmp_path / "quantized.onnx")
    assert "If" in {node.op_type for node in quantized.graph.node}
    assert sum(node.op_type == "QuantizeLinear" for node in quantized.graph.node) >= 2
    assert (tmp_path / "ir" / "quantized.xml").is_file()


def test_benchmark_runs_a_dynamic_model_on_given_inputs(tmp_path: Path) -> None:
    save_tiny_cnn(tmp_path / "model.onnx", dynamic_spatial=True)
    make_calib_npz(tmp_path / "calib.npz", shape=(3, 12, 20))
    result = run_cli(tmp_path, "benchmark", "model.onnx", *BENCHMARK, "--inputs", "calib.npz", "--batch", "2")
    assert result.returncode == 0, result.stderr
    assert "model/ort/latency" in result.stdout


def _loop_only(tmp: Path) -> list[str]:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4])])
    loop = helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], body=body)
    onnx.save(_model([loop], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                     [numpy_helper.from_array(np.array(2, np.int64), "trips"),
                      numpy_helper.from_array(np.array(True), "keep_going")]), tmp / "model.onnx")
    np.savez(tmp / "calib.npz", x=np.ones((3, 1, 4), np.float32)[:, 0])
    return ["quantize", "model.onnx", "--data", "calib.npz", *QUANTIZE]


def _everything_ignored(tmp: Path) -> list[str]:
    _tiny(tmp)
    return ["quantize", "model.onnx", "--data", "calib.npz", "--ignore-types", "Conv,Gemm", *QUANTIZE]


def _embedding_with_full_bias_correction(tmp: Path) -> list[str]:
    rng = np.random.default_rng(0)
    onnx.save(_model([helper.make_node("Gather", ["table", "ids"], ["embedded"]),
                      helper.make_node("MatMul", ["embedded", "w"], ["y"])],
                     [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4])],
                     [numpy_helper.from_array(rng.random((10, 8)).astype(np.float32), "table"),
                      numpy_helper.from_array(rng.random((8, 4)).astype(np.float32), "w")]), tmp / "model.onnx")
    np.savez(tmp / "calib.npz", ids=rng.integers(0, 10, (4, 5)))
    return ["quantize", "model.onnx", "--data", "calib.npz", "--bias-correction", "full", *QUANTIZE]


@pytest.mark.parametrize(("build", "note"), [
    pytest.param(_loop_only, "note: calibration: no tensor needs statistics", id="loop-only"),
    pytest.param(_everything_ignored, "note: nothing to quantize", id="every-layer-ignored"),
    pytest.param(_embedding_with_full_bias_correction, "note: bias correction: no tensor needs statistics",
                 id="embedding-full-bias-correction"),
])
def test_nothing_to_measure_skips_calibration_and_says_so(tmp_path: Path, build: Builder, note: str) -> None:
    result = run_cli(tmp_path, *build(tmp_path))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert note in result.stderr
    onnx.checker.check_model(onnx.load(tmp_path / "quantized.onnx"))


def test_export_accepts_a_hidden_file_name(tmp_path: Path) -> None:
    save_tiny_cnn(tmp_path / ".hidden.onnx")
    result = run_cli(tmp_path, "export", ".hidden.onnx", "-o", "ir")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == [".hidden.bin", ".hidden.xml"]


def test_ctrl_c_during_export_leaves_a_complete_ir_or_nothing(tmp_path: Path) -> None:
    """Interrupted at several moments (during start-up, reading, converting, writing): interrupted or success, no
    traceback, and never a lone .xml or .bin or a staging folder."""
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(0)
    onnx.save(_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])],
                     [numpy_helper.from_array(rng.random((2048, 2048)).astype(np.float32), "w")]),
              tmp_path / "model.onnx")
    for delay in (0.5, 1.0, 1.5, 2.0, 3.0):
        process = subprocess.Popen([sys.executable, "-m", "onnxcompress.cli", "export", "model.onnx", "-o", "ir"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        # -SIGINT: interrupted before Python had installed its handler, which ends the process at once.
        assert process.returncode in (0, 130, -signal.SIGINT) and "Traceback" not in stderr, (delay, stderr)
        left = sorted(p.name for p in tmp_path.iterdir())
        ir = sorted(p.name for p in (tmp_path / "ir").iterdir()) if (tmp_path / "ir").exists() else []
        assert left in (["model.onnx"], ["ir", "model.onnx"]) and ir in ([], ["model.bin", "model.xml"]), (delay, left, ir)
        assert process.returncode != 0 or ir == ["model.bin", "model.xml"]
        if (tmp_path / "ir").exists():
            for path in (tmp_path / "ir").iterdir():
                path.unlink()
            (tmp_path / "ir").rmdir()
