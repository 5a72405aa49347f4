"""Charts shown in the Dagster UI: lines or intervals in panels side by side saved as a PNG, and a PNG as a Markdown
image."""

from __future__ import annotations

import base64
import textwrap
from pathlib import Path

Points = list[tuple[float, float]]
Interval = tuple[str, float, float, float]  # (label, value, low end, high end)
LABEL_CHARS = 40  # an interval panel's x label wraps here: a longer line ran past the image's edge


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


Bar = tuple[float, str]  # (x, label): a threshold the intervals of a panel are judged against


def plot_intervals(panels: dict[str, list[Interval]], target: Path, bars: dict[str, Bar] | None = None) -> Path:
    """Panels side by side, one per title ({x label: intervals}, the label wrapped at LABEL_CHARS): each interval a
    point with its range, labelled on the left, the first on top, beside a line at 0 and a panel's bar ({x label:
    bar}: a dotted line, named in a legend; named only, where it lies far off the intervals); saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tallest = max(len(intervals) for intervals in panels.values())
    figure, all_axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 1 + 0.45 * tallest), dpi=100,
                                    squeeze=False)
    for axes, (xlabel, intervals) in zip(all_axes[0], panels.items()):
        labels, values, lows, highs = zip(*intervals)
        rows = range(len(intervals))
        axes.errorbar(values, rows, xerr=[[v - low for v, low in zip(values, lows)],
                                          [high - v for v, high in zip(values, highs)]],
                      fmt="o", capsize=4)
        axes.axvline(0, color="grey", linewidth=1, linestyle="--")
        axes.set_yticks(list(rows), labels)
        axes.set_ylim(len(intervals) - 0.5, -0.5)
        axes.set_xlabel(textwrap.fill(xlabel, LABEL_CHARS))
        axes.grid(axis="x", alpha=0.3)
        if bars and xlabel in bars:
            _bar(axes, *bars[xlabel])
    figure.tight_layout()
    figure.savefig(target, format="png")
    plt.close(figure)
    return target


def _bar(axes, x: float, label: str) -> None:
    """A dotted line at `x` named `label` in a legend above the panel (off the intervals); where it lies more than
    the panel's width off, the legend names it alone."""
    low, high = axes.get_xlim()
    if low - (high - low) <= x <= high + (high - low):
        axes.axvline(x, color="tab:red", linewidth=1.5, linestyle=":", label=label)
    else:
        axes.plot([], [], " ", label=f"{label} (off the chart)")
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize="small")  # above the panel


def markdown_image(png: Path, title: str) -> str:
    encoded = base64.b64encode(png.read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{encoded})"
