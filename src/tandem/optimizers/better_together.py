"""BetterTogether: a strategy of prompt (p) and weight (w, or extended w+) steps, each built on the last.

Every step is scored on the validation set (for selection) and the test set (for reporting
only); the step with the best validation score is returned. A run folder keeps each step's
program state, adapter, training data and scores. A step whose `step.json` exists is finished:
rerunning the same command loads it instead of redoing it, so an interrupted run resumes at the
first unfinished step. Steps are keyed by their strategy prefix (`p`, `p-w`, `p-w-p`), so runs
with strategies that share a prefix can share a folder and its finished steps.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UsageError
from ..evaluate import Metric, describe_failures, evaluate
from ..lm import honest_generation
from ..lm.base import LM
from ..program import Example, Program, load_state
from ..rundir import claim, data_digest, describe_lm, write_json
from ..settings import OptimizeSettings, to_dict
from .fewshot import bootstrap_fewshot_rs
from .weights import bootstrap_finetune

log = logging.getLogger(__name__)

STEP_NAMES = {  # a step's token in a strategy string, and what it is
    "p": "Π (prompts)",
    "w": "Θ (weights)",
    "w+": "Θ+ (weights, extended: sampled runs, rationalization, class balance)",
}
ZERO_SHOT = "zero-shot"


def parse_strategy(text: str) -> tuple[str, ...]:
    """`"p -> w -> p"` -> ("p", "w", "p"); anything else is refused with the valid form."""
    steps = tuple(part.strip().lower().replace(" ", "") for part in str(text).split("->"))
    if not steps or any(s not in STEP_NAMES for s in steps):
        raise UsageError(
            f"invalid strategy {text!r}: write steps 'p' (prompts), 'w' (weights, the paper's) and 'w+' "
            "(weights, extended) joined by '->', e.g. 'p', 'w', 'p -> w', 'p -> w -> p', 'p -> w+ -> p'"
        )
    return steps


def prefix_name(steps: Sequence[str]) -> str:
    return "-".join(steps) if steps else ZERO_SHOT


def pretty(steps: Sequence[str]) -> str:
    return " -> ".join(steps) if steps else ZERO_SHOT


@dataclass
class StepRecord:
    prefix: str  # e.g. "p-w"
    kind: str  # "p", "w", "w+" or "" for zero-shot
    val: float
    test: float | None
    seconds: float
    val_errors: int = 0
    test_errors: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, float | None] = field(default_factory=dict)  # reported beside `test`, never optimized
    val_failures: dict[str, int] = field(default_factory=dict)  # failed runs by kind
    test_failures: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return pretty(self.prefix.split("-")) if self.prefix != ZERO_SHOT else ZERO_SHOT


@dataclass
class BetterTogetherResult:
    program: Program
    best: str
    steps: list[StepRecord]

    def table(self) -> str:
        rows = [f"{'strategy':<16}{'val %':>8}{'test %':>8}{'failed':>8}{'time s':>9}  notes"]
        for s in self.steps:
            test = f"{s.test:8.1f}" if s.test is not None else f"{'-':>8}"
            mark = "  <- best (val)" if s.prefix == self.best else ""
            notes = s.details.get("notes", []) + ([f"val failed: {describe_failures(s.val_failures)}"]
                                                  if s.val_failures else [])
            rows.append(f"{s.label:<16}{s.val:8.1f}{test}{s.val_errors:>8}{s.seconds:9.0f}  {'; '.join(notes)}{mark}")
        return "\n".join(rows)


@dataclass
class _Score:
    score: float | None = None
    errors: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)


def _score(program, lm, examples, metric, settings: OptimizeSettings, desc, progress, also=None) -> _Score:
    if not examples:
        return _Score()
    r = evaluate(program, lm, examples, metric, settings.generation, progress=progress, desc=desc)
    return _Score(r.score, r.n_errors, r.failures(), {name: r.mean(m) for name, m in (also or {}).items()})


def take_step(
    kind: str,
    program: Program,
    lm: LM,
    train: Sequence[Example],
    val: Sequence[Example],
    metric: Metric,
    settings: OptimizeSettings,
    folder: Path,
    seed: int,
    progress: bool = True,
) -> tuple[Program, dict[str, Any]]:
    """One optimizer step; every optimizer has the same call shape."""
    if kind == "p":
        result = bootstrap_fewshot_rs(program, lm, train, val, metric, settings.prompts, seed=seed,
                                      generation=settings.generation, progress=progress)
        return result.program, result.summary()
    if kind in ("w", "w+"):
        result = bootstrap_finetune(program, lm, train, val, metric, settings.weights, out_dir=folder, seed=seed,
                                    generation=settings.generation, progress=progress, extended=kind == "w+")
        return result.program, result.summary()
    raise ValueError(f"unknown step kind {kind!r}")


def load_step(program: Program, folder: Path) -> tuple[Program, StepRecord] | None:
    """A finished step's program and record, or None if the step has not finished."""
    marker = folder / "step.json"
    if not marker.exists():
        return None
    record = StepRecord(**json.loads(marker.read_text(encoding="utf-8")))
    return program.with_state(load_state(folder / "program.json")), record


def better_together(
    program: Program,
    lm: LM,
    strategy: str | Sequence[str],
    train: Sequence[Example],
    val: Sequence[Example],
    test: Sequence[Example],
    metric: Metric,
    settings: OptimizeSettings = OptimizeSettings(),
    *,
    run_dir: str | Path,
    progress: bool = True,
    report_metrics: Mapping[str, Metric] | None = None,
    config: Mapping[str, Any] | None = None,
) -> BetterTogetherResult:
    """Run the strategy from `program`, resuming finished steps found in `run_dir`.

    `run_dir` holds one configuration (the LM, the data, `settings`, and whatever `config` adds,
    such as the task's name): a folder made with another one is refused, naming the field.
    `report_metrics` (name -> metric) are computed on test beside `metric` and never steer anything.
    """
    steps = parse_strategy(strategy) if isinstance(strategy, str) else tuple(strategy)
    run_dir = Path(run_dir)
    settings = replace(settings, generation=honest_generation(lm, settings.generation))
    claim(run_dir, {
        **(config or {}),
        "lm": describe_lm(lm),
        "data": {name: {"size": len(split), "digest": data_digest(split)}
                 for name, split in (("train", train), ("val", val), ("test", test))},
        "program": program.get_state(),
        "settings": to_dict(settings),
        "strategy": pretty(steps),
    })
    records: list[StepRecord] = []
    current = program
    finished = 0  # the leading steps already done in run_dir
    while finished <= len(steps) and (done := load_step(program, run_dir / prefix_name(steps[:finished]))):
        current, record = done
        records.append(record)
        finished += 1
    if finished:
        log.info("reusing finished steps in %s: %s", run_dir,
                 ", ".join(f"{r.label} (val {r.val:.1f}%)" for r in records))
    for depth in range(finished, len(steps) + 1):
        prefix = steps[:depth]
        folder = run_dir / prefix_name(prefix)
        started = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        details: dict[str, Any] = {}
        if depth > 0:
            # Each depth gets its own seed so that "p -> p" does not redraw the same candidates.
            current, details = take_step(steps[depth - 1], current, lm, train, val, metric, settings, folder,
                                         seed=settings.seed * 100 + depth, progress=progress)
        val_ = _score(current, lm, val, metric, settings, f"{prefix_name(prefix)} val", progress)
        test_ = _score(current, lm, test, metric, settings, f"{prefix_name(prefix)} test", progress, report_metrics)
        record = StepRecord(prefix_name(prefix), steps[depth - 1] if depth else "", val_.score, test_.score,
                            time.perf_counter() - started, val_.errors, test_.errors, details, test_.metrics,
                            val_.failures, test_.failures)
        current.save(folder / "program.json")
        write_json(folder / "step.json", asdict(record))  # written last: its presence means the step is finished
        records.append(record)
        log.info("step %s finished: val %.1f%%, test %s", record.label, record.val,
                 "-" if record.test is None else f"{record.test:.1f}%")

    # Selection never looks at test; ties go to fewer failed runs on val, then to the earlier step.
    best = max(records, key=lambda r: (r.val, -r.val_errors))
    best_program = load_step(program, run_dir / best.prefix)[0]
    result = BetterTogetherResult(best_program, best.prefix, records)
    summary = {"strategy": pretty(steps), "best": best.prefix, "steps": [asdict(r) for r in records]}
    write_json(results_path(run_dir, steps), summary)  # one file per strategy: strategies share the folder
    return result


def results_path(run_dir: str | Path, steps: Sequence[str]) -> Path:
    return Path(run_dir) / f"results-{prefix_name(steps)}.json"
