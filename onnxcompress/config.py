"""Typed, validated configuration. The CLI, YAML/JSON config files and the Python API all build these objects.

Unknown keys are errors (a misspelt option must never be ignored silently), and every field says what it does.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

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


class Target(str, enum.Enum):
    """The CPUs a quantized file must run correctly on."""

    #: Every x86 CPU. Without VNNI, ONNX Runtime's u8×s8 kernels add products in int16 pairs and can saturate;
    #: weights of those kernels keep each pair within int16, at a small cost in weight resolution.
    PORTABLE = "portable"
    #: Only CPUs with VNNI (AVX512-VNNI, AVX-VNNI) or AMX: full-range weights. On older CPUs ONNX Runtime's integer
    #: kernels may saturate and lose accuracy (OpenVINO is unaffected).
    VNNI = "vnni"


#: NNCF's default for MatMuls in transformer mode; on a real MiniLM encoder it beats 0.5 and 0.8 (docs/benchmarks.md).
TRANSFORMER_SMOOTH_QUANT_ALPHA = 0.95


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
    bias_correction_subset_size: int = Field(
        100, ge=1, description="Calibration samples (the first N) the full bias correction's extra pass runs on; "
                               "output means settle long before ranges do.")
    smooth_quant_alpha: float | None = Field(
        None, ge=0.0, le=1.0,
        description="SmoothQuant migration strength for the inputs of MatMuls with constant weights. None: "
                    f"{TRANSFORMER_SMOOTH_QUANT_ALPHA} for model_type transformer, off for cnn.")
    smooth_quant: bool = Field(True, description="false turns SmoothQuant off, for transformers too.")
    weight_bits: int = Field(8, ge=2, le=8, description="Bit width of weights (symmetric per-channel).")
    layer_weight_bits: dict[str, Annotated[int, Field(ge=2, le=8)]] = Field(
        default_factory=dict,
        description="Bit width (2-8) of the weights of these nodes, by node name, instead of weight_bits: per-layer "
                    "mixed precision, e.g. what quantize --max-size chose. Weights of 4 bits or fewer are stored as "
                    "INT4 (the model moves to opset 21).")
    target: Target = Field(
        Target.PORTABLE,
        description="portable: exact in ONNX Runtime and OpenVINO on every x86 CPU; vnni: full-range weights for "
                    "CPUs with VNNI or AMX only (ONNX Runtime's integer kernels can saturate on older CPUs).")
    batch_size: int = Field(
        2, ge=1, description="Calibration samples per ONNX Runtime run when shapes allow (two runs go at once on "
                             "machines with two cores or more).")

    @model_validator(mode="after")
    def _smooth_quant_is_consistent(self) -> QuantizationConfig:
        if not self.smooth_quant and self.smooth_quant_alpha is not None:
            raise ValueError("smooth_quant is false but smooth_quant_alpha is set: drop one of them")
        return self

    def weight_bits_of(self, node: str) -> int:
        """The bit width of `node`'s weight."""
        return self.layer_weight_bits.get(node, self.weight_bits)

    @property
    def four_bit_storage(self) -> bool:
        """Whether some weight has 4 bits or fewer, so that the quantized model stores INT4 (opset 21)."""
        return self.weight_bits <= 4 or any(bits <= 4 for bits in self.layer_weight_bits.values())

    @property
    def effective_smooth_quant_alpha(self) -> float | None:
        """The SmoothQuant strength that applies, or None when SmoothQuant is off."""
        if not self.smooth_quant:
            return None
        if self.smooth_quant_alpha is None and self.model_type is ModelType.TRANSFORMER:
            return TRANSFORMER_SMOOTH_QUANT_ALPHA
        return self.smooth_quant_alpha

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> QuantizationConfig:
        """Read a YAML or JSON file; `overrides` (already validated CLI values) win over the file."""
        data = read_config_file(path)
        scope_file, scope_flags = data.get("ignored_scope"), overrides.get("ignored_scope")
        if scope_file is not None and scope_flags is not None:
            if isinstance(scope_file, dict) and all(isinstance(v, list) for v in scope_file.values()):
                # Ignored-scope entries add up: flags extend the file's lists instead of replacing them.
                overrides = {**overrides, "ignored_scope": {
                    key: (*scope_file.get(key, ()), *scope_flags.get(key, ()))
                    for key in {*scope_file, *scope_flags}}}
            else:  # a malformed section is validated as written, not replaced by the flags
                overrides = {key: value for key, value in overrides.items() if key != "ignored_scope"}
        return cls.build({**data, **overrides}, source=str(path))

    @classmethod
    def build(cls, values: dict[str, Any], *, source: str = "config") -> QuantizationConfig:
        """Validate `values`, turning pydantic's errors into one ConfigError that names every bad key."""
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError(f"invalid {source}: {_describe(error)}") from None


#: Far beyond any real config (the deepest has 3 levels); deeper ones are refused before validation recurses.
MAX_CONFIG_DEPTH = 32


def _depth(value: Any) -> int:
    """Levels of nested mappings and lists, without recursion; a YAML alias shared many times is measured once
    (so alias bombs stay cheap) and an alias cycle counts as unbounded."""
    heights: dict[int, int] = {}
    in_progress: set[int] = set()
    pending: list[tuple[Any, bool]] = [(value, False)]
    while pending:
        item, children_done = pending.pop()
        if not isinstance(item, dict | list) or id(item) in heights:
            continue
        children = [c for c in (item.values() if isinstance(item, dict) else item) if isinstance(c, dict | list)]
        if children_done:
            in_progress.discard(id(item))
            heights[id(item)] = 1 + max((heights[id(c)] for c in children), default=0)
            continue
        if id(item) in in_progress or any(id(c) in in_progress for c in children):
            return sys.maxsize
        in_progress.add(id(item))
        pending.append((item, True))
        pending.extend((child, False) for child in children)
    return heights.get(id(value), 0)


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
    except RecursionError:
        raise ConfigError(f"config file {path} nests deeper than the parser can follow") from None
    if _depth(data) > MAX_CONFIG_DEPTH:
        raise ConfigError(f"config file {path} nests deeper than {MAX_CONFIG_DEPTH} levels, or a YAML alias refers "
                          "to itself")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return data


def _describe(error: ValidationError) -> str:
    items = error.errors()
    problems = []
    for item in items:
        loc = _without_union_tags(item["loc"])
        if item["type"] == "too_short" and any(len(other["loc"]) > len(item["loc"]) and
                                               other["loc"][:len(item["loc"])] == item["loc"] for other in items):
            continue  # a list whose failing members were dropped; those failures are reported
        where = ".".join(str(p) for p in loc) or "<root>"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{where}'")
        elif item["type"] == "union_tag_invalid":
            problems.append(f"'{where}.algorithm': unknown algorithm '{item['ctx']['tag']}' (known: "
                            f"{item['ctx']['expected_tags']})")
        else:
            problems.append(f"'{where}': {item['msg']}")
    return "; ".join(problems)


def _without_union_tags(loc: tuple) -> tuple:
    """pydantic puts the algorithm tag after a list index (compression.0.quantization.preset); users wrote
    compression.0.preset."""
    return tuple(part for i, part in enumerate(loc)
                 if not (i and isinstance(loc[i - 1], int) and part in ALGORITHM_NAMES))


class QuantizationAwareTrainingConfig(QuantizationConfig):
    """Quantization-aware training: the post-training settings pick placement and initial ranges, then the
    ranges train with the weights (NNCF paper §4.1)."""

    algorithm: Literal["quantization"] = Field("quantization", description="Compression algorithm name.")
    quantizer_lr: float = Field(
        1e-3, gt=0.0,
        description="Learning rate of the quantizer ranges, relative to their calibrated size (the model's "
                    "weights use training.learning_rate; schedules scale both).")

    @property
    def calibration_samples(self) -> int:
        """Training samples the algorithm calibrates on before training."""
        return self.subset_size

    def post_training(self) -> QuantizationConfig:
        """The post-training part of these settings (placement, calibration, bias correction)."""
        values = self.model_dump(exclude={"algorithm", "quantizer_lr"})
        return QuantizationConfig.model_validate(values)


class SparsityImportance(str, enum.Enum):
    """How a weight's importance is measured when choosing which weights to zero."""

    #: |w|.
    ABS = "abs"
    #: |w| / ‖W‖₂ of its layer, so that one global threshold compares layers of different scale.
    NORMED_ABS = "normed_abs"


class SparsityThreshold(str, enum.Enum):
    """Where the sparsity level applies."""

    #: Each layer loses the same fraction of its weights.
    PER_LAYER = "per_layer"
    #: The fraction is over all sparsified weights together; one importance threshold for every layer.
    GLOBAL = "global"


class SparsitySchedule(str, enum.Enum):
    """How the sparsity level rises from `initial_level` to `target_level` (NNCF paper §4.3)."""

    #: level(t) = target - (target - initial)·(1 - t/T)^power, t counted in epochs (or steps).
    POLYNOMIAL = "polynomial"
    #: The remaining density shrinks by a constant factor per epoch: 1 - level(t) = (1 - initial)·r^t, r chosen
    #: so that level(T) = target.
    EXPONENTIAL = "exponential"
    #: Raise the level by `step` after every `patience` epochs whose measured sparsity is within `eps` of the
    #: current level (for RB sparsity, whose masks lag behind the target), up to the target.
    ADAPTIVE = "adaptive"
    #: Levels `multistep_levels` from the epochs `multistep_epochs` on.
    MULTISTEP = "multistep"


class SparsityScheduleConfig(_Strict):
    """The level schedule of a sparsity algorithm, in epochs of fine-tuning."""

    schedule: SparsitySchedule = Field(SparsitySchedule.POLYNOMIAL, description="Schedule kind.")
    initial_level: float = Field(0.0, ge=0.0, lt=1.0, description="Sparsity level of the first epoch.")
    target_level: float = Field(0.5, ge=0.0, lt=1.0, description="Sparsity level reached at `target_epoch`.")
    target_epoch: int = Field(
        1, ge=0, description="Epoch (0 = before training) from which the target level holds "
                             "(polynomial, exponential).")
    power: float = Field(3.0, gt=0.0, description="polynomial: exponent of the remaining-fraction curve.")
    update_per_step: bool = Field(
        False, description="polynomial/exponential: move the level every training step, not only per epoch.")
    multistep_epochs: tuple[int, ...] = Field(
        (), description="multistep: increasing epochs from which each of `multistep_levels` holds.")
    multistep_levels: tuple[float, ...] = Field((), description="multistep: the levels, one per epoch entry.")
    patience: int = Field(1, ge=1, description="adaptive: epochs at one level before the next step.")
    step: float = Field(0.05, gt=0.0, lt=1.0, description="adaptive: level increment.")
    eps: float = Field(0.01, gt=0.0, lt=1.0, description="adaptive: how close the measured sparsity must be.")
    freeze_epoch: int | None = Field(
        None, ge=0, description="Epoch after which the masks stop changing (default: never before the end).")

    @model_validator(mode="after")
    def _levels_are_consistent(self) -> SparsityScheduleConfig:
        if self.target_level < self.initial_level:
            raise ValueError(f"target_level {self.target_level} is below initial_level {self.initial_level}")
        if self.schedule is SparsitySchedule.MULTISTEP:
            if not self.multistep_epochs or len(self.multistep_epochs) != len(self.multistep_levels):
                raise ValueError("multistep needs multistep_epochs and multistep_levels of the same length")
            if list(self.multistep_epochs) != sorted(set(self.multistep_epochs)) or self.multistep_epochs[0] < 0:
                raise ValueError("multistep_epochs must increase, from 0 or later")
            if any(not 0.0 <= level < 1.0 for level in self.multistep_levels):
                raise ValueError("multistep_levels must lie in [0, 1)")
            if list(self.multistep_levels) != sorted(self.multistep_levels):
                raise ValueError("multistep_levels must not decrease")
        elif self.multistep_epochs or self.multistep_levels:
            raise ValueError("multistep_epochs/multistep_levels are only for schedule multistep")
        if self.freeze_epoch is not None and self.freeze_epoch < self.last_change_epoch:
            raise ValueError(f"freeze_epoch {self.freeze_epoch} is before the schedule reaches its target "
                             f"(epoch {self.last_change_epoch})")
        return self

    @property
    def last_change_epoch(self) -> int:
        """The epoch from which the planned level no longer changes (adaptive: not known in advance)."""
        if self.schedule is SparsitySchedule.MULTISTEP:
            return self.multistep_epochs[-1]
        if self.schedule is SparsitySchedule.ADAPTIVE:
            return 0
        return self.target_epoch


class MagnitudeSparsityConfig(_Strict):
    """Magnitude sparsity (NNCF paper §4.3): the weights of smallest importance are zeroed by frozen masks that the
    schedule recomputes from the current weights; the others keep training."""

    algorithm: Literal["magnitude_sparsity"] = Field(description="Compression algorithm name.")
    importance: SparsityImportance = Field(SparsityImportance.NORMED_ABS, description="abs or normed_abs.")
    threshold: SparsityThreshold = Field(SparsityThreshold.GLOBAL, description="per_layer or global level.")
    schedule: SparsityScheduleConfig = Field(default_factory=SparsityScheduleConfig,
                                             description="How the level rises over the epochs.")
    ignored_scope: IgnoredScope = Field(default_factory=IgnoredScope, description="Layers left dense.")

    @property
    def calibration_samples(self) -> int:
        """Magnitude sparsity needs no data."""
        return 0


class RBSparsityConfig(_Strict):
    """Regularization-based (L0) sparsity (NNCF paper §4.3, eq. 6–7): every weight gets a trainable logit and a
    stochastic binary gate; a complexity loss pulls the fraction of kept weights to 1 - level, and the schedule
    raises the level. Evaluation and export use the deterministic gates [logit > 0]."""

    algorithm: Literal["rb_sparsity"] = Field(description="Compression algorithm name.")
    schedule: SparsityScheduleConfig = Field(default_factory=SparsityScheduleConfig,
                                             description="How the level the loss aims at rises over the epochs.")
    loss_weight: float = Field(
        1000.0, gt=0.0, description="Factor of the complexity loss in the total loss (a squared fraction, small "
                                    "beside the task loss until weighted).")
    logit_init: float = Field(5.0, gt=0.0, description="Initial logit of every gate (sigmoid 0.993: kept).")
    logit_init_mode: Literal["constant", "importance"] = Field(
        "constant", description="constant: every logit starts at logit_init (NNCF); importance: at logit_init times "
                                "the weight's normed |w| over the importance threshold of the target level (at "
                                "most 2·logit_init), so the loss closes the least important gates first.")
    logit_lr: float = Field(
        0.1, gt=0.0, description="Learning rate of the logits (the weights use training.learning_rate).")
    ignored_scope: IgnoredScope = Field(default_factory=IgnoredScope, description="Layers left dense.")

    @model_validator(mode="after")
    def _gates_train_before_they_freeze(self) -> RBSparsityConfig:
        if self.schedule.freeze_epoch == 0:
            raise ValueError("schedule.freeze_epoch 0 would freeze the gates before they train (RB freezes the "
                             "gates [logit > 0] after that epoch)")
        return self

    @property
    def calibration_samples(self) -> int:
        """RB sparsity needs no data."""
        return 0


class _OneShotConfig(_Strict):
    """Settings every one-shot command shares: the calibration pass that adjusts biases when data is given."""

    subset_size: int = Field(300, ge=1, description="Samples used to adjust the biases, when data is given.")
    batch_size: int = Field(1, ge=1, description="Samples per inference run of the bias-adjusting pass.")

    @classmethod
    def build(cls, values: dict[str, Any], *, source: str = "options") -> Any:
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError(f"invalid {source}: {_describe(error)}") from None


class SparsifyConfig(_OneShotConfig):
    """One-shot magnitude sparsity without training (`onnxcompress sparsify`)."""

    level: float = Field(0.5, ge=0.0, lt=1.0, description="Fraction of the sparsified weights set to zero.")
    importance: SparsityImportance = Field(SparsityImportance.NORMED_ABS, description="abs or normed_abs.")
    threshold: SparsityThreshold = Field(SparsityThreshold.PER_LAYER, description="per_layer or global level.")
    ignored_scope: IgnoredScope = Field(default_factory=IgnoredScope, description="Layers left dense.")


class UnitRanking(str, enum.Enum):
    """How accuracy control ranks the quantizer units it may return to float."""

    #: The metric measured with each unit alone in float (one evaluation per unit), re-measured as it goes.
    METRIC = "metric"
    #: The quantization noise each unit adds at its tensor, from one float pass on a few calibration samples; the
    #: metric is measured only on the ranking's prefixes (a handful of evaluations).
    NOISE = "noise"
    #: metric for the built-in metrics (fast), noise for a user's FILE.py:FUNC or callable (any cost).
    AUTO = "auto"


class BitCriterion(str, enum.Enum):
    """How mixed precision (quantize --max-size) measures what a weight's 4 bits cost."""

    #: The metric with that weight alone in 4 bits (one evaluation per weight).
    METRIC = "metric"
    #: HAWQ-v2: the weight's average Hessian trace (Hutchinson, through the training runtime) times its 4-bit
    #: error's growth over 8 bits; no evaluation per weight. For classifiers (cross-entropy on the first output).
    HESSIAN = "hessian"


class WeightMode(str, enum.Enum):
    """How `compress-weights` stores a weight."""

    #: Symmetric INT8, one scale per output channel (or per block, with a group size).
    INT8 = "int8"
    #: Symmetric INT4 (levels -8..7), one scale per block of `group_size` values along the reduction axis.
    INT4_SYM = "int4_sym"
    #: Asymmetric UINT4 (levels 0..15) with a 4-bit zero-point per block.
    INT4_ASYM = "int4_asym"

    @property
    def four_bit(self) -> bool:
        return self is not WeightMode.INT8


class WeightCompressionConfig(_Strict):
    """Weight-only compression of matrix products and embeddings (`onnxcompress compress-weights`); activations
    stay float."""

    mode: WeightMode = Field(WeightMode.INT8, description="int8 (per channel), int4_sym or int4_asym (blockwise).")
    group_size: int | None = Field(
        None, ge=16, description="Values per scale along the reduction axis (a power of two, at least 16, as "
                                 "ONNX Runtime's MatMulNBits needs); default: 128 for the int4 modes, one scale per "
                                 "channel for int8. A layer whose reduction axis it does not divide falls back to "
                                 "per-channel scales, with a note.")
    ratio: float = Field(
        1.0, gt=0.0, le=1.0, description="Fraction of the 4-bit candidates' weights (by count; as nearly as whole "
                                         "layers allow) stored in 4 bits in the int4 modes, the least sensitive "
                                         "first; the rest takes INT8 per channel.")
    all_layers: bool = Field(
        False, description="In the int4 modes, store the embeddings (Gather) and the last matrix product in 4 bits "
                           "too; by default they take INT8, being the most sensitive.")
    activation_scaling: bool = Field(
        True, description="With data, in the int4 modes: scale each table's input features by their activations' "
                          "magnitude, as AWQ does, where the scale folds into the constants of the ops that make "
                          "the activation (no op is added); false leaves the tables unscaled.")
    subset_size: int = Field(128, ge=1, description="Samples of the data (when given) that measure activations.")
    batch_size: int = Field(1, ge=1, description="Samples per inference run of that pass.")
    ignored_scope: IgnoredScope = Field(default_factory=IgnoredScope, description="Layers left in float.")

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and value & (value - 1):
            raise ValueError(f"group_size {value} is not a power of two (16, 32, 64, 128...)")
        return value

    @model_validator(mode="after")
    def _ratio_needs_four_bits(self) -> WeightCompressionConfig:
        if self.ratio < 1.0 and not self.mode.four_bit:
            raise ValueError(f"ratio {self.ratio} splits weights between 4 and 8 bits: use mode int4_sym or "
                             "int4_asym")
        if self.all_layers and not self.mode.four_bit:
            raise ValueError("all_layers only changes the int4 modes (int8 compresses every layer alike)")
        return self

    @property
    def effective_group_size(self) -> int | None:
        """The group size of the 4-bit (or INT8 blockwise) layers; None: one scale per channel."""
        if self.group_size is not None:
            return self.group_size
        return 128 if self.mode.four_bit else None

    @classmethod
    def build(cls, values: dict[str, Any], *, source: str = "options") -> WeightCompressionConfig:
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError(f"invalid {source}: {_describe(error)}") from None


class PruningCriterion(str, enum.Enum):
    """How a filter's importance is measured (lecture 001)."""

    #: ‖F‖₁.
    L1 = "l1"
    #: ‖F‖₂.
    L2 = "l2"
    #: Σⱼ ‖F − Fⱼ‖₂ over the layer's other filters: the filter the others replace best goes first.
    GEOMETRIC_MEDIAN = "geometric_median"
    #: |γ| of the BatchNormalization after the filter (one-shot only: fine-tuning trains folded weights).
    BN_GAMMA = "bn_gamma"


class PruningTargetKind(str, enum.Enum):
    """What the pruning target is a fraction of."""

    #: Filters of the prunable groups: of each (uniform ranking) or of all of them together (global ranking).
    FILTERS = "filters"
    #: Multiply-accumulates of the whole model; the ranking's strength that removes them is searched.
    FLOPS = "flops"


class PruningRanking(str, enum.Enum):
    """How the channels to remove are chosen across groups."""

    #: Every group loses the same fraction of its channels.
    UNIFORM = "uniform"
    #: One threshold on importance normalized by each group's mean: groups of weak channels lose more.
    GLOBAL = "global"


class _PruningTarget(_Strict):
    """What one-shot and fine-tuned filter pruning share: the target, how channels are ranked and how narrow
    groups may get."""

    target: float = Field(0.3, gt=0.0, lt=1.0, description="Fraction of filters or of MACs (target_kind) to remove.")
    target_kind: PruningTargetKind = Field(PruningTargetKind.FLOPS, description="filters or flops.")
    criterion: PruningCriterion = Field(PruningCriterion.L2, description="l1, l2, geometric_median or bn_gamma "
                                                                          "(one-shot only).")
    ranking: PruningRanking = Field(PruningRanking.UNIFORM, description="uniform (the same fraction of every group) "
                                                                        "or global (one normalized threshold).")
    min_width: int = Field(8, ge=1, description="Channels every pruned group keeps at least (all, if it has fewer).")
    channel_multiple: int = Field(
        8, ge=1, description="Pruned groups keep a multiple of this many channels, unless that keeps them all: "
                             "both runtimes' kernels run full SIMD lanes (odd widths made a pruned INT8 model slower "
                             "than the unpruned one in ONNX Runtime).")
    ignored_scope: IgnoredScope = Field(
        default_factory=IgnoredScope, description="Compute ops whose filters are not pruned (their group is kept).")


class PruneConfig(_OneShotConfig, _PruningTarget):
    """One-shot filter pruning without training (`onnxcompress prune`)."""

    target_kind: PruningTargetKind = Field(PruningTargetKind.FILTERS, description="filters or flops.")


class PruningSchedule(str, enum.Enum):
    """How the pruning level rises to the target over fine-tuning."""

    #: initial_level for num_init_steps epochs, then the target.
    BASELINE = "baseline"
    #: From initial_level after num_init_steps epochs to the target pruning_steps epochs later; the kept
    #: fraction shrinks by the same factor every epoch.
    EXPONENTIAL = "exponential"
    #: Like exponential, but rising fastest at first: level = initial + (target − initial) · (1 − e^(−3t)) / (1 −
    #: e^(−3)) at t = the fraction of pruning_steps done.
    EXPONENTIAL_WITH_BIAS = "exponential_with_bias"


class PruningScheduleConfig(_Strict):
    """The level schedule of fine-tuned filter pruning, in epochs; masks stop changing once it reaches the
    target."""

    schedule: PruningSchedule = Field(PruningSchedule.EXPONENTIAL, description="Schedule kind.")
    initial_level: float = Field(0.0, ge=0.0, lt=1.0, description="Level (of the target's kind) before pruning "
                                                                  "steps start.")
    num_init_steps: int = Field(0, ge=0, description="Epochs of fine-tuning at initial_level before the level rises.")
    pruning_steps: int = Field(1, ge=1, description="exponential schedules: epochs from initial_level to the target.")

    @property
    def last_change_epoch(self) -> int:
        """The epoch from which the level is the target."""
        if self.schedule is PruningSchedule.BASELINE:
            return self.num_init_steps
        return self.num_init_steps + self.pruning_steps


class FilterPruningConfig(_PruningTarget):
    """Filter pruning, fine-tuned: frozen masks zero whole filters (and what depends on them) in the training
    graph, the schedule raises the level and recomputes them from the current weights, and the export removes
    the pruned channels."""

    algorithm: Literal["filter_pruning"] = Field(description="Compression algorithm name.")
    schedule: PruningScheduleConfig = Field(default_factory=PruningScheduleConfig,
                                            description="How the level rises over the epochs.")

    @model_validator(mode="after")
    def _initial_below_target(self) -> FilterPruningConfig:
        if self.criterion is PruningCriterion.BN_GAMMA:
            raise ValueError("criterion bn_gamma is for one-shot pruning: fine-tuning trains the weights with the "
                             "BatchNorms folded into them (use l1, l2 or geometric_median)")
        if self.schedule.initial_level > self.target:
            raise ValueError(f"schedule.initial_level {self.schedule.initial_level} is above the target {self.target}")
        return self

    @property
    def calibration_samples(self) -> int:
        """Filter pruning needs no data."""
        return 0


def _algorithm_name(value: Any) -> str:
    """The `algorithm` of a compression entry; entries without one are quantization, the first algorithm."""
    if isinstance(value, dict):
        return value.get("algorithm", "quantization")
    return getattr(value, "algorithm", "quantization")


#: Names of the algorithms fine-tuning can stack.
ALGORITHM_NAMES = ("quantization", "magnitude_sparsity", "rb_sparsity", "filter_pruning")

AlgorithmConfig = Annotated[
    Annotated[QuantizationAwareTrainingConfig, Tag("quantization")]
    | Annotated[MagnitudeSparsityConfig, Tag("magnitude_sparsity")]
    | Annotated[RBSparsityConfig, Tag("rb_sparsity")]
    | Annotated[FilterPruningConfig, Tag("filter_pruning")],
    Discriminator(_algorithm_name),
]


class Optimizer(str, enum.Enum):
    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(str, enum.Enum):
    #: Cosine decay to zero over all steps after the warm-up.
    COSINE = "cosine"
    #: Multiply by `gamma` every `step_epochs` epochs.
    STEP = "step"
    CONSTANT = "constant"


class Loss(str, enum.Enum):
    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"


class Metric(str, enum.Enum):
    TOP1 = "top1"
    #: Validation loss only (lower is better).
    LOSS = "loss"


class Distillation(_Strict):
    """Knowledge distillation from the original float model: loss = task loss + weight · T² · KL(teacher ‖ student)
    on temperature-T softmaxes of the logits."""

    enabled: bool = Field(False, description="Add the distillation term to the loss.")
    temperature: float = Field(4.0, gt=0.0, description="Softmax temperature T of teacher and student.")
    weight: float = Field(1.0, ge=0.0, description="Weight of the distillation term.")


class Augmentation(_Strict):
    """Random changes to the image inputs (4-D, [N, C, H, W]) of every training batch, drawn from the seed, the
    epoch and the step (a resumed run sees the same batches); the teacher of distillation sees the same images.
    Validation data is never changed."""

    shift: int = Field(0, ge=0, description="Translate each image by up to this many pixels along H and W, "
                                            "independently per sample (zeros fill the border).")
    horizontal_flip: bool = Field(False, description="Mirror each image left-right with probability 1/2 (not for "
                                                     "data whose meaning changes when mirrored, such as digits).")

    @property
    def enabled(self) -> bool:
        return self.shift > 0 or self.horizontal_flip


class TrainingConfig(_Strict):
    """The fine-tuning loop."""

    epochs: int = Field(3, ge=1, description="Passes over the training data.")
    batch_size: int = Field(32, ge=1, description="Samples per training step.")
    eval_batch_size: int = Field(256, ge=1, description="Samples per validation step.")
    optimizer: Optimizer = Field(Optimizer.ADAMW, description="adamw or sgd (onnxruntime-training's optimizers).")
    learning_rate: float = Field(1e-4, gt=0.0, description="Peak learning rate of the model's weights.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (sgd: must be 0).")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up from 0 to the peak learning rate.")
    schedule: Schedule = Field(Schedule.COSINE, description="Learning-rate schedule after the warm-up.")
    step_epochs: int = Field(1, ge=1, description="schedule=step: epochs between decays.")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="schedule=step: decay factor.")
    loss: Loss = Field(Loss.CROSS_ENTROPY, description="Task loss against the labels: cross_entropy or mse.")
    metric: Metric = Field(Metric.TOP1, description="Validation metric choosing the best checkpoint.")
    distillation: Distillation = Field(default_factory=Distillation, description="Knowledge distillation.")
    augmentation: Augmentation = Field(default_factory=Augmentation,
                                       description="Random shifts and flips of image inputs during training.")
    seed: int = Field(0, ge=0, description="Seed of the data shuffling.")
    labels: str = Field("labels", description="Name of the label array in the training and validation data.")


class FinetuneConfig(_Strict):
    """`onnxcompress finetune`: compression algorithms (applied in order) and the training loop."""

    compression: tuple[AlgorithmConfig, ...] = Field(
        (QuantizationAwareTrainingConfig(),), min_length=1,
        description="Compression algorithms, each a mapping with an `algorithm` key: quantization, "
                    "magnitude_sparsity, rb_sparsity, filter_pruning. They stack in the order weights flow through "
                    "them: pruning and sparsity mask the float weight, quantization then quantizes the masked "
                    "weight.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training loop settings.")

    @classmethod
    def from_file(cls, path: str | Path) -> FinetuneConfig:
        return cls.build(read_config_file(path), source=str(path))

    @classmethod
    def build(cls, values: dict[str, Any], *, source: str = "config") -> FinetuneConfig:
        try:
            config = cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError(f"invalid {source}: {_describe(error)}") from None
        if config.training.optimizer is Optimizer.SGD and config.training.weight_decay:
            raise ConfigError(f"invalid {source}: 'training.weight_decay' needs optimizer adamw")
        epochs = config.training.epochs
        for index, algorithm in enumerate(config.compression):
            schedule = getattr(algorithm, "schedule", None)
            if isinstance(schedule, (SparsityScheduleConfig, PruningScheduleConfig)) and \
                    schedule.last_change_epoch > epochs:
                raise ConfigError(f"invalid {source}: 'compression.{index}.schedule' reaches its target at epoch "
                                  f"{schedule.last_change_epoch}, after the last epoch ({epochs})")
        return config
