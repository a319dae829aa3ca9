"""The model card of a package (its README.md): what the model takes and returns, what each runtime executes,
and, with a reference model and evaluation data, a before/after table of accuracy, size and speed with a plot.

Sizes are given raw and zip-compressed (DEFLATE at zip's default level, `compressed_model_size`): the second is
what a download costs, and the only one in which the zeros of a sparse model save anything.

Accuracy is top-1 against the `labels` array of the evaluation data when it has one, else the agreement of the
packaged model's first output with the reference model's (mean cosine similarity per sample). Speed comes from one
benchmark run of both models (interleaved rounds; only same-run ratios mean anything on a shared machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxcompress.data import model_inputs, read_npz, validate_feed
from onnxcompress.errors import DatasetError
from onnxcompress.packaging.manifest import RuntimeReport
from onnxcompress.runtime.model_io import compressed_model_size, model_file_size

LABELS = "labels"
PLOT = "before_after.png"
ZIP_ROW = "zip-compressed size (MB)"
#: Evaluation samples used at most; the card is a summary, not the evaluation itself.
MAX_SAMPLES = 1000


@dataclass
class ModelCard:
    """Measured numbers for the card; each row maps "reference"/"packaged" to a value (absent when not measured)."""

    size_bytes: dict[str, int] = field(default_factory=dict)
    compressed_bytes: dict[str, int] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    accuracy_kind: str = ""
    #: runtime → {"reference"/"packaged": median latency in ms}
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: int = 0
    plot: str | None = None

    def render(self, name: str, reports: dict[str, RuntimeReport], portability: str) -> str:
        lines = [f"# {name}", "", "Made by `onnxcompress package`; `manifest.json` lists the inputs, outputs, "
                 "settings and the SHA-256 of every file.", "", "## What runs where", ""]
        for runtime, report in reports.items():
            lines.append(f"- {runtime}: {report.int8_layers}/{report.heavy_layers} heavy layers INT8 ({report.detail})")
        lines += [f"- CPUs without VNNI: {portability}", ""]
        if len(self.size_bytes) > 1 or self.accuracy:
            lines += ["## Before / after", "", "| | reference | packaged |", "|---|---|---|"]
            lines.append(self._row("file size (MB)", self.size_bytes, lambda v: f"{v / 1e6:.2f}"))
            lines.append(self._row(ZIP_ROW, self.compressed_bytes, lambda v: f"{v / 1e6:.2f}"))
            if self.accuracy:
                lines.append(self._row(f"{self.accuracy_kind} ({self.samples} samples)", self.accuracy,
                                       lambda v: f"{v:.4f}"))
            for runtime, row in self.latency_ms.items():
                lines.append(self._row(f"latency {runtime} (ms, batch 1)", row, lambda v: f"{v:.3f}"))
            if self.plot:
                lines += ["", f"![before and after]({self.plot})"]
        lines += ["", "## Serving", "", "OpenVINO Model Server: `--model_name " + name + " --model_path openvino/"
                  + name + "`; Triton: `--model-repository triton` (onnxruntime backend).", ""]
        return "\n".join(lines)

    @staticmethod
    def _row(label: str, values: dict, fmt) -> str:
        cells = [fmt(values[who]) if who in values else "–" for who in ("reference", "packaged")]
        return f"| {label} | {cells[0]} | {cells[1]} |"


def measure_card(model: onnx.ModelProto, onnx_path: Path, runtimes: tuple[str, ...], *,
                 reference: str | os.PathLike | None, data: str | os.PathLike | None, folder: Path) -> ModelCard:
    """The card's numbers for the packaged `model` (written at `onnx_path`), the plot written into `folder`."""
    card = ModelCard(size_bytes={"packaged": model_file_size(onnx_path)},
                     compressed_bytes={"packaged": compressed_model_size(onnx_path)})
    if reference is not None:
        card.size_bytes["reference"] = model_file_size(reference)
        card.compressed_bytes["reference"] = compressed_model_size(reference)
        card.latency_ms = _latencies(Path(reference), onnx_path, runtimes)
    if data is not None:
        _measure_accuracy(card, model, reference, Path(data))
    if reference is not None or data is not None:
        card.plot = _plot(card, folder / PLOT)
    return card


def load_eval_data(path: Path, model: onnx.ModelProto) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Single-sample feeds of an .npz (at most MAX_SAMPLES) checked against the model, and its labels if any."""
    if path.suffix != ".npz" or not path.is_file():
        raise DatasetError(f"evaluation data must be an .npz file of per-input arrays (and `labels`), got {path}")
    arrays = read_npz(path, limit=MAX_SAMPLES)
    labels = arrays.pop(LABELS, None)
    inputs = model_inputs(model)
    count = len(next(iter(arrays.values()), []))
    feeds = [validate_feed({k: v[i:i + 1] for k, v in arrays.items()}, inputs, i) for i in range(count)]
    if not feeds:
        raise DatasetError(f"{path} holds no evaluation sample")
    return feeds, labels


def _measure_accuracy(card: ModelCard, packaged: onnx.ModelProto, reference: str | os.PathLike | None,
                      data: Path) -> None:
    feeds, labels = load_eval_data(data, packaged)
    card.samples = len(feeds)
    outputs = {"packaged": _first_outputs(packaged, feeds)}
    if reference is not None:
        outputs["reference"] = _first_outputs(Path(reference), feeds)
    if labels is not None:
        card.accuracy_kind = "top-1"
        card.accuracy = {who: float((o.reshape(len(o), -1).argmax(1) == labels[:len(o)]).mean())
                         for who, o in outputs.items()}
    elif reference is not None:
        card.accuracy_kind = "cosine vs reference"
        ref = outputs["reference"].reshape(len(feeds), -1).astype(np.float64)
        got = outputs["packaged"].reshape(len(feeds), -1).astype(np.float64)
        cosine = (ref * got).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-30)
        card.accuracy = {"reference": 1.0, "packaged": float(cosine.mean())}


def _first_outputs(model: onnx.ModelProto | Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    from onnxcompress.runtime.model_io import runtime_source

    with runtime_source(model) as source:
        session = ort.InferenceSession(source.readable, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def _latencies(reference: Path, packaged: Path, runtimes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    from onnxcompress.runtime.benchmark import benchmark

    report = benchmark({"reference": reference, "packaged": packaged}, rounds=3, round_seconds=0.5,
                       openvino_precisions=("default",) if "openvino" in runtimes else (),
                       include_ort="onnxruntime" in runtimes, include_throughput=False, progress=False)
    latencies: dict[str, dict[str, float]] = {}
    for measurement in report.measurements:
        runtime = "OpenVINO" if measurement.engine == "openvino" else "ONNX Runtime"
        latencies.setdefault(runtime, {})[measurement.model] = measurement.median_ms
    return latencies


def _plot(card: ModelCard, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if card.accuracy:
        panels.append((card.accuracy_kind, card.accuracy))
    panels += [(f"latency {runtime} (ms)", row) for runtime, row in card.latency_ms.items()]
    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(3.2 * (1 + len(panels)), 3), squeeze=False)
    _plot_sizes(axes[0][0], card)
    for axis, (title, values) in zip(axes[0][1:], panels):
        names = [who for who in ("reference", "packaged") if who in values]
        axis.bar(names, [values[n] for n in names], color=["#999999", "#2a7ab0"][-len(names):])
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def _plot_sizes(axis, card: ModelCard) -> None:
    """Raw and zip-compressed size side by side for each model."""
    names = [who for who in ("reference", "packaged") if who in card.size_bytes]
    positions = np.arange(len(names))
    for offset, (label, sizes, color) in zip((-0.2, 0.2), (("raw", card.size_bytes, "#999999"),
                                                          ("zip", card.compressed_bytes, "#2a7ab0"))):
        axis.bar(positions + offset, [sizes[n] / 1e6 for n in names], width=0.4, label=label, color=color)
    axis.set_xticks(positions, names)
    axis.set_title("size (MB)", fontsize=9)
    axis.legend(fontsize=8)
