"""The `onnxcompress` command line: quantize, sparsify, prune, finetune, export, benchmark, compare, inspect, package, run,
demo.

Every command builds the same typed objects as the Python API. Errors of the OnnxCompressError family print one
line naming the failed stage and exit non-zero; no traceback reaches the user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click

from onnxcompress.errors import ConfigError, InternalError, OnnxCompressError


# Seconds the clean-up after Ctrl-C may take: the training worker's bounded shutdown waits fit well inside.
CLEANUP_GRACE_S = 45


def _exit_interrupted(message: str) -> NoReturn:
    click.echo(message, err=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream has nothing left to flush
            stream.flush()
    os._exit(130)


class _Commands(click.Group):
    """Runs a command; an exception outside the OnnxCompressError family is a bug in onnxcompress, reported as one
    line naming the command (the full trace with --debug), unless Ctrl-C caused it; after Ctrl-C every failure is
    an interruption."""

    interrupted = False

    def on_interrupt(self, signum: int, frame: object) -> None:
        """SIGINT handler: remember it, then interrupt as Python does. An extension module whose import it cuts
        short raises ImportError, often without the KeyboardInterrupt in its chain.

        A KeyboardInterrupt can land between a lock's acquire and the block that releases it, and the clean-up
        would then wait forever; so the first Ctrl-C also arms an alarm that ends the process with 130 if the
        clean-up outlasts CLEANUP_GRACE_S, and a second Ctrl-C ends it at once."""
        if self.interrupted:
            _exit_interrupted("interrupted again; stopping without clean-up")
        self.interrupted = True
        signal.signal(signal.SIGALRM, lambda *_: _exit_interrupted(
            f"interrupted; clean-up did not finish within {CLEANUP_GRACE_S} s, stopping without it"))
        signal.alarm(CLEANUP_GRACE_S)
        signal.default_int_handler(signum, frame)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except OnnxCompressError as error:
            # A library that catches the interruption in its own code (OpenVINO's converter) reports it as a
            # failure of its own, which we then wrap as the stage's error: it is still the user's Ctrl-C.
            if self.interrupted:
                raise KeyboardInterrupt from error
            raise
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # The reader of our output went away (`| head`): stop quietly, as other command-line tools do; the
            # output file was already written atomically.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(1) from None
        except Exception as error:  # the last resort; each known cause has its own typed error
            if self.interrupted:
                raise KeyboardInterrupt from error
            if ctx.params.get("debug"):
                raise
            raise InternalError(ctx.invoked_subcommand or "onnxcompress", error) from error


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxcompress")
@click.option("--debug", is_flag=True, help="Show the full Python traceback of an unexpected error.")
def cli(debug: bool) -> None:
    """Compress ONNX models and deploy them with OpenVINO and ONNX Runtime."""


_TARGET_OPTION = click.option(
    "--target", type=click.Choice(["portable", "vnni"]),
    help="CPUs the file must be exact on: portable (every x86 CPU, the default) or vnni (VNNI/AMX CPUs only: "
         "full-range weights, which ONNX Runtime's integer kernels can saturate on older CPUs).")


class _OutputFile(click.Path):
    """A file to write: a name ending in a path separator is a folder, so it is refused rather than stripped."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        if isinstance(value, str) and value.endswith(("/", os.sep)):
            self.fail(f"{value} names a folder; give the path of the file to write", param, ctx)
        return super().convert(value, param, ctx)


_ROUND_SECONDS = click.FloatRange(min=0, min_open=True)  # the upper bound and NaN: benchmark.check_timing


def _note_target_override(flag: str, file_targets: list, config_file: Path) -> None:
    """Flags win over the config file; say so when they disagree, so neither setting is lost silently."""
    if any(value is not None and str(value) != flag for value in file_targets):
        click.echo(f"note: --target {flag} overrides the target set in {config_file}", err=True)


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    """Accept both repeated options and comma-separated lists."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _ignored_scope(names: tuple[str, ...], types: tuple[str, ...], patterns: tuple[str, ...]) -> dict:
    """The `ignored_scope` option from the --ignore-* flags (nothing when none is given)."""
    scope = {"names": _split(names), "types": _split(types), "patterns": _split(patterns)}
    return {"ignored_scope": scope} if any(scope.values()) else {}


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=_OutputFile(), help="Output .onnx (default: <model>.int8.onnx).")
@click.option("--data", help="Calibration data: folder of .npy feeds or an .npz of per-input arrays.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON QuantizationConfig.")
@click.option("--preset", type=click.Choice(["performance", "mixed"]), help="Symmetric or asymmetric activations.")
@click.option("--subset-size", type=int, help="Number of calibration samples (default 300).")
@click.option("--calibration", type=click.Choice(["minmax", "mean_minmax", "percentile", "mse"]),
              help="Activation range estimator.")
@click.option("--model-type", type=click.Choice(["cnn", "transformer"]), help="Quantization rules to follow.")
@click.option("--bias-correction", type=click.Choice(["none", "fast", "full"]), help="Bias correction variant.")
@click.option("--weight-bits", type=click.IntRange(2, 8), help="Bit width of the weights (default 8).")
@_TARGET_OPTION
@click.option("--smooth-quant-alpha", type=float,
              help="SmoothQuant strength for MatMul inputs (default: 0.95 with --model-type transformer, else off).")
@click.option("--no-smooth-quant", "smooth_quant", flag_value=False, default=None, help="Turn SmoothQuant off.")
@click.option("--ignore-names", multiple=True, help="Node names to keep in float (repeat or comma-separate).")
@click.option("--ignore-types", multiple=True, help="Op types to keep in float.")
@click.option("--ignore-patterns", multiple=True, help="Regexes over node names to keep in float.")
@click.option("--max-drop", type=click.FloatRange(min=0), help="Accuracy control: the largest metric drop from the "
              "float model; the fewest quantizers return to float until it holds (needs --metric).")
@click.option("--metric", help="Accuracy control metric: top1, cosine, sqnr (on --eval-data) or FILE.py:FUNC, "
              "FUNC(model_path) -> float, higher is better.")
@click.option("--ranking", type=click.Choice(["auto", "metric", "noise"]), help="Accuracy control: rank the "
              "quantizers by the metric with each alone in float (metric), or by the noise each adds, measuring the "
              "metric only on the ranking's prefixes (noise); default auto: metric for built-in metrics, noise for "
              "FILE.py:FUNC.")
@click.option("--workers", type=click.IntRange(min=1), help="Accuracy control and --max-size: local processes that "
              "score candidate models (default: one per core; 1: in this process).")
@click.option("--ray-address", help="Score candidate models on this Ray cluster instead (ray://HOST:10001 or "
              "HOST:6379; needs pip install 'onnxcompress[ray]').")
@click.option("--no-cache", is_flag=True, help="Accuracy control: measure every score again instead of reusing "
              "those of an earlier run (onnxcompress sensitivity) with this model, data, settings and metric.")
@click.option("--no-speed", is_flag=True, help="Accuracy control: do not measure what each unit left in float costs "
              "in latency (a short benchmark of the final model without each).")
@click.option("--max-size", type=click.FloatRange(0, 1, min_open=True), help="Mixed precision: the largest size of "
              "the initializers as a fraction of the FP32 model's; the weights whose 4 bits cost the least --metric "
              "(default: cosine to FP32 on --eval-data or the calibration .npz) take 4 bits, stored as INT4.")
@click.option("--max-bit-complexity", type=click.FloatRange(0, 1, min_open=True), help="Mixed precision: the largest "
              "bit complexity (sum of MACs x weight bits x activation bits, at the first calibration sample's shapes) "
              "as a fraction of the all-INT8 model's (0.5: every weight in 4 bits); instead of --max-size.")
@click.option("--criterion", type=click.Choice(["metric", "hessian"]), help="Mixed precision: cost each weight's 4 "
              "bits by the metric with it alone in 4 bits (metric, the default) or by its Hessian trace times its "
              "4-bit error (hessian: HAWQ-v2 through the training runtime, no evaluation per weight).")
@click.option("--eval-data", help="Accuracy control data: an .npz with an array per model input (and labels for top1).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def quantize(model: Path, output: Path | None, data: str | None, config_file: Path | None, preset, subset_size,
             calibration, model_type, bias_correction, weight_bits, target, smooth_quant_alpha, smooth_quant,
             ignore_names, ignore_types, ignore_patterns, max_drop: float | None, metric: str | None,
             ranking: str | None, workers: int | None, ray_address: str | None, no_cache: bool, no_speed: bool,
             max_size: float | None, max_bit_complexity: float | None, criterion: str | None,
             eval_data: str | None, no_progress: bool) -> None:
    """Post-training INT8 quantization of MODEL."""
    from onnxcompress.api import quantize as run_quantize
    from onnxcompress.config import QuantizationConfig, read_config_file
    from onnxcompress.runtime.model_io import check_output_path, model_file_size, save_model

    options = {key: value for key, value in {
        "preset": preset, "subset_size": subset_size, "calibration": calibration, "model_type": model_type,
        "bias_correction": bias_correction, "weight_bits": weight_bits, "target": target,
        "smooth_quant_alpha": smooth_quant_alpha, "smooth_quant": smooth_quant}.items() if value is not None}
    if config_file and target:
        _note_target_override(target, [read_config_file(config_file).get("target")], config_file)
    options.update(_ignored_scope(ignore_names, ignore_types, ignore_patterns))
    config = (QuantizationConfig.from_file(config_file, **options) if config_file
              else QuantizationConfig.build(options, source="options"))
    if max_size is not None and max_bit_complexity is not None:
        raise ConfigError("--max-size and --max-bit-complexity are two budgets for mixed precision: choose one")
    budgeted = max_size is not None or max_bit_complexity is not None
    if budgeted and max_drop is not None:
        raise ConfigError("--max-size and --max-drop cannot be combined yet: choose the size budget or the "
                          "accuracy budget")
    if not budgeted and ((max_drop is None) != (metric is None) or (eval_data is not None and metric is None)):
        raise ConfigError("accuracy control needs both --max-drop and --metric (and --eval-data for built-in metrics)")
    output = output or model.with_name(model.stem + ".int8.onnx")
    check_output_path(model, output, reads=(data, config_file, eval_data))
    if criterion is not None and not budgeted:
        raise ConfigError("--criterion costs the 4-bit weights of mixed precision: it needs --max-size or "
                          "--max-bit-complexity")
    if (ranking is not None or no_speed) and max_drop is None:
        raise ConfigError("--ranking and --no-speed belong to accuracy control: they need --max-drop and --metric")
    if (workers is not None or ray_address is not None) and max_drop is None and not budgeted:
        raise ConfigError("--workers and --ray-address score candidates of accuracy control (--max-drop) or mixed "
                          "precision (--max-size); plain quantization has none")
    if max_drop is not None:
        quantized = _quantize_within_drop(model, data, config, metric, max_drop, eval_data, ranking or "auto",
                                          workers, ray_address, not no_cache, not no_speed, not no_progress)
    elif budgeted:
        quantized = _quantize_within_budget(model, data, config, metric, max_size, max_bit_complexity, eval_data,
                                            criterion or "metric", workers, ray_address, not no_progress)
    else:
        quantized = run_quantize(model, data, config, progress=not no_progress)
    saved = save_model(quantized, output)
    before, after = model_file_size(model), model_file_size(saved)
    click.echo(f"wrote {saved} ({after / 1e6:.2f} MB, {after / before:.2f}× of {before / 1e6:.2f} MB)")


def _quantize_within_drop(model: Path, data: str | None, config, metric: str, max_drop: float,
                          eval_data: str | None, ranking: str, workers: int | None, ray_address: str | None,
                          cache: bool, speed: bool, progress: bool):
    from onnxcompress.api import quantize_with_accuracy_control

    result = quantize_with_accuracy_control(model, data, config, metric=metric, max_drop=max_drop,
                                            eval_data=eval_data, ranking=ranking, workers=workers,
                                            ray_address=ray_address, cache=cache, speed=speed, progress=progress)
    units = ", ".join(result.labels) or "none"
    click.echo(f"accuracy control: {metric} float {result.float_score:.6g}, quantized {result.quantized_score:.6g}"
               f", final {result.final_score:.6g} after {result.evaluations} evaluations"
               f"{f' ({result.reused} more from the score cache)' if result.reused else ''}; in float: {units}")
    if result.speed is not None:
        click.echo(result.speed.format())
    return result.model


def _quantize_within_budget(model: Path, data: str | None, config, metric: str | None, max_size: float | None,
                            max_bit_complexity: float | None, eval_data: str | None, criterion: str,
                            workers: int | None, ray_address: str | None, progress: bool):
    from onnxcompress.api import quantize_mixed_precision

    result = quantize_mixed_precision(model, data, config, max_size=max_size, max_bit_complexity=max_bit_complexity,
                                      metric=metric or "cosine", eval_data=eval_data, criterion=criterion,
                                      workers=workers, ray_address=ray_address, progress=progress)
    four = len(result.four_bit)
    budget = (f"budget {max_size:g}" if max_bit_complexity is None else
              f"bit complexity {result.bit_complexity:.3f} of all INT8, budget {max_bit_complexity:g}")
    click.echo(f"mixed precision: {four} of {len(result.weights)} weights in 4 bits, size {result.size_ratio:.3f} of "
               f"FP32 ({budget}); {metric or 'cosine'} float {result.float_score:.6g}, all INT8 "
               f"{result.int8_score:.6g}, mixed {result.score:.6g} after {result.evaluations} evaluations")
    return result.model


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=_OutputFile(), help="Output .onnx (default: <model>.sparse<level>.onnx).")
@click.option("--level", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="Fraction of the Conv/Gemm/MatMul weights set to zero.")
@click.option("--data", help="Calibration data (as for quantize): each sparse layer's bias absorbs the mean shift.")
@click.option("--importance", type=click.Choice(["abs", "normed_abs"]), help="Weight importance (default normed_abs).")
@click.option("--threshold", type=click.Choice(["per_layer", "global"]),
              help="Level per layer (default) or over all layers together.")
@click.option("--subset-size", type=click.IntRange(min=1), help="Samples for bias correction (default 300).")
@click.option("--ignore-names", multiple=True, help="Node names to leave dense (repeat or comma-separate).")
@click.option("--ignore-types", multiple=True, help="Op types to leave dense.")
@click.option("--ignore-patterns", multiple=True, help="Regexes over node names to leave dense.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def sparsify(model: Path, output: Path | None, level: float, data: str | None, importance, threshold, subset_size,
             ignore_names, ignore_types, ignore_patterns, no_progress: bool) -> None:
    """One-shot magnitude sparsity of MODEL (no training): zero the least important weights."""
    from onnxcompress.api import sparsify as run_sparsify
    from onnxcompress.config import SparsifyConfig
    from onnxcompress.runtime.model_io import check_output_path, model_file_size, save_model

    options = {key: value for key, value in {"level": level, "importance": importance, "threshold": threshold,
                                             "subset_size": subset_size}.items() if value is not None}
    options.update(_ignored_scope(ignore_names, ignore_types, ignore_patterns))
    config = SparsifyConfig.build(options)
    output = output or model.with_name(f"{model.stem}.sparse{round(level * 100)}.onnx")
    check_output_path(model, output, reads=(data,))
    result = run_sparsify(model, data, config, progress=not no_progress)
    saved = save_model(result.model, output)
    corrected = f", {len(result.corrected)} biases corrected" if data else " (no data: biases unchanged)"
    click.echo(f"sparsity {result.sparsity:.1%} over {len(result.layers)} layers{corrected}")
    before, after = model_file_size(model), model_file_size(saved)
    click.echo(f"wrote {saved} ({after / 1e6:.2f} MB; {before / 1e6:.2f} MB before; zeros are stored densely, "
               "compress the file or quantize it to gain size)")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--metric", required=True, help="top1, cosine, sqnr (on --eval-data) or FILE.py:FUNC, "
              "FUNC(model_path) -> float, higher is better.")
@click.option("--eval-data", help="An .npz with an array per model input (and labels for top1).")
@click.option("--data", help="Calibration data, as for quantize.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML/JSON QuantizationConfig.")
@click.option("--preset", type=click.Choice(["performance", "mixed"]), help="Symmetric or asymmetric activations.")
@click.option("--model-type", type=click.Choice(["cnn", "transformer"]), help="Quantization rules to follow.")
@click.option("--subset-size", type=click.IntRange(min=1), help="Number of calibration samples (default 300).")
@click.option("--report", "report_path", type=_OutputFile(), help="Markdown report with every unit ranked.")
@click.option("--plot", "plot_path", type=_OutputFile(), help="PNG of the most sensitive units and their noise.")
@click.option("--workers", type=click.IntRange(min=1), help="Local processes scoring candidates (default: cores).")
@click.option("--ray-address", help="Score candidates on this Ray cluster instead.")
@click.option("--no-cache", is_flag=True, help="Measure every score again (default: reuse, and keep, the scores of "
              "this model, data, settings and metric, which quantize --max-drop then reuses too).")
@click.option("--four-bit", is_flag=True, help="Also measure the metric drop of each weight alone in 4 bits.")
@click.option("--hessian", is_flag=True, help="Also estimate each weight's Hessian trace (Hutchinson, through the "
              "training runtime) and its HAWQ-v2 cost of 4 bits: of the cross-entropy with --eval-data's labels or "
              "the float model's top-1 for classifiers, else of the squared error to the float outputs.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def sensitivity(model: Path, metric: str, eval_data: str | None, data: str | None, config_file: Path | None, preset,
                model_type, subset_size, report_path: Path | None, plot_path: Path | None, workers: int | None,
                ray_address: str | None, no_cache: bool, four_bit: bool, hessian: bool, no_progress: bool) -> None:
    """Which quantizers of MODEL cost the metric: each alone in float, ranked, with the noise it adds (and, with
    --four-bit and --hessian, what each weight's 4 bits would cost)."""
    from onnxcompress.api import sensitivity as run_sensitivity
    from onnxcompress.config import QuantizationConfig
    from onnxcompress.runtime.model_io import check_output_path
    from onnxcompress.runtime.outputs import write_text_atomic

    options = {key: value for key, value in {"preset": preset, "model_type": model_type,
                                             "subset_size": subset_size}.items() if value is not None}
    config = (QuantizationConfig.from_file(config_file, **options) if config_file
              else QuantizationConfig.build(options, source="options"))
    for output in (report_path, plot_path):
        if output is not None:
            check_output_path(model, output, reads=(data, config_file, eval_data))
    report = run_sensitivity(model, data, config, metric=metric, eval_data=eval_data, workers=workers,
                             ray_address=ray_address, cache=not no_cache, four_bit=four_bit, hessian=hessian,
                             progress=not no_progress)
    click.echo(report.format())
    if report_path is not None:
        click.echo(f"wrote {write_text_atomic(report_path, report.markdown())}")
    if plot_path is not None:
        click.echo(f"wrote {report.plot(plot_path)}")


@cli.command("compress-weights")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=_OutputFile(), help="Output .onnx (default: <model>.<mode>.onnx).")
@click.option("--mode", type=click.Choice(["int8", "int4_sym", "int4_asym"]), default="int8", show_default=True,
              help="int8: one scale per channel; int4_sym/int4_asym: one scale (and zero-point) per group.")
@click.option("--group-size", type=click.IntRange(min=16), help="Values per scale along the reduction axis, a power "
              "of two (default 128 for int4; int8: per channel). Layers it does not divide take per-channel scales.")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True), help="int4 modes: fraction of the weights in "
              "4 bits, the least sensitive first; the rest INT8 (default 1).")
@click.option("--all-layers", is_flag=True, help="int4 modes: embeddings and the last matrix product in 4 bits too "
              "(by default INT8).")
@click.option("--data", help="Calibration data (as for quantize): each block's clipping and scale minimise the "
              "error its input features' E[x²] predicts, and in the int4 modes the tables' input features are "
              "scaled by their activations (AWQ) where the graph can absorb it (default: round to nearest, no data).")
@click.option("--no-awq", is_flag=True, help="With --data: leave out the activation-aware scaling.")
@click.option("--subset-size", type=click.IntRange(min=1), help="Samples of --data to measure (default 128).")
@click.option("--ignore-names", multiple=True, help="Node names to leave in float (repeat or comma-separate).")
@click.option("--ignore-types", multiple=True, help="Op types to leave in float.")
@click.option("--ignore-patterns", multiple=True, help="Regexes over node names to leave in float.")
@click.option("--max-drop", type=click.FloatRange(min=0), help="int4 modes, accuracy control: the largest metric "
              "drop from the FP32 model; the fewest 4-bit tables move to INT8 until it holds (needs --metric).")
@click.option("--metric", help="Accuracy control metric: top1, cosine, sqnr (on --eval-data) or FILE.py:FUNC, "
              "FUNC(model_path) -> float, higher is better.")
@click.option("--eval-data", help="Accuracy control data: an .npz with an array per model input (and labels for top1).")
@click.option("--ranking", type=click.Choice(["auto", "metric", "noise"]), help="Accuracy control: rank the 4-bit "
              "tables by the metric with each alone in INT8 (metric), or by their 4-bit error, measuring the metric "
              "only on the ranking's prefixes (noise); default auto: metric for built-in metrics, noise for "
              "FILE.py:FUNC.")
@click.option("--workers", type=click.IntRange(min=1), help="Accuracy control: local processes that score candidate "
              "models (default: one per core; 1: in this process).")
@click.option("--ray-address", help="Accuracy control: score candidate models on this Ray cluster instead.")
@click.option("--no-cache", is_flag=True, help="Accuracy control: measure every score again instead of reusing "
              "those of an earlier run with this model, data, settings and metric.")
@click.option("--no-speed", is_flag=True, help="Accuracy control: do not measure what each table moved to INT8 "
              "costs in latency.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def compress_weights(model: Path, output: Path | None, mode: str, group_size: int | None, ratio: float | None,
                     all_layers: bool, data: str | None, no_awq: bool, subset_size: int | None, ignore_names,
                     ignore_types,
                     ignore_patterns, max_drop: float | None, metric: str | None, eval_data: str | None,
                     ranking: str | None, workers: int | None, ray_address: str | None, no_cache: bool,
                     no_speed: bool, no_progress: bool) -> None:
    """Weight-only compression of MODEL's MatMul, Gemm and Gather tables (activations stay float)."""
    from onnxcompress.api import compress_weights as run_compress
    from onnxcompress.config import WeightCompressionConfig
    from onnxcompress.runtime.model_io import check_output_path, model_file_size

    options = {key: value for key, value in {"mode": mode, "group_size": group_size, "ratio": ratio,
                                             "subset_size": subset_size}.items() if value is not None}
    if all_layers:
        options["all_layers"] = True
    if no_awq:
        if data is None or not WeightCompressionConfig.build(options).mode.four_bit:
            raise ConfigError("--no-awq turns off a step of the int4 modes with --data: give both")
        options["activation_scaling"] = False
    options.update(_ignored_scope(ignore_names, ignore_types, ignore_patterns))
    config = WeightCompressionConfig.build(options)
    if (max_drop is None) != (metric is None) or (eval_data is not None and metric is None):
        raise ConfigError("accuracy control needs both --max-drop and --metric (and --eval-data for built-in metrics)")
    if max_drop is None and (ranking is not None or workers is not None or ray_address is not None or no_cache
                             or no_speed):
        raise ConfigError("--ranking, --workers, --ray-address, --no-cache and --no-speed belong to accuracy control: "
                          "they need --max-drop and --metric")
    output = output or model.with_name(f"{model.stem}.{mode}.onnx")
    check_output_path(model, output, reads=(data, eval_data))
    if max_drop is not None:
        result = _compress_within_drop(model, data, config, metric, max_drop, eval_data, ranking or "auto", workers,
                                       ray_address, not no_cache, not no_speed, not no_progress)
    else:
        result = run_compress(model, data, config, progress=not no_progress)
    saved = result.save(output)
    click.echo(_describe_weight_compression(result))
    before, after = model_file_size(model), model_file_size(saved)
    click.echo(f"wrote {saved} ({after / 1e6:.2f} MB, {after / before:.2f}× of {before / 1e6:.2f} MB)")


def _compress_within_drop(model: Path, data: str | None, config, metric: str, max_drop: float,
                          eval_data: str | None, ranking: str, workers: int | None, ray_address: str | None,
                          cache: bool, speed: bool, progress: bool):
    from onnxcompress.api import compress_weights_with_accuracy_control

    result = compress_weights_with_accuracy_control(model, data, config, metric=metric, max_drop=max_drop,
                                                    eval_data=eval_data, ranking=ranking, workers=workers,
                                                    ray_address=ray_address, cache=cache, speed=speed,
                                                    progress=progress)
    control = result.control
    click.echo(f"accuracy control: {metric} FP32 {control.float_score:.6g}, all 4-bit {control.quantized_score:.6g}"
               f", final {control.final_score:.6g} after {control.evaluations} evaluations"
               f"{f' ({control.reused} more from the score cache)' if control.reused else ''}; moved to INT8: "
               f"{', '.join(control.labels) or 'none'}")
    if control.speed is not None:
        click.echo(control.speed.format())
    return result.compression


def _describe_weight_compression(result) -> str:
    from onnxcompress.config import WeightMode

    parts = []
    for mode in WeightMode:
        layers = [layer for layer in result.layers if layer.mode is mode]
        if layers:
            groups = sorted({layer.group_size for layer in layers}, key=lambda g: g or 0)
            where = ", ".join("per channel" if g is None else f"group {g}" for g in groups)
            parts.append(f"{len(layers)} in {mode.value} ({where})")
    fallback = result.per_channel_fallbacks
    note = f"; {len(fallback)} 4-bit tables per channel (group size does not divide K)" if fallback else ""
    if result.scaled_activations:
        count = len(result.scaled_activations)
        note += f"; activation-aware scaling on {count} activation{'' if count == 1 else 's'}"
    return (f"compressed {len(result.layers)} tables: {', '.join(parts)}{note}; weights {result.float_bytes / 1e6:.2f}"
            f" MB -> {result.compressed_bytes / 1e6:.2f} MB")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=_OutputFile(), help="Output .onnx (default: <model>.pruned<target>.onnx).")
@click.option("--target", type=float, default=0.3, show_default=True,
              help="Fraction of filters (or of MACs, with --target-kind flops) to remove, in (0, 1).")
@click.option("--target-kind", type=click.Choice(["filters", "flops"]), help="What --target is a fraction of "
              "(default filters; flops: of the model's MACs).")
@click.option("--ranking", type=click.Choice(["uniform", "global"]), help="How channels are chosen across groups "
              "(default uniform: the same fraction of every group; global: one threshold on importance normalized "
              "per group).")
@click.option("--criterion", type=click.Choice(["l1", "l2", "geometric_median", "bn_gamma"]),
              help="Filter importance (default l2; bn_gamma: |γ| of the BatchNorm after the filter).")
@click.option("--min-width", type=click.IntRange(min=1), help="Channels every pruned group keeps (default 8).")
@click.option("--channel-multiple", type=click.IntRange(min=1),
              help="Pruned groups keep a multiple of this many channels (default 8: full SIMD lanes).")
@click.option("--data", help="Calibration data (as for quantize): the next layers' biases absorb the mean of the "
              "pruned channels.")
@click.option("--subset-size", type=click.IntRange(min=1), help="Samples for the bias adjustment (default 300).")
@click.option("--report", "report_path", type=_OutputFile(), help="Markdown report with per-layer MACs and a plot.")
@click.option("--ignore-names", multiple=True, help="Compute ops whose filters stay (repeat or comma-separate).")
@click.option("--ignore-types", multiple=True, help="Op types whose filters stay.")
@click.option("--ignore-patterns", multiple=True, help="Regexes over node names whose filters stay.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def prune(model: Path, output: Path | None, target: float, target_kind, ranking, criterion, min_width,
          channel_multiple, data: str | None, subset_size, report_path: Path | None, ignore_names, ignore_types, ignore_patterns,
          no_progress: bool) -> None:
    """One-shot filter pruning of MODEL (no training): remove whole output channels and what depends on them."""
    from onnxcompress.algorithms.pruning.report import summary, write_report
    from onnxcompress.api import prune as run_prune
    from onnxcompress.config import PruneConfig
    from onnxcompress.runtime.model_io import check_output_path, model_file_size, save_model

    options = {key: value for key, value in {"target": target, "target_kind": target_kind, "ranking": ranking,
                                             "criterion": criterion, "min_width": min_width,
                                             "channel_multiple": channel_multiple,
                                             "subset_size": subset_size}.items() if value is not None}
    options.update(_ignored_scope(ignore_names, ignore_types, ignore_patterns))
    config = PruneConfig.build(options)
    output = output or model.with_name(f"{model.stem}.pruned{round(target * 100)}.onnx")
    check_output_path(model, output, reads=(data,))
    result = run_prune(model, data, config, progress=not no_progress)
    saved = save_model(result.model, output)
    click.echo(summary(result) + ("" if data else " (no data: biases unchanged)"))
    if report_path is not None:
        write_report(result, report_path)
        click.echo(f"report: {report_path}")
    before, after = model_file_size(model), model_file_size(saved)
    click.echo(f"wrote {saved} ({after / 1e6:.2f} MB, {after / before:.2f}× of {before / 1e6:.2f} MB)")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=_OutputFile(), help="Output .onnx (default: <model>.qat.int8.onnx).")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML/JSON FinetuneConfig: compression algorithms and training settings.")
@click.option("--train", "train_data", help="Training data: .npz (model inputs + labels) or a folder of .npy files.")
@click.option("--val", "val_data", help="Validation data, same form.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override training.epochs.")
@click.option("--labels", "label_name", help="Name of the label array in the data (training.labels; default labels).")
@_TARGET_OPTION
@click.option("--checkpoint-dir", type=click.Path(path_type=Path),
              help="Checkpoints and run state (default: <output>.checkpoints).")
@click.option("--resume", is_flag=True, help="Continue the run in the checkpoint folder.")
@click.option("--report", type=_OutputFile(), help="Write metrics, history and export errors as JSON.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def finetune(model: Path, output: Path | None, config_file: Path | None, train_data: str | None,
             val_data: str | None, epochs: int | None, label_name: str | None, target: str | None,
             checkpoint_dir: Path | None, resume: bool, report: Path | None, no_progress: bool) -> None:
    """Compress MODEL and fine-tune it (quantization-aware training); writes the deployable model."""
    from onnxcompress.api import finetune as run_finetune
    from onnxcompress.config import FinetuneConfig, read_config_file
    from onnxcompress.runtime.model_io import check_output_path, model_file_size, save_model

    values = read_config_file(config_file) if config_file else {}
    training = values.get("training", {})
    flags = {key: value for key, value in (("epochs", epochs), ("labels", label_name)) if value is not None}
    if flags and isinstance(training, dict):  # a malformed section is left for validation to report
        values = {**values, "training": {**training, **flags}}
    if target is not None:
        algorithms = values.get("compression", [{"algorithm": "quantization"}])
        if isinstance(algorithms, list) and all(isinstance(a, dict) for a in algorithms):
            if config_file:
                _note_target_override(target, [a.get("target") for a in algorithms], config_file)
            values = {**values, "compression": [{**a, "target": target} for a in algorithms]}
    config = FinetuneConfig.build(values, source=str(config_file or "options"))
    output = output or model.with_name(model.stem + ".qat.int8.onnx")
    reads = (train_data, val_data, config_file)
    check_output_path(model, output, reads=reads)
    _check_side_outputs((model,), report, reads=(*reads, output))
    checkpoint_dir = checkpoint_dir or output.with_name(output.name + ".checkpoints")
    result = run_finetune(model, train_data, val_data, config, checkpoint_dir=checkpoint_dir, resume=resume,
                          progress=not no_progress)
    saved = save_model(result.model, output)
    if report:
        from onnxcompress.runtime.outputs import write_text_atomic

        write_text_atomic(report, json.dumps(result.summary(), indent=2))
    metric = config.training.metric.value
    click.echo(f"{metric}: compressed before training {result.initial_metric:.4f}, best {result.best_metric:.4f} "
               f"(epoch {result.best_epoch}); exported vs fake-quantized logits: max error "
               f"{result.export_error_float_path:.2e} (float path), {result.export_error_integer_kernels:.2e} "
               "(ONNX Runtime integer kernels) of the logit range"
               + (f"; channels removed vs zeroed {result.export_error_surgery:.2e}"
                  if result.export_error_surgery else ""))
    before, after = model_file_size(model), model_file_size(saved)
    click.echo(f"wrote {saved} ({after / 1e6:.2f} MB, {after / before:.2f}× of {before / 1e6:.2f} MB); "
               f"checkpoints in {checkpoint_dir}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(["openvino"]), default="openvino", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output folder.")
def export(model: Path, target: str, output: Path) -> None:
    """Convert MODEL to OpenVINO IR (.xml/.bin) in the output folder."""
    from onnxcompress.runtime.model_io import load_model
    from onnxcompress.runtime.openvino import export_openvino

    load_model(model)  # same validation and safety checks as every other command
    click.echo(f"wrote {export_openvino(model, output)}")


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved rounds; medians are reported.")
@click.option("--round-seconds", type=_ROUND_SECONDS, default=2.0, show_default=True)
@click.option("--inputs", "inputs_path",
              help="Real inputs (an .npz of per-input arrays or a folder of .npy feeds; the first `--batch` "
                   "samples are used) instead of seeded random data; needed for dynamic dimensions besides the batch.")
@click.option("--report", type=_OutputFile(), help="Write the measurements as JSON.")
@click.option("--plot", type=_OutputFile(), help="Write a PNG chart of latency and throughput.")
@click.option("--sparse-weights", "sparse_weights", type=float, metavar="RATE",
              help="Also measure every OpenVINO variant with CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE=RATE "
                   "(0 < RATE < 1: the least fraction of zero weights a layer needs). OpenVINO uses it only on "
                   "AMX CPUs, for INT8 FullyConnected layers; the report says what it does on this CPU.")
@click.option("--no-progress", is_flag=True)
def benchmark(models: tuple[Path, ...], batch: int, rounds: int, round_seconds: float, inputs_path: str | None,
              report: Path | None, plot: Path | None, sparse_weights: float | None, no_progress: bool) -> None:
    """Benchmark MODELS on OpenVINO (f32, default precision; latency and throughput) and ONNX Runtime.

    The first model is the baseline of the ratios.
    """
    from onnxcompress.runtime.benchmark import benchmark as run_benchmark
    from onnxcompress.runtime.benchmark import check_sparse_weights_rate, format_report, plot_report
    from onnxcompress.runtime.model_io import load_model
    from onnxcompress.runtime.outputs import write_text_atomic

    check_sparse_weights_rate(sparse_weights)
    _check_side_outputs(models, report, plot, reads=(inputs_path,))
    loaded = [load_model(model) for model in models]
    inputs = None
    if inputs_path is not None:
        from onnxcompress.data import calibration_batches, model_inputs

        inputs = next(calibration_batches(inputs_path, model_inputs(loaded[0]), subset_size=batch, batch_size=batch))
    del loaded
    labels = _labels(models)
    result = run_benchmark(dict(zip(labels, models)), batch=batch, rounds=rounds, round_seconds=round_seconds,
                           inputs=inputs, progress=not no_progress, sparse_weights_rate=sparse_weights)
    click.echo(format_report(result, baseline=labels[0]))
    if report:
        write_text_atomic(report, json.dumps(result.to_dict(), indent=2))
    if plot:
        plot_report(result, plot)


def _check_side_outputs(models: tuple[Path, ...], *outputs: Path | None, reads: tuple) -> None:
    """Refuse a report or plot path that cannot be written or would replace an input, before the run."""
    from onnxcompress.runtime.model_io import check_output_path

    for output in (o for o in outputs if o is not None):
        for model in models:
            check_output_path(model, output, reads=[r for r in reads if r is not None and r != output])


def _labels(models: tuple[Path, ...]) -> list[str]:
    stems = [m.stem for m in models]
    return stems if len(set(stems)) == len(stems) else [f"{i}:{s}" for i, s in enumerate(stems)]


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Inputs to compare on: folder of .npy feeds or an .npz.")
@click.option("--samples", type=click.IntRange(min=1), default=32, show_default=True, help="Number of samples to run.")
@click.option("--runtimes", "across_runtimes", is_flag=True,
              help="One model: OpenVINO against the ONNX semantics at every quantizer and layer.")
@click.option("--isolate", is_flag=True,
              help="With --runtimes: compile the file once per activation quantizer, that one alone, and rank the "
                   "quantizers by how far OpenVINO's deployed outputs then part from the ONNX semantics.")
@click.option("--plot", type=_OutputFile(), help="Write a PNG of SQNR per layer.")
def compare(models: tuple[Path, ...], data: str, samples: int, across_runtimes: bool, isolate: bool,
            plot: Path | None) -> None:
    """Per-layer error. FLOAT_MODEL QUANTIZED_MODEL: SQNR of every Conv/Gemm/MatMul output of the quantized
    model against the float one. MODEL --runtimes: where OpenVINO and ONNX Runtime part on the same file."""
    from onnxcompress.data import calibration_batches, model_inputs
    from onnxcompress.errors import ConfigError
    from onnxcompress.runtime.layer_error import (format_isolation, format_layer_errors, isolate_runtime_divergence,
                                                  layer_errors, plot_layer_error, runtime_divergence)
    from onnxcompress.runtime.model_io import load_model

    if isolate and not across_runtimes:
        raise ConfigError("--isolate works with --runtimes (one model)")
    expected = 1 if across_runtimes else 2
    if len(models) != expected:
        raise ConfigError(f"compare takes {'one model with --runtimes' if across_runtimes else 'two models'}, "
                          f"got {len(models)}")
    _check_side_outputs(models, plot, reads=(data,))
    loaded = [load_model(path) for path in models]
    feeds = list(calibration_batches(data, model_inputs(loaded[0]), subset_size=samples, batch_size=1))
    if across_runtimes:
        errors = runtime_divergence(loaded[0], feeds)
        titles = {"title": "OpenVINO vs ONNX semantics, same file", "ylabel": "SQNR OpenVINO vs ORT float (dB)"}
    else:
        errors, titles = layer_errors(loaded[0], loaded[1], feeds), {}
    click.echo(format_layer_errors(errors))
    if isolate:
        click.echo(format_isolation(isolate_runtime_divergence(loaded[0], feeds)))
    if plot:
        plot_layer_error(errors, plot, **titles)
        click.echo(f"wrote {plot}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--no-runtimes", is_flag=True, help="Skip compiling in ONNX Runtime and OpenVINO.")
def inspect(model: Path, no_runtimes: bool) -> None:
    """Ops, quantizers, sizes and which heavy ops run as INT8 in OpenVINO and ONNX Runtime; for a package folder,
    its manifest after verifying every file."""
    if model.is_dir():
        from onnxcompress.packaging.manifest import describe, verify_package

        click.echo(describe(verify_package(model), model))
        return
    from onnxcompress.inspection import format_inspection, inspect_model

    click.echo(format_inspection(inspect_model(model, runtimes=not no_runtimes)))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Package folder (created; an existing package there is replaced, anything else refused).")
@click.option("--name", help="Model name in the serving layouts (default: the model file's stem).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="The uncompressed model, for the model card's before/after table and plot.")
@click.option("--data", "eval_data", type=click.Path(path_type=Path),
              help="Evaluation .npz: arrays named after the model inputs, and `labels` for top-1.")
@click.option("--runtimes", default="onnxruntime,openvino", show_default=True,
              help="Runtimes to package and check the model in (comma-separated).")
def package(model: Path, output: Path, name: str | None, reference: Path | None, eval_data: Path | None,
            runtimes: str) -> None:
    """Write a deployment package of MODEL: ONNX and OpenVINO IR in the layouts OpenVINO Model Server and Triton
    serve as they are, a manifest with checksums, and a model card."""
    from onnxcompress.packaging.build import build_package

    folder = build_package(model, output, name=name, runtimes=tuple(_split((runtimes,))), reference=reference,
                           data=eval_data, reads=(model, reference, eval_data))
    click.echo(f"wrote {folder}")


@cli.command("run")
@click.argument("package_dir", metavar="PACKAGE", type=click.Path(path_type=Path))
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True,
              help="An .npz of arrays named after the model's inputs (fed as they are, batch included).")
@click.option("-o", "--output", type=_OutputFile(), required=True, help="An .npz of the outputs, by name.")
@click.option("--runtime", type=click.Choice(["openvino", "onnxruntime"]), default="openvino", show_default=True)
def run_package(package_dir: Path, input_path: Path, output: Path, runtime: str) -> None:
    """Run a package on the arrays of an .npz, after verifying every file of the package."""
    from onnxcompress.data import read_npz
    from onnxcompress.packaging.predictor import load_package, write_arrays
    from onnxcompress.runtime.model_io import refuse_overwriting_reads

    refuse_overwriting_reads([output], [input_path, *[p for p in package_dir.rglob("*") if p.is_file()]])
    predictor = load_package(package_dir, runtime)
    write_arrays(output, predictor(read_npz(input_path)))
    click.echo(f"wrote {output}")


@cli.command()
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), default=Path("onnxcompress-demo"),
              show_default=True, help="Where the quantized model, IR and report go.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--round-seconds", type=_ROUND_SECONDS, default=1.0, show_default=True)
def demo(output_dir: Path, rounds: int, round_seconds: float) -> None:
    """Quantize the bundled digits CNN, compile it to OpenVINO IR, benchmark it and print a before/after summary."""
    from onnxcompress.demo import run_demo

    run_demo(output_dir, rounds=rounds, round_seconds=round_seconds)


def _show_notes() -> None:
    """The library reports what it chose not to do (a skipped pass, a setting it overrides) through logging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    logger = logging.getLogger("onnxcompress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main() -> None:
    _show_notes()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the parent ignores Ctrl-C
        signal.signal(signal.SIGINT, cli.on_interrupt)
    try:
        cli.main(standalone_mode=False)
    except OnnxCompressError as error:
        click.secho(f"error: {error}", fg="red", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        # Every finally block has run; a native library's exit handlers could still hang in a half-initialised
        # state, so the interpreter is not finalised.
        _exit_interrupted("interrupted")


if __name__ == "__main__":
    main()
