"""Accuracy control for weight compression moves the fewest 4-bit tables to INT8 that meet the budget, measured
from the FP32 model; the file it writes scores what the search said; budgets no table set meets and modes without
4-bit tables are refused with the reason."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_cli_errors import run_cli

from onnxcompress.api import compress_weights_with_accuracy_control
from onnxcompress.config import WeightMode
from onnxcompress.errors import ConfigError
from onnxcompress.evaluation.accuracy_control import AccuracyControlError
from onnxcompress.evaluation.metrics import EvalSet, resolve_metric

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
from test_weight_compression import build_encoder, dequantize_nodes, ids  # noqa: E402

SETTINGS = {"mode": "int4_sym", "group_size": 32, "workers": 1, "cache": False, "speed": False, "progress": False}


@pytest.fixture()
def encoder(tmp_path: Path) -> tuple[Path, Path]:
    onnx.save(build_encoder(), tmp_path / "encoder.onnx")
    np.savez(tmp_path / "eval.npz", ids=ids(64, seed=3))
    return tmp_path / "encoder.onnx", tmp_path / "eval.npz"


def _cosine(model: Path, eval_data: Path) -> float:
    return resolve_metric("cosine", EvalSet.from_arrays(dict(np.load(eval_data)), ["ids"]), model.parent /
                          "encoder.onnx")(str(model))


def test_the_fewest_tables_move_to_int8_and_the_file_meets_the_budget(encoder: tuple[Path, Path]) -> None:
    model, eval_data = encoder
    loose = compress_weights_with_accuracy_control(model, metric="cosine", max_drop=0.1, eval_data=eval_data,
                                                   **SETTINGS)
    assert loose.control.labels == () and loose.compression.count(WeightMode.INT4_SYM) == 2  # up and down
    all_four = loose.control.quantized_score
    budget = (1 - all_four) / 4  # only one of the two 4-bit tables, in INT8, recovers that much
    result = compress_weights_with_accuracy_control(model, metric="cosine", max_drop=budget, eval_data=eval_data,
                                                    **{**SETTINGS, "speed": True})
    control = result.control
    assert [unit.label for unit in control.speed.units] == list(control.labels)
    assert all(ms > 0 for ms in [*control.speed.final_ms.values(), *control.speed.compressed_ms.values()])
    assert all(math.isfinite(ms) for ms in control.speed.units[0].ms.values())
    assert control.float_score == pytest.approx(1.0, abs=1e-6) and len(control.labels) == 1
    assert 1 - control.final_score <= budget < 1 - control.quantized_score
    moved = control.labels[0]
    assert {layer.node: layer.mode for layer in result.compression.layers}[moved] is WeightMode.INT8
    saved = result.compression.save(model.parent / "controlled.onnx")
    assert _cosine(saved, eval_data) == pytest.approx(control.final_score, abs=1e-6)
    levels = {t.name: t.data_type for t in result.compression.model.graph.initializer}
    dq = dequantize_nodes(result.compression.model)
    assert levels[dq[moved].input[0]] == onnx.TensorProto.INT8
    assert {levels[dq[n].input[0]] for n in ("up_proj", "down_proj") if n != moved} == {onnx.TensorProto.INT4}


def test_an_unreachable_budget_and_a_mode_without_4_bit_tables_are_refused(encoder: tuple[Path, Path]) -> None:
    model, eval_data = encoder
    with pytest.raises(AccuracyControlError, match=r"with all 2 allowed 4-bit tables in INT8 the metric is .* from "
                                                   r"the float model's 1, over the budget 0"):
        compress_weights_with_accuracy_control(model, metric="cosine", max_drop=0.0, eval_data=eval_data,
                                               **SETTINGS)
    with pytest.raises(ConfigError, match="moves 4-bit tables to INT8; mode int8 has none"):
        compress_weights_with_accuracy_control(model, metric="cosine", max_drop=0.01, eval_data=eval_data,
                                               **{**SETTINGS, "mode": "int8"})


def test_the_command_with_a_custom_metric_ranks_by_4_bit_error(encoder: tuple[Path, Path]) -> None:
    model, eval_data = encoder
    folder = model.parent
    (folder / "score.py").write_text(
        "import numpy as np, onnxruntime as ort\n"
        f"IDS = np.load({str(eval_data)!r})['ids']\n"
        f"REF = ort.InferenceSession({str(model)!r}).run(None, {{'ids': IDS}})[0]\n"
        "def cosine(path):\n"
        "    out = ort.InferenceSession(path).run(None, {'ids': IDS})[0]\n"
        "    return float(np.mean(np.sum(out * REF, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(REF, axis=1)))\n")
    result = run_cli(folder, "compress-weights", str(model), "-o", "out.onnx", "--mode", "int4_sym", "--group-size",
                     "32", "--max-drop", "0.1", "--metric", "score.py:cosine", "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "moved to INT8: none" in result.stdout and (folder / "out.onnx").exists()
    refused = run_cli(folder, "compress-weights", str(model), "-o", "tight.onnx", "--mode", "int4_sym",
                      "--max-drop", "0", "--metric", "score.py:cosine", "--workers", "1", "--no-progress")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "4-bit tables in INT8" in refused.stderr and not (folder / "tight.onnx").exists()
    lone = run_cli(folder, "compress-weights", str(model), "--workers", "2")
    assert lone.returncode != 0 and "need --max-drop and --metric" in lone.stderr


def test_beyond_the_measured_units_only_the_total_speed_is_measured(encoder: tuple[Path, Path], monkeypatch) -> None:
    from onnxcompress.algorithms.weight_compression.oneshot import plan_compression
    from onnxcompress.config import WeightCompressionConfig
    from onnxcompress.evaluation import speed

    model, eval_data = encoder
    planned = plan_compression(onnx.load(model), WeightCompressionConfig(mode="int4_sym", group_size=32),
                               progress=False)
    monkeypatch.setattr(speed, "MEASURED_UNITS", 1)
    cost = speed.speed_cost(planned.candidates(), planned.plan.four_bit, {"ids": ids(1)}, rounds=1,
                            round_seconds=0.05, progress=False)
    assert [unit.label for unit in cost.units] == ["up_proj", "down_proj"]
    assert all(math.isnan(ms) for unit in cost.units for ms in unit.ms.values())
    assert "not measured" in cost.format() and "each unit is measured when at most 1 were relaxed" in cost.format()
