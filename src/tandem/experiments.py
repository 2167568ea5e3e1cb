"""The paper's comparison as one grid: strategies x seeds on one task, and a report to look at.

Within a seed, all strategies share one run folder, and steps are keyed by strategy prefix, so
Π→Θ→Π continues from the same seed's Π→Θ, which continues from Π: shared prefixes are computed
once. Every cell is the held-out test score of the strategy's final program.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .evaluate import describe_failures
from .lm import honest_generation
from .lm.base import LM
from .charts import bar_chart, line_chart
from .kinds import KINDS, label, parse_strategy, prefix_name
from .optimizers.better_together import better_together
from .program import Program
from .rundir import FREE, claim, describe_lm
from .settings import BUDGETS, JobSettings, resolve_budget, to_dict
from .tasks import Task
from .tracking import NO_TRACKING, Tracker

log = logging.getLogger(__name__)

# The paper's rows, in its order: label -> strategy ("" is the unoptimized program).
STRATEGIES = {
    "vanilla": "",
    "Π": "p",
    "Θ": "w",
    "Π→Θ": "p -> w",
    "Θ→Π": "w -> p",
    "Π→Θ→Π": "p -> w -> p",
    "Π→Π": "p -> p",
    "Θ→Θ": "w -> w",
}
# Beyond the paper: the same rows with the extended weight step (w+), to compare side by side.
EXTENDED = {"Θ+": "w+", "Π→Θ+": "p -> w+", "Π→Θ+→Π": "p -> w+ -> p"}
# ... and with policy optimization over program runs (r).
POLICY = {"R": "r", "Π→R": "p -> r", "Π→R→Π": "p -> r -> p"}
# ... and with instructions evolved by GEPA (g), alone and composed with demos and weights.
REFLECT = {"G": "g", "G→Π": "g -> p", "Π→G": "p -> g", "G→Θ→G": "g -> w -> g", "Π→Θ→G": "p -> w -> g"}
GROUPS = {"all": STRATEGIES, "extended": EXTENDED, "policy": POLICY, "reflect": REFLECT}
# Report rows: the paper's order, each extended, policy or reflect row beside its paper twin; other rows follow.
ORDER = ["vanilla", "Π", "G", "Θ", "Θ+", "R", "Π→Θ", "Π→Θ+", "Π→R", "Θ→Π", "G→Π", "Π→G", "Π→Θ→Π", "Π→Θ+→Π",
         "Π→R→Π", "G→Θ→G", "Π→Θ→G", "Π→Π", "Θ→Θ"]


def parse_strategies(text: str) -> dict[str, str]:
    """A comma-separated list of groups (`all`: the paper's rows, `extended`: the Θ+ rows, `policy`:
    the R rows, `reflect`: the G rows), labels (`Π→Θ+`) or strategies (`vanilla, p -> w`); a strategy's
    row is its label (`p -> r -> p` is Π→R→Π)."""
    chosen = {}
    labels = {k: v for group in GROUPS.values() for k, v in group.items()}
    for part in (p.strip() for p in text.split(",")):
        if part in GROUPS:
            chosen.update(GROUPS[part])
        elif part in labels:
            chosen[part] = labels[part]
        elif part in ("vanilla", "zero-shot"):
            chosen["vanilla"] = ""
        else:
            steps = parse_strategy(part)
            chosen[label(steps)] = " -> ".join(steps)
    return chosen


@dataclass
class Cell:
    task: str
    strategy: str  # the row label, e.g. "Π→Θ"
    seed: int
    val: float
    test: float | None
    seconds: float  # this strategy's own last step
    total_seconds: float  # every step of the strategy, shared prefixes included
    notes: str = ""
    test_failed: int | None = None  # test examples whose run failed (an unparsed reply, say), scored 0
    test_metrics: dict[str, float | None] = field(default_factory=dict)  # the task's report metrics on test
    test_failures: dict[str, int] = field(default_factory=dict)  # failed test runs by kind


def run_grid(
    task: Task,
    program: Program,
    lm: LM,
    strategies: dict[str, str],
    seeds: Sequence[int],
    job: JobSettings,
    run_dir: str | Path,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    reflection_lm: LM | None = None,
    tracker: Tracker = NO_TRACKING,
) -> list[Cell]:
    """Every strategy for every seed; returns this call's cells and merges them into cells.json.

    The folder holds one configuration (refused otherwise, naming the field); more seeds or
    strategies extend it. `reflection_lm`: the LM g steps reflect with (default: `lm`). `tracker`: the
    grid's run (tracking.py), which gets a nested run per seed and strategy, each with its steps.
    """
    run_dir = Path(run_dir)
    job = replace(job, optimize=replace(job.optimize, generation=honest_generation(lm, job.optimize.generation)))
    reflects = any(KINDS[s].reflects for strategy in strategies.values() if strategy for s in parse_strategy(strategy))
    claimed = {**(config or {}), "task": task.name, "lm": describe_lm(lm), "settings": to_dict(job),
               "strategies": list(strategies.values()), "seeds": list(seeds),
               **({"reflection_lm": describe_lm(reflection_lm or lm)} if reflects else {})}
    claim(run_dir, claimed)
    tracker.params({k: v for k, v in claimed.items() if k not in FREE})  # a rerun may add seeds and strategies
    train, val, test = task.sized(job.data)
    cells = []
    for seed in seeds:
        settings = replace(job.optimize, seed=seed)
        for label, strategy in strategies.items():
            steps = parse_strategy(strategy) if strategy else ()
            log.info("seed %d, %s", seed, label)
            tags = {"tandem.seed": seed, "tandem.strategy": label}
            with tracker.child(f"seed-{seed}/{prefix_name(steps)}", f"{label} seed {seed}", tags) as cell:
                result = better_together(program, lm, steps, train, val, test, task.metric, settings,
                                         run_dir=run_dir / f"seed-{seed}", progress=progress,
                                         report_metrics=task.report_metrics, config={"task": task.name},
                                         reflection_lm=reflection_lm, feedback=task.feedback, tracker=cell)
                cell.metrics({"total_seconds": sum(s.seconds for s in result.steps)})
            last = result.steps[-1]
            cells.append(Cell(task.name, label, seed, last.val, last.test, last.seconds,
                              sum(s.seconds for s in result.steps), "; ".join(last.details.get("notes", [])),
                              last.test_errors, last.test_metrics, last.test_failures))
    old = read_cells(run_dir) if (run_dir / "cells.json").exists() else []
    mine = {(c.task, c.strategy, c.seed) for c in cells}
    write_cells(run_dir, [c for c in old if (c.task, c.strategy, c.seed) not in mine] + cells)
    return cells


def write_cells(run_dir: Path, cells: Sequence[Cell]) -> None:
    (run_dir / "cells.json").write_text(json.dumps([asdict(c) for c in cells], indent=1, ensure_ascii=False), encoding="utf-8")
    rows = []
    for c in cells:  # CSV: one column per report metric
        row = asdict(c)
        row.update({f"test {name}": value for name, value in row.pop("test_metrics").items()})
        row["test_failures"] = describe_failures(row["test_failures"])
        rows.append(row)
    with open(run_dir / "cells.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def read_cells(run_dir: Path) -> list[Cell]:
    path = Path(run_dir) / "cells.json"
    if not path.exists():
        raise FileNotFoundError(f"no results in {run_dir}: run `tandem experiment --run-dir {run_dir}` first")
    return [Cell(**c) for c in json.loads(path.read_text(encoding="utf-8"))]


def summarize(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One row per strategy in the paper's order: mean and standard deviation over seeds."""
    rows = []
    order = ORDER + sorted({c.strategy for c in cells} - set(ORDER))
    for label in order:
        group = [c for c in cells if c.strategy == label]
        if not group:
            continue
        test_mean, test_std = _spread([c.test for c in group]) or (None, 0.0)
        failed = [c.test_failed for c in group if c.test_failed is not None]  # None: results from before it was kept
        rows.append({
            "strategy": label,
            "seeds": len(group),
            "test_mean": test_mean,
            "test_std": test_std,
            "val_mean": statistics.mean(c.val for c in group),
            "failed": statistics.mean(failed) if failed else None,
            "failure_kinds": _mean_failures(group),
            "metrics": _mean_metrics(group),
            "seconds": statistics.mean(c.seconds for c in group),
            "notes": sorted({c.notes for c in group if c.notes}),
        })
    return rows


def _spread(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean and standard deviation of the values that are there (one value: std 0), or None."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    return statistics.mean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def _mean_failures(cells: Sequence[Cell]) -> dict[str, float]:
    """Failed runs per kind, mean over the cells (a cell without that kind counts 0)."""
    kinds = Counter()
    for c in cells:
        kinds.update(c.test_failures)
    return {kind: n / len(cells) for kind, n in kinds.most_common()}


def _mean_metrics(cells: Sequence[Cell]) -> dict[str, tuple[float, float] | None]:
    """Per report metric: mean and standard deviation over the cells that have it."""
    names = dict.fromkeys(name for c in cells for name in c.test_metrics)
    return {name: _spread([c.test_metrics.get(name) for c in cells]) for name in names}


def write_report(run_dir: str | Path) -> Path:
    """report.md, a PNG chart per task, from the saved cells; the config is read from the run folder."""
    run_dir = Path(run_dir)
    cells = read_cells(run_dir)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8")) if (run_dir / "config.json").exists() else {}
    lines = [f"# tandem experiment: {config.get('task', '?')} on {config.get('model', '?')}", "", _decoding(config), ""]
    for task in sorted({c.task for c in cells}):
        rows = summarize([c for c in cells if c.task == task])
        seeds = max(r["seeds"] for r in rows)
        title = f"{task}, {config.get('model', '')}, mean ± std over {seeds} seed(s)"
        test_size = config.get("settings", {}).get("data", {}).get("test_size")
        chart = bar_chart(rows, title, run_dir / f"{task}.png", test_size)
        also = list(dict.fromkeys(name for r in rows for name in r["metrics"]))  # the task's report metrics
        header = ["strategy", "test % (mean ± std)", *[f"{name} %" for name in also], "val %", "failed runs (test)",
                  "seeds", "time per cell (s)", "notes"]
        lines += [f"## {task}", "", f"![{task}]({chart.name})", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for r in rows:
            cols = [r["strategy"], _test(r), *[_mean_std(r["metrics"].get(name)) for name in also], f"{r['val_mean']:.1f}",
                    _failed(r, test_size), r["seeds"], f"{r['seconds']:.0f}", "; ".join(r["notes"])]
            lines.append("| " + " | ".join(map(str, cols)) + " |")
        lines.append("")
        lines += rounds_section(run_dir, task)
    lines += ["## Settings", "", "```json", json.dumps(config, indent=1, ensure_ascii=False), "```", "",
              "Cells: `cells.csv` and `cells.json` (one row per strategy and seed). The time of a cell is its own",
              "last step; steps shared with a shorter strategy are counted once, where they were computed.",
              "Failed runs are test examples whose program run failed (an unparseable reply, say), mean over seeds;",
              "they score 0. Columns between test and val are the task's report metrics on test (HotPotQA: answer",
              "F1, gold paragraphs retrieved), shown beside the paper's metric and never optimized."]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rounds_section(run_dir: Path, task: str) -> list[str]:
    """Val and mean sampled reward per round of every r step in the grid (one line each per seed), as
    one chart: where policy optimization moved the program, and where it only sampled."""
    steps = []
    for marker in sorted(run_dir.glob("seed-*/*/step.json")):
        record = json.loads(marker.read_text(encoding="utf-8"))
        if record.get("kind") == "r" and record.get("details", {}).get("rounds"):
            steps.append((marker.parent.parent.name, record["prefix"], record["details"]))
    if not steps:
        return []
    series: dict[str, list[float | None]] = {}
    longest = max(len(d["rounds"]) for _, _, d in steps)
    for seed, prefix, details in steps:
        name = f"{label(prefix.split('-'))}, {seed}"
        by_round = {r["round"]: r for r in details["rounds"]}
        series[f"val: {name}"] = [details.get("start_val")] + [by_round.get(k, {}).get("val") for k in range(1, longest + 1)]
        series[f"reward: {name}"] = [None] + [by_round[k]["reward_mean"] if k in by_round else None
                                             for k in range(1, longest + 1)]
    chart = line_chart(run_dir / f"{task}-rounds.png", f"{task}: r steps, val (greedy) and mean reward of sampled "
                       "runs per round", list(range(longest + 1)), series, "round (0: the step's start)", "%")
    lines = ["### r steps, round by round", "", f"![{task} rounds]({chart.name})", "",
             "| step | seed | kept round | val by round | reward by round | groups skipped |", "|---|---|---|---|---|---|"]
    for seed, prefix, details in steps:
        vals = " → ".join("-" if v is None else f"{v:.0f}" for v in
                          [details.get("start_val")] + [r["val"] for r in details["rounds"]])
        rewards = " → ".join(f"{r['reward_mean']:.0f}" for r in details["rounds"])
        lines.append(f"| {label(prefix.split('-'))} | {seed} | {details.get('best_round')} | {vals} | {rewards} | "
                     f"{details.get('skipped_groups')}/{details.get('groups')} |")
    return lines + [""]


def _decoding(config: Mapping[str, Any]) -> str:
    """One line on how replies were decoded, what the extended weight step (Θ+ rows) added and what reflected
    for the G rows."""
    optimize = config.get("settings", {}).get("optimize", {})
    constrained = optimize.get("generation", {}).get("constrained")
    line = {True: "Decoding: constrained to each module's reply format (every field, typed values).",
            False: "Decoding: free, parsed after the fact (the paper's setup)."}.get(constrained, "Decoding: free.")
    extended = optimize.get("weights", {}).get("extended")
    if extended and any("w+" in s for s in config.get("strategies", [])):
        line += (f" Θ+ rows: the weight step adds {extended['samples']} sampled runs per example at temperature "
                 f"{extended['sample_temperature']}, rationalization {'on' if extended['rationalize'] else 'off'}, "
                 f"class balance {'on' if extended['balance'] else 'off'}; Θ rows are the paper's.")
    reflector, reflection = config.get("reflection_lm"), optimize.get("reflection")
    if reflector and reflection:
        same = reflector == config.get("lm")
        line += (f" G rows: GEPA evolves the instructions, {reflection['max_metric_calls']} metric calls per step, "
                 f"the reflection LM {'the task model itself' if same else reflector.get('model', '?')}"
                 f"{'' if same else ' on ' + str(reflector.get('engine', '?'))}.")
    return line


def _mean_std(value: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value[0]:.1f} ± {value[1]:.1f}"


def _test(row: dict[str, Any]) -> str:
    return _mean_std(None if row["test_mean"] is None else (row["test_mean"], row["test_std"]))


def _failed(row: dict[str, Any], total: int | None) -> str:
    """"50/50: 50 truncated at 96 tokens before Species": how many failed, and why."""
    if row["failed"] is None:
        return "-"
    of = f"/{total}" if total else ""
    kinds = ", ".join(f"{round(n, 1):g} {kind}" for kind, n in row["failure_kinds"].items())
    return f"{round(row['failed'], 1):g}{of}" + (f": {kinds}" if kinds else "")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(run_dir: str | Path) -> str:
    rows = summarize(read_cells(Path(run_dir)))
    out = [f"{'strategy':<10}{'test % mean ± std':>20}{'val %':>8}{'failed':>8}{'seeds':>7}"]
    for r in rows:
        out.append(f"{r['strategy']:<10}{_test(r):>20}{r['val_mean']:>8.1f}{_number(r['failed']):>8}{r['seeds']:>7}")
    return "\n".join(out)


__all__ = ["STRATEGIES", "BUDGETS", "resolve_budget", "parse_strategies", "run_grid", "write_report",
           "read_cells", "summarize", "table"]
