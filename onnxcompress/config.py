"""Typed, validated configuration. The CLI, YAML/JSON config files and the Python API all build these objects.

Unknown keys are errors (a misspelt option must never be ignored silently), and every field says what it does.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onnxcompress.algorithms.quantization.ranges import RangeMethod
from onnxcompress.errors import ConfigError


class Preset(str, enum.Enum):
    """NNCF's presets: `performance` quantizes activations symmetrically, `mixed` asymmetrically."""

    PERFORMANCE = "performance"
    MIXED = "mixed"


class ModelType(str, enum.Enum):
    CNN = "cnn"
    TRANSFORMER = "transformer"


class BiasCorrection(str, enum.Enum):
    NONE = "none"
    #: Shift each bias by the weight error times the mean input (no extra inference pass).
    FAST = "fast"
    #: Shift each bias by the per-channel mean output error measured on the quantized model (one more pass).
    FULL = "full"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class IgnoredScope(_Strict):
    """Nodes that stay in float. Every entry must match at least one node, or quantization stops with an error."""

    names: tuple[str, ...] = Field((), description="Exact node names to leave in float.")
    patterns: tuple[str, ...] = Field((), description="Regular expressions matched (re.fullmatch) against node names.")
    types: tuple[str, ...] = Field((), description="Op types (e.g. 'Gemm') whose nodes all stay in float.")

    @property
    def empty(self) -> bool:
        return not (self.names or self.patterns or self.types)


class QuantizationConfig(_Strict):
    """Post-training INT8 quantization settings."""

    preset: Preset = Field(Preset.PERFORMANCE, description="performance: symmetric activations; mixed: asymmetric.")
    subset_size: int = Field(300, ge=1, description="Number of calibration samples to use (the first N).")
    calibration: RangeMethod = Field(
        RangeMethod.MINMAX, description="How activation ranges are estimated: minmax, mean_minmax, percentile, mse.")
    percentile: float = Field(99.999, gt=50.0, le=100.0, description="Percentile used by calibration=percentile.")
    model_type: ModelType = Field(
        ModelType.CNN, description="transformer keeps LayerNorm/Softmax inputs and residual Adds in float.")
    ignored_scope: IgnoredScope = Field(default_factory=IgnoredScope, description="Nodes to leave in float.")
    bias_correction: BiasCorrection = Field(
        BiasCorrection.FAST, description="Correct the mean output shift that weight quantization causes.")
    smooth_quant_alpha: float | None = Field(
        None, ge=0.0, le=1.0,
        description="SmoothQuant migration strength for MatMul inputs (transformers); None disables it.")
    weight_bits: int = Field(8, ge=2, le=8, description="Bit width of weights (symmetric per-channel).")
    batch_size: int = Field(4, ge=1, description="Calibration samples fed to ONNX Runtime at once when shapes allow.")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> QuantizationConfig:
        """Read a YAML or JSON file; `overrides` (already validated CLI values) win over the file."""
        data = read_config_file(path)
        scope_file, scope_flags = data.get("ignored_scope"), overrides.get("ignored_scope")
        if isinstance(scope_file, dict) and isinstance(scope_flags, dict):
            # Ignored-scope entries add up: flags extend the file's lists instead of replacing them.
            overrides = {**overrides, "ignored_scope": {
                key: (*scope_file.get(key, ()), *scope_flags.get(key, ()))
                for key in {*scope_file, *scope_flags}}}
        return cls.build({**data, **overrides}, source=str(path))

    @classmethod
    def build(cls, values: dict[str, Any], *, source: str = "config") -> QuantizationConfig:
        """Validate `values`, turning pydantic's errors into one ConfigError that names every bad key."""
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError(f"invalid {source}: {_describe(error)}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return data


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{where}'")
        else:
            problems.append(f"'{where}': {item['msg']}")
    return "; ".join(problems)
