"""Charts shown in the Dagster UI: lines in panels side by side saved as a PNG, and a PNG as a Markdown image."""

from __future__ import annotations

import base64
from pathlib import Path

Points = list[tuple[float, float]]


def plot_panels(panels: dict[str, dict[str, Points]], target: Path, xlabel: str = "step") -> Path:
    """Charts side by side, one per panel ({y label: {line label: points}}), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, all_axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), dpi=100, squeeze=False)
    for axes, (ylabel, lines) in zip(all_axes[0], panels.items()):
        for label, found in lines.items():
            if found:
                axes.plot(*zip(*found), "o-", markersize=3, label=label)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        if any(lines.values()):
            axes.legend()
        else:
            axes.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axes.transAxes, color="grey")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(target)
    plt.close(figure)
    return target


def markdown_image(png: Path, title: str) -> str:
    encoded = base64.b64encode(png.read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{encoded})"
