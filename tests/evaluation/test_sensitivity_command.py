"""`onnxcompress sensitivity` ranks the units with their noise, writes its report and plot, and keeps the scores so
that accuracy control with the same model, data, settings and metric measures none of them again; changing the
metric's file changes the key."""

from __future__ import annotations

from pathlib import Path

from test_cli_errors import run_cli

from onnxcompress.evaluation.cache import ScoreCache

MODELS = Path(__file__).resolve().parents[2] / "models" / "data"


def _accuracy_control(tmp_path: Path, *extra: str):
    return run_cli(tmp_path, "quantize", str(MODELS / "digits_mobile.onnx"), "-o", "controlled.onnx", "--max-drop",
                   "0.001", "--metric", "top1", "--eval-data", str(MODELS / "digits_test.npz"), "--workers", "1",
                   "--no-speed", "--no-progress", *extra)


def test_the_report_ranks_the_units_and_accuracy_control_reuses_its_scores(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "sensitivity", str(MODELS / "digits_mobile.onnx"), "--metric", "top1", "--eval-data",
                     str(MODELS / "digits_test.npz"), "--report", "sensitivity.md", "--plot", "sensitivity.png",
                     "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "metric: float 0.986, quantized 0.984"
    # The one group whose float recovers most is also the noisiest of the units shown (noise from float kernels:
    # compared, not printed digits, so the check holds on every CPU).
    gain, noise, kind, unit = lines[2].split(" | ")
    assert (gain, kind, unit) == ("+0.004", "activations", "block1.se.pool, block1.dw_hardswish")
    assert float(noise) > max(float(line.split(" | ")[1]) for line in lines[3:] if " | " in line)
    report = (tmp_path / "sensitivity.md").read_text()
    assert report.count("\n| ") == 1 + 61  # the rule and every one of the 61 units (23 weights, 38 groups)
    assert (tmp_path / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    control = _accuracy_control(tmp_path)
    assert control.returncode == 0, control.stderr
    assert "final 0.988 after 0 evaluations (63 more from the score cache); in float: block1.se.pool, " \
           "block1.dw_hardswish" in control.stdout
    again = _accuracy_control(tmp_path, "--no-cache")
    assert "final 0.988 after 63 evaluations; in float: block1.se.pool, block1.dw_hardswish" in again.stdout


def test_the_key_follows_the_metric_file_and_the_data(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("def f(path):\n    return 1.0\n")
    (tmp_path / "data.npz").write_bytes(b"one")
    first = ScoreCache.keyed([tmp_path / "m.py", "f", tmp_path / "data.npz"])
    assert ScoreCache.keyed([tmp_path / "m.py", "f", tmp_path / "data.npz"]).path == first.path
    (tmp_path / "m.py").write_text("def f(path):\n    return 2.0\n")
    assert ScoreCache.keyed([tmp_path / "m.py", "f", tmp_path / "data.npz"]).path != first.path
    assert ScoreCache.keyed([None, "f"]).path is None  # an unnamed part: nothing on disk
    first.put(frozenset({"weight:conv"}), 0.5)
    first.save()
    assert ScoreCache(first.path).get(frozenset({"weight:conv"})) == 0.5
    first.path.write_text("not json")
    assert ScoreCache(first.path).scores == {}  # a damaged file is measured again, not an error


def test_four_bit_and_hessian_columns_agree_on_the_weight_4_bits_hurt_most(tmp_path: Path, runtime) -> None:
    """Each weight alone in 4 bits (measured) and its HAWQ-v2 cost (Hessian trace through the training runtime ×
    4-bit error) both put the first convolution first; activation rows have no such columns."""
    result = run_cli(tmp_path, "sensitivity", str(MODELS / "digits_cnn.onnx"), "--metric", "top1", "--eval-data",
                     str(MODELS / "digits_test.npz"), "--four-bit", "--hessian", "--report", "report.md",
                     "--workers", "1", "--no-cache", "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in (tmp_path / "report.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| rank")]
    weights = {cells[1]: (float(cells[6]), float(cells[7]), float(cells[8])) for cells in rows
               if cells[2] == "weight"}
    assert set(weights) == {"conv1", "conv2", "res_conv1", "res_conv2", "conv3", "fc"}
    assert max(weights, key=lambda w: weights[w][2]) == "conv1"
    assert weights["conv1"][0] == max(drop for drop, _, _ in weights.values())
    assert all(cells[6:] == ["-", "-", "-"] for cells in rows if cells[2] == "activations")
