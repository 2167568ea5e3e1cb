"""Charts beside the tables (matplotlib, drawn off-screen to PNG): a grid's bars per strategy and the
line charts of steps that go in rounds or checkpoints. Anything above may draw with these; they read
plain rows and series, nothing of tandem's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    # matplotlib: imported when a chart is drawn, not when a run starts (it takes a second to import).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(rows: Sequence[dict[str, Any]], title: str, path: Path, test_size: int | None = None) -> Path:
    """A grid's chart: bars per strategy with error bars (`rows` as experiments.summarize makes them), the
    task's metric, and below it one panel per report metric."""
    plt = _pyplot()

    labels = [r["strategy"] for r in rows]
    panels = [("test accuracy (%)", [(r["test_mean"] or 0.0, r["test_std"]) for r in rows], True)]
    for name in dict.fromkeys(name for r in rows for name in r["metrics"]):
        panels.append((f"{name} (%)", [r["metrics"].get(name) or (0.0, 0.0) for r in rows], False))
    fig, axes = plt.subplots(len(panels), 1, figsize=(1.1 * len(rows) + 2, 1.2 + 3.0 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (ylabel, values, main) in zip(axes[:, 0], panels):
        means, errors = [m for m, _ in values], [e for _, e in values]
        colors = ["#9aa5b1"] + ["#3b7dd8" if main else "#6aa84f"] * (len(rows) - 1)  # vanilla in grey
        bars = ax.bar(labels, means, yerr=errors, capsize=4, color=colors)
        for bar, mean, error, row in zip(bars, means, errors, rows):
            of = f"/{test_size}" if test_size else ""
            failed = f"\n{row['failed']:.0f}{of} failed" if main and row.get("failed") else ""  # explains a low bar
            ax.annotate(f"{mean:.1f}{failed}", (bar.get_x() + bar.get_width() / 2, mean + error), ha="center", va="bottom",
                        xytext=(0, 3), textcoords="offset points", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(100.0, max(m + e for m, e in zip(means, errors)) + 5))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_chart(path: Path, title: str, x: Sequence[float], series: dict[str, Sequence[float | None]],
               xlabel: str, ylabel: str, mark: float | None = None) -> Path:
    """A small line chart, one line per series; `mark` draws a vertical line at that x."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, values in series.items():
        points = [(a, b) for a, b in zip(x, values) if b is not None]
        if points:  # rewards of sampled runs dashed, beside the greedy val they are easy to confuse with
            ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if "reward" in name else "-")
    if mark is not None:
        ax.axvline(mark, color="#999999", linestyle="--", linewidth=1, label="kept")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and steps are whole numbers
    if ylabel == "%":  # the whole scale: a flat line at 30% must not look like a cliff
        ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
