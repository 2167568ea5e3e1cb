"""BetterTogether: a strategy of prompt and weight steps (`KINDS`: p, g, w, w+, r), each built on the last.

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
from typing import Any, Callable, Mapping, Sequence

from ..answers import ValScore, answers, collapse_note, describe_answers
from ..evaluate import EvalResult, Feedback, Metric, describe_failures, evaluate
from ..kinds import KINDS, ZERO_SHOT, parse_strategy, prefix_name, pretty, results_path
from ..lm import honest_generation
from ..lm.base import LM
from ..program import Example, Program, load_state
from ..report import write_run_report
from ..rundir import claim, data_digest, describe_lm, write_json
from ..settings import OptimizeSettings, to_dict
from ..tracking import NO_TRACKING, Tracker, track_step
from .fewshot import bootstrap_fewshot_rs
from .policy import policy_optimize
from .reflect import evolve_instructions
from .weights import bootstrap_finetune

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What every step is given besides the program it starts from."""

    lm: LM
    train: Sequence[Example]
    val: Sequence[Example]
    metric: Metric
    settings: OptimizeSettings
    folder: Path  # the step's own folder: adapters, training data, anything it needs to resume
    seed: int
    progress: bool = True
    reflection_lm: LM | None = None  # g steps: the LM that reads traces and writes instructions (None: `lm`)
    feedback: Feedback | None = None  # g steps: the task's feedback on a run (None: the gold answer)
    start: ValScore | None = None  # the program's val score, from the step before: weight steps keep the best


def _prompts(program: Program, ctx: StepContext):
    result = bootstrap_fewshot_rs(program, ctx.lm, ctx.train, ctx.val, ctx.metric, ctx.settings.prompts, seed=ctx.seed,
                                  generation=ctx.settings.generation, progress=ctx.progress, start=ctx.start)
    return result.program, result.summary()


def _weights(extended: bool):
    def run(program: Program, ctx: StepContext):
        result = bootstrap_finetune(program, ctx.lm, ctx.train, ctx.val, ctx.metric, ctx.settings.weights,
                                    out_dir=ctx.folder, seed=ctx.seed, generation=ctx.settings.generation,
                                    progress=ctx.progress, extended=extended, start=ctx.start)
        return result.program, result.summary()
    return run


def _policy(program: Program, ctx: StepContext):
    result = policy_optimize(program, ctx.lm, ctx.train, ctx.val, ctx.metric, ctx.settings.policy,
                             ctx.settings.weights.lora, out_dir=ctx.folder, seed=ctx.seed,
                             generation=ctx.settings.generation, progress=ctx.progress,
                             keep=ctx.settings.weights.keep_checkpoint)
    return result.program, result.summary()


def _reflect(program: Program, ctx: StepContext):
    result = evolve_instructions(program, ctx.lm, ctx.train, ctx.val, ctx.metric, ctx.settings.reflection,
                                 out_dir=ctx.folder, reflection_lm=ctx.reflection_lm, feedback=ctx.feedback,
                                 seed=ctx.seed, generation=ctx.settings.generation, progress=ctx.progress)
    return result.program, result.summary()


# How each kind of step runs (the kinds themselves: kinds.py); every runner has the same call shape.
RUNS: dict[str, Callable[[Program, StepContext], tuple[Program, dict[str, Any]]]] = {
    "p": _prompts, "w": _weights(False), "w+": _weights(True), "r": _policy, "g": _reflect}
assert RUNS.keys() == KINDS.keys(), "every step kind in kinds.py needs a runner here"


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
    val_answers: dict[str, int] = field(default_factory=dict)  # a choice-typed answer's values on val, most first

    @property
    def label(self) -> str:
        return pretty(self.prefix.split("-")) if self.prefix != ZERO_SHOT else ZERO_SHOT


@dataclass
class BetterTogetherResult:
    program: Program
    best: str
    steps: list[StepRecord]
    report: Path | None = None  # report-<strategy>.md in the run folder

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
    answers: dict[str, int] = field(default_factory=dict)
    result: EvalResult | None = None  # the evaluation itself: its runs and traces (a tracker reports them)


def _score(program, lm, examples, metric, settings: OptimizeSettings, desc, progress, also=None) -> _Score:
    if not examples:
        return _Score()
    r = evaluate(program, lm, examples, metric, settings.generation, progress=progress, desc=desc)
    return _Score(r.score, r.n_errors, r.failures(), {name: r.mean(m) for name, m in (also or {}).items()},
                  answers(program, r), r)


def take_step(kind: str, program: Program, ctx: StepContext) -> tuple[Program, dict[str, Any]]:
    """One optimizer step; every kind has the same call shape."""
    if kind not in RUNS:
        raise ValueError(f"unknown step kind {kind!r}")
    return RUNS[kind](program, ctx)


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
    reflection_lm: LM | None = None,
    feedback: Feedback | None = None,
    tracker: Tracker = NO_TRACKING,
) -> BetterTogetherResult:
    """Run the strategy from `program`, resuming finished steps found in `run_dir`.

    `run_dir` holds one configuration (the LM, the data, `settings`, and whatever `config` adds,
    such as the task's name): a folder made with another one is refused, naming the field.
    `report_metrics` (name -> metric) are computed on test beside `metric` and never steer anything.
    `reflection_lm`: the LM that g steps reflect with (default: `lm`); where the strategy has one, the
    folder records it and refuses another later. `feedback`: the task's feedback for g steps.
    `tracker`: the run this strategy reports to (tracking.py): the configuration as parameters, each
    step as a nested run once its step.json is written, the report at the end. It changes no result.
    """
    steps = parse_strategy(strategy) if isinstance(strategy, str) else tuple(strategy)
    run_dir = Path(run_dir)
    settings = replace(settings, generation=honest_generation(lm, settings.generation))
    claimed = {
        **(config or {}),
        "lm": describe_lm(lm),
        "data": {name: {"size": len(split), "digest": data_digest(split)}
                 for name, split in (("train", train), ("val", val), ("test", test))},
        "program": program.get_state(),
        "settings": to_dict(settings),
        "strategy": pretty(steps),
        **({"reflection_lm": describe_lm(reflection_lm or lm)} if any(KINDS[s].reflects for s in steps) else {}),
    }
    claim(run_dir, claimed)
    tracker.params({k: v for k, v in claimed.items() if k != "program"})  # the program's state: program.json
    records: list[StepRecord] = []
    current = program
    finished = 0  # the leading steps already done in run_dir
    while finished <= len(steps) and (done := load_step(program, run_dir / prefix_name(steps[:finished]))):
        current, record = done
        records.append(record)
        track_step(tracker, finished, asdict(record), run_dir / record.prefix, {})
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
            before = records[-1]
            ctx = StepContext(lm, train, val, metric, settings, folder, seed=settings.seed * 100 + depth,
                              progress=progress, reflection_lm=reflection_lm, feedback=feedback,
                              start=ValScore(before.val, before.val_errors, before.val_answers, before.val_failures))
            current, details = take_step(steps[depth - 1], current, ctx)
        val_ = _score(current, lm, val, metric, settings, f"{prefix_name(prefix)} val", progress)
        test_ = _score(current, lm, test, metric, settings, f"{prefix_name(prefix)} test", progress, report_metrics)
        kind = steps[depth - 1] if depth else ""
        if val_.answers:
            details["val_answers"] = describe_answers(val_.answers)
        if kind and KINDS[kind].weights and (note := collapse_note(val_.answers)):
            if records and collapse_note(records[-1].val_answers) == note:
                note += " (as was the program it started from)"
            details["notes"] = details.get("notes", []) + [note]
            log.warning("step %s: %s (answers on val: %s)", pretty(prefix), note, details["val_answers"])
        record = StepRecord(prefix_name(prefix), kind, val_.score, test_.score,
                            time.perf_counter() - started, val_.errors, test_.errors, details, test_.metrics,
                            val_.failures, test_.failures, val_.answers)
        current.save(folder / "program.json")
        write_json(folder / "step.json", asdict(record))  # written last: its presence means the step is finished
        records.append(record)
        track_step(tracker, depth, asdict(record), folder, {"val": val_.result, "test": test_.result})
        log.info("step %s finished: val %.1f%%, test %s", record.label, record.val,
                 "-" if record.test is None else f"{record.test:.1f}%")

    # Selection never looks at test; ties go to fewer failed runs on val, then to the earlier step.
    best = max(records, key=lambda r: (r.val, -r.val_errors))
    best_program = load_step(program, run_dir / best.prefix)[0]
    result = BetterTogetherResult(best_program, best.prefix, records)
    summary = {"strategy": pretty(steps), "best": best.prefix, "steps": [asdict(r) for r in records]}
    write_json(results_path(run_dir, steps), summary)  # one file per strategy: strategies share the folder
    result.report = write_run_report(run_dir, steps)
    tracker.metrics({"best_val": best.val, "best_test": best.test})
    tracker.artifacts([result.report, results_path(run_dir, steps), run_dir / "config.json",
                       *sorted(run_dir.glob("*.png"))])
    return result
