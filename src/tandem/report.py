"""A BetterTogether run's report.md: every step's scores, its notes (a collapsed weight step is
flagged), the answers it gave on val, and what each kind adds (an r step's per-round chart).

Written from the run folder alone (results-<strategy>.json and each step's step.json), so a
report can be rebuilt from any finished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def write_run_report(run_dir: str | Path, steps: Sequence[str]) -> Path:
    from .evaluate import describe_failures
    from .optimizers.better_together import KINDS, pretty, results_path

    run_dir = Path(run_dir)
    results = json.loads(results_path(run_dir, steps).read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    lines = [f"# tandem: {config.get('task', '?')}, strategy {pretty(steps)}", "",
             f"Model: {config.get('lm', {}).get('model', '?')}. Best step by val: **{results['best']}** "
             "(test is reported, never used to choose).", "",
             "| step | val % | test % | failed (val) | seconds | answers on val | notes |", "|---|---|---|---|---|---|---|"]
    for record in results["steps"]:
        details = record.get("details", {})
        test = "-" if record["test"] is None else f"{record['test']:.1f}"
        failed = str(record["val_errors"]) + (f" ({describe_failures(record['val_failures'])})"
                                             if record.get("val_failures") else "")
        mark = " ← best" if record["prefix"] == results["best"] else ""
        label = pretty(record["prefix"].split("-")) if record["kind"] else record["prefix"]
        lines.append(f"| {label}{mark} | {record['val']:.1f} | {test} | {failed} | {record['seconds']:.0f} | "
                     f"{details.get('val_answers', '')} | {'; '.join(details.get('notes', []))} |")
    for record in results["steps"]:
        kind = KINDS.get(record["kind"]) if record["kind"] else None
        if kind is not None and kind.report is not None:
            label = pretty(record["prefix"].split("-"))
            lines += ["", f"## {label}: {kind.name}", ""]
            lines += kind.report(run_dir / record["prefix"], record.get("details", {}))
    path = run_dir / f"report-{'-'.join(steps) or 'zero-shot'}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def line_chart(path: Path, title: str, x: Sequence[float], series: dict[str, Sequence[float | None]],
               xlabel: str, ylabel: str, mark: float | None = None) -> Path:
    """A small line chart (matplotlib, Agg), one line per series; `mark` draws a vertical line at that x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, values in series.items():
        points = [(a, b) for a, b in zip(x, values) if b is not None]
        if points:  # rewards of sampled runs dashed, beside the greedy val they are easy to confuse with
            ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if "reward" in name else "-")
    if mark is not None:
        ax.axvline(mark, color="#999999", linestyle="--", linewidth=1, label="kept")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and steps are whole numbers
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

