"""Π: prompt optimization by bootstrapping few-shot demos, with random search over candidates.

BootstrapFewShot runs a teacher program over training examples and keeps the runs whose final
answer passes the metric; every module call of a kept run becomes a demo for that module.
Random search (BootstrapFewShotRS) builds several candidate demo sets, named, not numbered:

- `zero-shot`: no demos;
- `labeled-only`: demos sampled from labeled examples (where the task's fields allow);
- `bootstrap-unshuffled`: bootstrapped demos in training order;
- `bootstrap-seed-N`: training order shuffled with seed N and a random number of demos;
- `start`: the program as it came, where it has demos of its own (after an earlier prompt step, or a
  weight step that kept its start), first in the list, so that a prompt step, like a weight step,
  never returns a program worse on val than its start;

scores each on the validation set and keeps the best. Ties go to the candidate with fewer failed
runs (a weak model often scores 0 with and without demos, but only demos make its replies
parse), then to the earlier one.
The teacher runs over the training set once, concurrently and batched; every candidate draws its
demos from those runs, so no example is run twice by the same program.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..answers import ValScore
from ..evaluate import Metric, evaluate
from ..lm.base import LM
from ..program import MODULE_LABELS, Example, Program
from ..settings import GenerationSettings, PromptSettings
from ..signatures import REASONING

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    name: str
    state: dict[str, Any]
    val_score: float | None = None
    val_errors: int = 0
    val_failures: dict[str, int] = field(default_factory=dict)

    @property
    def demos(self) -> dict[str, int]:
        return {name: len(p["demos"]) for name, p in self.state["predictors"].items()}


@dataclass
class PromptResult:
    program: Program
    best: str
    candidates: list[Candidate]
    teacher_runs: int
    successful_runs: int
    notes: list[str] = field(default_factory=list)
    teacher_failures: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "teacher_runs": self.teacher_runs,
            "successful_runs": self.successful_runs,
            "teacher_failures": self.teacher_failures,
            "notes": self.notes,
            "candidates": [
                {"name": c.name, "val_score": c.val_score, "val_errors": c.val_errors, "val_failures": c.val_failures,
                 "demos": c.demos}
                for c in self.candidates
            ],
        }


def labeled_fields(program: Program) -> dict[str, list[str]]:
    """Per predictor, the fields a labeled example must have to serve as its demo."""
    return {
        name: [f for f in p.signature.input_names + p.signature.output_names if f != REASONING.name]
        for name, p in program.named_predictors()
    }


def labeled_demos(program: Program, examples: Sequence[Example], k: int, rng: random.Random) -> dict[str, list[dict]]:
    """Up to k demos per predictor from examples that label all its fields, or carry module labels for it."""
    demos: dict[str, list[dict]] = {}
    for name, fields in labeled_fields(program).items():
        rows = [e.get(MODULE_LABELS, {}).get(name, e) for e in examples]
        usable = [row for row in rows if all(f in row for f in fields)]
        extra = [f for f in (REASONING.name,) if all(f in row for row in usable)]
        demos[name] = [{f: row[f] for f in fields + extra} for row in rng.sample(usable, min(k, len(usable)))]
    return demos


def _with_demos(program: Program, demos: dict[str, list[dict]]) -> Program:
    new = program.clone()
    for name, predictor in new.named_predictors():
        predictor.demos = list(demos.get(name, []))
    return new


def bootstrap_fewshot_rs(
    program: Program,
    lm: LM,
    train: Sequence[Example],
    val: Sequence[Example],
    metric: Metric,
    settings: PromptSettings = PromptSettings(),
    *,
    seed: int = 0,
    generation: GenerationSettings = GenerationSettings(),
    progress: bool = True,
    start: ValScore | None = None,
) -> PromptResult:
    """Return a new program with the best demo set found; `program` is not changed. `start`: `program`'s
    val score where the caller has it (the orchestrator does), so the `start` candidate is not run again."""
    if not train or not val:
        raise ValueError("prompt optimization needs training and validation examples")
    rng = random.Random(seed)
    student = _with_demos(program, {})  # candidates start from no demos, same instructions and adapter
    labeled = labeled_demos(student, train, settings.max_labeled_demos, random.Random(seed))
    has_labels = any(labeled.values())

    # The teacher: the incoming program if it already has demos, else the student with labeled demos.
    teacher = program if any(p.demos for p in program.predictors()) else _with_demos(program, labeled)
    runs = evaluate(teacher, lm, train, metric, generation, progress=progress, desc="bootstrap")
    passing = [i for i, r in enumerate(runs.results) if r.error is None and r.score >= settings.metric_threshold]
    traces = {i: runs.results[i].trace for i in passing}
    notes = []
    if not passing:
        notes.append("no training run passed the metric: bootstrapped candidates have no demos")

    def bootstrapped(order: list[int], k: int) -> dict[str, list[dict]]:
        demos: dict[str, list[dict]] = {name: [] for name, _ in student.named_predictors()}
        used: set[int] = set()
        for i in order:
            if i not in traces:
                continue
            if all(len(d) >= k for d in demos.values()):
                break
            used.add(i)
            for entry in traces[i]:
                if entry.module in demos and len(demos[entry.module]) < k and entry.outputs is not None:
                    demos[entry.module].append({**entry.inputs, **entry.outputs})
        # Fill up to the labeled limit from examples the bootstrap did not use.
        rest = [train[i] for i in order if i not in used]
        extra = labeled_demos(student, rest, settings.max_labeled_demos, rng)
        for name in demos:
            room = max(0, settings.max_labeled_demos - len(demos[name]))
            demos[name] += extra[name][:room]
        return demos

    candidates = [Candidate("zero-shot", student.get_state())]
    scored: dict[str, tuple[float, int, dict[str, int]]] = {}
    if any(p.demos for p in program.predictors()):
        candidates.insert(0, Candidate("start", program.get_state()))
        if start is not None:
            scored[json.dumps(program.get_state(), sort_keys=True)] = (start.score, start.errors, start.failures)
    if has_labels:
        candidates.append(Candidate("labeled-only", _with_demos(student, labeled).get_state()))
    order = list(range(len(train)))
    if settings.max_bootstrapped_demos > 0:
        candidates.append(Candidate("bootstrap-unshuffled", _with_demos(student, bootstrapped(order, settings.max_bootstrapped_demos)).get_state()))
        for n in range(settings.num_candidates):
            shuffled = order[:]
            random.Random(seed * 1000 + n).shuffle(shuffled)
            k = rng.randint(1, settings.max_bootstrapped_demos)
            candidates.append(Candidate(f"bootstrap-seed-{n}", _with_demos(student, bootstrapped(shuffled, k)).get_state()))

    for c in candidates:
        key = json.dumps(c.state, sort_keys=True)
        if key not in scored:  # identical demo sets are scored once
            result = evaluate(student.with_state(c.state), lm, val, metric, generation, progress=progress,
                              desc=f"val {c.name}")
            scored[key] = (result.score, result.n_errors, result.failures())
        c.val_score, c.val_errors, c.val_failures = scored[key]
        log.info("candidate %s: val %.1f%% (%d failed)", c.name, c.val_score, c.val_errors)
    best = max(candidates, key=lambda c: (c.val_score, -c.val_errors))  # max keeps the first of equals
    return PromptResult(student.with_state(best.state), best.name, candidates, len(train), len(passing), notes,
                        runs.failures())
