"""QuantizationConfig: defaults, YAML/JSON files, overrides, and the errors for bad keys and values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_cnn
from pydantic import ValidationError

from onnxcompress.algorithms.quantization.ranges import RangeMethod
from onnxcompress.config import (BiasCorrection, IgnoredScope, ModelType, Preset, QuantizationConfig,
                                 read_config_file)
from onnxcompress.errors import ConfigError, OnnxCompressError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = QuantizationConfig()
    assert config.preset is Preset.PERFORMANCE
    assert config.subset_size == 300
    assert config.calibration is RangeMethod.MINMAX
    assert config.percentile == 99.999
    assert config.model_type is ModelType.CNN
    assert config.ignored_scope == IgnoredScope() and config.ignored_scope.empty
    assert config.bias_correction is BiasCorrection.FAST
    assert config.smooth_quant_alpha is None
    assert config.weight_bits == 8
    assert config.batch_size == 2
    assert QuantizationConfig.build({}) == config


def test_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        QuantizationConfig().subset_size = 5  # type: ignore[misc]


def test_from_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", """
preset: mixed
subset_size: 50
calibration: percentile
percentile: 99.9
model_type: transformer
bias_correction: none
smooth_quant_alpha: 0.5
ignored_scope:
  names: [conv1, fc]
  patterns: ["block\\\\d+/.*"]
  types: [Softmax]
""")
    config = QuantizationConfig.from_file(path)
    assert config.preset is Preset.MIXED
    assert config.subset_size == 50
    assert config.calibration is RangeMethod.PERCENTILE
    assert config.percentile == 99.9
    assert config.model_type is ModelType.TRANSFORMER
    assert config.bias_correction is BiasCorrection.NONE
    assert config.smooth_quant_alpha == 0.5
    assert config.ignored_scope == IgnoredScope(names=("conv1", "fc"), patterns=(r"block\d+/.*",),
                                                types=("Softmax",))
    assert not config.ignored_scope.empty
    # Keys the file does not set keep their defaults.
    assert config.weight_bits == 8 and config.batch_size == 2


def test_from_json(tmp_path: Path) -> None:
    path = write(tmp_path, "config.json", json.dumps(
        {"preset": "mixed", "calibration": "mse", "batch_size": 8, "ignored_scope": {"types": ["Gemm"]}}))
    config = QuantizationConfig.from_file(str(path))
    assert config.preset is Preset.MIXED
    assert config.calibration is RangeMethod.MSE
    assert config.batch_size == 8
    assert config.ignored_scope.types == ("Gemm",) and config.ignored_scope.names == ()
    assert config.subset_size == 300


def test_json_file_is_parsed_as_json(tmp_path: Path) -> None:
    # A YAML-only construct in a .json file is an error, not silently accepted.
    path = write(tmp_path, "config.json", "preset: mixed\n")
    with pytest.raises(ConfigError, match=r"config file .*config\.json is not valid YAML/JSON"):
        QuantizationConfig.from_file(path)


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    assert QuantizationConfig.from_file(write(tmp_path, "config.yaml", "# nothing set\n")) == QuantizationConfig()


def test_cli_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "preset: mixed\nsubset_size: 50\ncalibration: mse\n")
    config = QuantizationConfig.from_file(path, preset="performance", subset_size=10)
    assert config.preset is Preset.PERFORMANCE
    assert config.subset_size == 10
    assert config.calibration is RangeMethod.MSE  # not overridden: the file's value stays


def test_overrides_are_validated_too(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "subset_size: 50\n")
    with pytest.raises(ConfigError, match=r"'subset_size': Input should be greater than or equal to 1"):
        QuantizationConfig.from_file(path, subset_size=0)


@pytest.mark.parametrize(("text", "key"), [
    ("presett: mixed\n", "presett"),
    ("preset: mixed\nsubset: 10\n", "subset"),
    ("ignored_scope:\n  namez: [conv1]\n", "ignored_scope.namez"),
    ("ignored_scope:\n  names: [conv1]\n  type: [Gemm]\n", "ignored_scope.type"),
], ids=["top-level", "next-to-valid-keys", "nested", "nested-next-to-valid-keys"])
def test_unknown_keys_are_errors_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, "config.yaml", text)
    with pytest.raises(ConfigError, match=rf"^\[config\] invalid .*config\.yaml: unknown key '{key}'$") as caught:
        QuantizationConfig.from_file(path)
    assert caught.value.stage == "config" and isinstance(caught.value, OnnxCompressError)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        QuantizationConfig.build({"presett": "mixed", "subset_size": 0, "ignored_scope": {"nmes": ["a"]}},
                                 source="options")
    message = str(caught.value)
    assert message.startswith("[config] invalid options: ")
    for part in ("unknown key 'presett'", "'subset_size': Input should be greater than or equal to 1",
                 "unknown key 'ignored_scope.nmes'"):
        assert part in message


@pytest.mark.parametrize(("values", "message"), [
    ({"preset": "fast"}, r"'preset': Input should be 'performance' or 'mixed'"),
    ({"preset": "MIXED"}, r"'preset': Input should be 'performance' or 'mixed'"),
    ({"calibration": "avg"}, r"'calibration': Input should be 'minmax', 'mean_minmax', 'percentile' or 'mse'"),
    ({"model_type": "rnn"}, r"'model_type': Input should be 'cnn' or 'transformer'"),
    ({"bias_correction": "yes"}, r"'bias_correction': Input should be 'none', 'fast' or 'full'"),
], ids=["preset", "preset-case", "calibration", "model_type", "bias_correction"])
def test_bad_enum_values(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantizationConfig.build(values)


@pytest.mark.parametrize(("values", "key"), [
    ({"subset_size": 0}, "subset_size"),
    ({"subset_size": -5}, "subset_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"weight_bits": 9}, "weight_bits"),
    ({"weight_bits": 1}, "weight_bits"),
    ({"percentile": 50}, "percentile"),
    ({"percentile": 100.5}, "percentile"),
    ({"smooth_quant_alpha": 1.5}, "smooth_quant_alpha"),
    ({"subset_size": "many"}, "subset_size"),
    ({"ignored_scope": ["conv1"]}, "ignored_scope"),
])
def test_impossible_values(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^\[config\] invalid config: '{key}': "):
        QuantizationConfig.build(values)


def test_subset_size_zero_in_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "subset_size: 0\n")
    with pytest.raises(ConfigError, match=r"invalid .*config\.yaml: 'subset_size': .*greater than or equal to 1"):
        QuantizationConfig.from_file(path)


def test_boundary_values_are_accepted() -> None:
    config = QuantizationConfig.build({"subset_size": 1, "weight_bits": 2, "percentile": 100,
                                       "smooth_quant_alpha": 0.0, "batch_size": 1})
    assert (config.subset_size, config.weight_bits, config.percentile, config.smooth_quant_alpha,
            config.batch_size) == (1, 2, 100.0, 0.0, 1)


@pytest.mark.parametrize("text", ["- preset\n- mixed\n", "just a string\n", "42\n"],
                         ids=["list", "string", "number"])
def test_non_mapping_yaml_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "config.yaml", text)
    with pytest.raises(ConfigError, match=r"config file .*config\.yaml must hold a mapping of option names"):
        QuantizationConfig.from_file(path)


def test_invalid_yaml_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "preset: [mixed,\n")
    with pytest.raises(ConfigError, match=r"config file .*config\.yaml is not valid YAML/JSON"):
        QuantizationConfig.from_file(path)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nothere\.yaml: No such file or directory"):
        QuantizationConfig.from_file(tmp_path / "nothere.yaml")


def test_folder_instead_of_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"cannot read config file .*config\.yaml: Is a directory"):
        read_config_file(tmp_path / "config.yaml")


def test_undecodable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"preset: \xff\xfe mixed\n")
    with pytest.raises(ConfigError, match=r"config\.yaml"):
        QuantizationConfig.from_file(path)


def test_ignored_scope_accepts_names_of_nodes_folded_by_preprocessing() -> None:
    from onnxcompress.api import quantize

    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}]
    quantized = quantize(build_tiny_cnn(), feeds, ignored_scope={"names": ["bn1"]}, progress=False)
    assert any(node.op_type == "QuantizeLinear" for node in quantized.graph.node)


def test_smooth_quant_is_on_for_transformers_by_default_and_can_be_turned_off():
    from onnxcompress.config import TRANSFORMER_SMOOTH_QUANT_ALPHA, QuantizationConfig

    assert QuantizationConfig().effective_smooth_quant_alpha is None
    transformer = QuantizationConfig(model_type="transformer")
    assert transformer.effective_smooth_quant_alpha == TRANSFORMER_SMOOTH_QUANT_ALPHA
    assert QuantizationConfig(model_type="transformer", smooth_quant_alpha=0.5).effective_smooth_quant_alpha == 0.5
    assert QuantizationConfig(model_type="transformer", smooth_quant=False).effective_smooth_quant_alpha is None
    with pytest.raises(ConfigError, match="smooth_quant is false but smooth_quant_alpha is set"):
        QuantizationConfig.build({"smooth_quant": False, "smooth_quant_alpha": 0.8})
