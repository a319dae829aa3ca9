"""What pruning did, for a person: totals, MACs and weights per layer before and after, each channel group's
outcome (and why a group was kept), and a bar chart of MACs per layer."""

from __future__ import annotations

import io
from pathlib import Path

from onnxcompress.algorithms.pruning.oneshot import PruneResult
from onnxcompress.runtime.outputs import write_bytes_atomic


def summary(result: PruneResult) -> str:
    """One line: MACs and weights before → after."""
    return (f"MACs {result.macs_before / 1e6:.1f} M → {result.macs_after / 1e6:.1f} M "
            f"({1 - result.macs_after / result.macs_before:.1%} fewer), weights {result.weights_before / 1e6:.2f} M → "
            f"{result.weights_after / 1e6:.2f} M; {sum(g.channels_after < g.channels_before for g in result.groups)} "
            f"of {len(result.groups)} channel groups pruned, by up to {result.largest_cut:.1%} of their filters")


def markdown(result: PruneResult, plot: str | None = None) -> str:
    lines = ["# Filter pruning", "", summary(result), ""]
    if plot:
        lines += [f"![MACs per layer]({plot})", ""]
    lines += ["## Layers", "", "| layer | op | out channels | in channels | MACs (M) | weights (K) |",
              "|---|---|---|---|---|---|"]
    for layer in result.layers:
        lines.append(f"| {layer.node} | {layer.op} | {layer.channels_before[0]} → {layer.channels_after[0]} | "
                     f"{layer.channels_before[1]} → {layer.channels_after[1]} | {layer.macs_before / 1e6:.2f} → "
                     f"{layer.macs_after / 1e6:.2f} | {layer.weights_before / 1e3:.1f} → "
                     f"{layer.weights_after / 1e3:.1f} |")
    lines += ["", "## Channel groups", "", "| filters of | channels | not pruned because |", "|---|---|---|"]
    for group in result.groups:
        lines.append(f"| {', '.join(group.producers)} | {group.channels_before} → {group.channels_after} | "
                     f"{group.reason or ''} |")
    return "\n".join(lines) + "\n"


def write_report(result: PruneResult, path: Path) -> None:
    """`path` (Markdown) and, beside it, `<stem>.png`: MACs per layer before and after."""
    plot = path.with_suffix(".png")
    write_plot(result, plot)
    write_bytes_atomic(path, markdown(result, plot.name).encode())


def write_plot(result: PruneResult, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = result.layers
    figure = Figure(figsize=(max(6.0, 0.14 * len(layers) + 2), 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    positions = range(len(layers))
    axes.bar(positions, [layer.macs_before / 1e6 for layer in layers], color="lightgray", label="before")
    axes.bar(positions, [layer.macs_after / 1e6 for layer in layers], color="tab:blue", label="after")
    axes.set_xlabel("compute layer (graph order)")
    axes.set_ylabel("MACs per sample (M)")
    axes.set_title(f"Filter pruning: {1 - result.macs_after / result.macs_before:.1%} fewer MACs")
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())
