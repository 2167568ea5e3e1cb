"""A BetterTogether run's report.md: every step's scores, its notes (a collapsed weight step is
flagged), the answers it gave on val, and what each kind adds (a weight step's val by checkpoint, an
r step's per-round chart, a g step's instructions before and after).

Written from the run folder alone (results-<strategy>.json and each step's step.json), so a
report can be rebuilt from any finished run. It reads records and draws them: it imports no optimizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from .charts import line_chart
from .evaluate import describe_failures
from .kinds import KINDS, pretty, results_path


def write_run_report(run_dir: str | Path, steps: Sequence[str]) -> Path:
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
        section = SECTIONS.get(record["kind"])
        if section is not None:
            label = pretty(record["prefix"].split("-"))
            lines += ["", f"## {label}: {KINDS[record['kind']].name}", ""]
            lines += section(run_dir / record["prefix"], record.get("details", {}))
    path = run_dir / f"report-{'-'.join(steps) or 'zero-shot'}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def checkpoint_section(folder: Path, details: dict[str, Any]) -> list[str]:
    """A w or w+ step's part of a run report: val by optimizer step, its start at step 0, and which
    checkpoint the step kept (a chart and a table)."""
    checkpoints = details.get("checkpoints", [])
    if not checkpoints:
        return [f"Kept its last checkpoint ({'keep_checkpoint=last' if details.get('trained') else 'nothing trained'});"
                " no checkpoint was scored on val."]
    kept = details.get("kept_step")
    series = {"val %": [c["val"] for c in checkpoints]}
    if any(c.get("train") is not None for c in checkpoints):
        series["train %"] = [c.get("train") for c in checkpoints]
    chart = line_chart(folder / "checkpoints.png", f"weight step: {folder.name}", [c["step"] for c in checkpoints],
                       series, "optimizer step (0: the program the step started from)", "%", mark=kept)
    lines = [f"![val by checkpoint]({folder.name}/{chart.name})"]
    losses = details.get("training", {}).get("step_losses")
    if losses:
        loss = line_chart(folder / "loss.png", f"weight step: {folder.name}, training loss", range(1, len(losses) + 1),
                          {"loss on the taught tokens": losses}, "optimizer step", "loss (mean per call)")
        lines.append(f"![training loss]({folder.name}/{loss.name})")
    lines += ["", "| checkpoint | epoch | val % | train % | failed (val) | answers on val |", "|---|---|---|---|---|---|"]
    for c in checkpoints:
        mark = " ← kept" if c["step"] == kept else ""
        name = "start" if c["step"] == 0 else f"step {c['step']}"
        answers = ", ".join(f"{value} {n}" for value, n in c["answers"].items())
        train = "-" if c.get("train") is None else f"{c['train']:.1f}"
        lines.append(f"| {name}{mark} | {c['epoch']:g} | {c['val']:.1f} | {train} | {c['val_errors']} | {answers} |")
    return lines


def policy_section(folder: Path, details: dict[str, Any]) -> list[str]:
    """The r step's part of a run report: a chart of val and mean reward per round, and a table."""
    rounds = details.get("rounds", [])
    if not rounds:
        return ["(no rounds)"]
    x = [0] + [r["round"] for r in rounds]
    chart = line_chart(folder / "rounds.png", f"r step: {folder.name}", x,
                       {"val %": [details.get("start_val")] + [r["val"] for r in rounds],
                        "mean reward of sampled runs %": [None] + [r["reward_mean"] for r in rounds]},
                       "round (0: the program the step started from)", "%", mark=details.get("best_round"))
    lines = [f"![r step rounds]({folder.name}/{chart.name})", "",
             "| round | val % | reward % | groups skipped | calls trained | loss | clipped | rollout s | update s "
             "| train tok/s | failed runs |", "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| 0 (start) | {details.get('start_val', 0):.1f} | | | | | | | | | |"]
    for r in rounds:
        val = "-" if r["val"] is None else f"{r['val']:.1f}"
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        clip = "-" if r["clip_fraction"] is None else f"{100 * r['clip_fraction']:.0f}%"
        failed = ", ".join(f"{n} {kind}" for kind, n in r["failures"].items())
        mark = " ← kept" if r["round"] == details.get("best_round") else ""
        lines.append(f"| {r['round']}{mark} | {val} | {r['reward_mean']:.1f} | {r['skipped_groups']}/{r['groups']} | "
                     f"{r['calls']} | {loss} | {clip} | {r['rollout_seconds']:.0f} | {r['update_seconds']:.0f} | "
                     f"{r['tokens_per_second']:.0f} | {failed} |")
    return lines


def _cell(text: str) -> str:
    """Text in a markdown table cell: pipes escaped, line breaks as <br>."""
    return (text or "(none)").replace("|", "\\|").replace("\n", "<br>")


def reflect_section(folder: Path, details: dict[str, Any]) -> list[str]:
    """The g step's section of report.md: the reflection LM, what was spent, each module's
    instructions before and after side by side, and every candidate scored on val."""
    reflector = details.get("reflection_lm", {})
    who = "the task's own LM" if details.get("reflection_lm_is_task_lm") else "another model"
    candidates = details.get("candidates", [])
    lines = [f"Reflection LM: {reflector.get('model', '?')} on {reflector.get('engine', '?')} ({who}). "
             f"Proposals: {len(details.get('proposals', []))}; candidates scored on val besides the starting "
             f"instructions: {max(len(candidates) - 1, 0)}; metric calls: {details.get('metric_calls', 0)} of "
             f"{details.get('max_metric_calls', 0)}; kept: candidate {details.get('best_candidate', 0)}.", "",
             "| module | instructions before | instructions after |", "|---|---|---|"]
    before, after = details.get("instructions_before", {}), details.get("instructions_after", {})
    for name in before:
        mark = "" if before[name] == after.get(name) else " (changed)"
        lines.append(f"| {name}{mark} | {_cell(before[name])} | {_cell(after.get(name, ''))} |")
    if candidates:
        lines += ["", "| candidate | parent | module changed | val % | failed (val) |", "|---|---|---|---|---|"]
        for c in candidates:
            parent = ", ".join(map(str, c["parents"])) or "-"
            lines.append(f"| {c['index']} | {parent} | {', '.join(c['changed']) or '-'} | {c['val']:.1f} | "
                         f"{c.get('val_errors', 0)} |")
    lines += ["", "A later weight step trains on prompts rendered with these instructions; as in the paper it drops "
              "the demos, never the instructions."]
    return lines


# What a kind adds to the report, from its folder and details (a chart, a diff); kinds without one add nothing.
SECTIONS: dict[str, Callable[[Path, dict[str, Any]], list[str]]] = {
    "w": checkpoint_section, "w+": checkpoint_section, "r": policy_section, "g": reflect_section}
