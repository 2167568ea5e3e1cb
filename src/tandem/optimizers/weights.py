"""Θ: weight optimization by BootstrapFinetune.

Run the current program over the training set, keep the runs that pass the metric, turn every
module call of those runs into one chat example (the rendered prompt and the reply), and train
ONE LoRA adapter on all modules' examples together. The new program runs base model + adapter.

Each weight step trains a fresh adapter on the base model from traces of the current program
(which may itself run with an earlier adapter), as BetterTogether does. By default training
prompts are rendered without demos and the returned program has none, the paper's setting;
`with_demos=True` keeps the demos in both.

`extended=True` (a `w+` step) gives a weak model more to learn from, each source counted:
- sampled: `samples` more runs per training example at `sample_temperature`; every passing run
  whose replies differ from those already kept is kept (rejection sampling);
- rationalized: an example with no passing run is run once more with its gold answer shown as a
  hint (STaR, Zelikman et al. 2022); kept if it passes, and trained on without the hint;
- balance: where the answer is a choice field, no class keeps more than ceil(runs / choices) runs,
  so the class a weak model happens to favour cannot take the adapter over.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ..evaluate import Metric, evaluate
from ..lm.base import LM
from ..lm.training import TrainReport
from ..program import MODULE_LABELS, Example, Program, TraceEntry
from ..prompts import render_messages, render_reply
from ..settings import ExtendedWeightSettings, GenerationSettings, WeightSettings
from ..signatures import REASONING

log = logging.getLogger(__name__)

NO_TRACES = "no successful traces, weights unchanged"


@dataclass
class WeightResult:
    program: Program
    trained: bool
    successful_runs: int
    conversations: int
    report: TrainReport | None = None
    notes: list[str] = field(default_factory=list)
    with_demos: bool = False
    trace_failures: dict[str, int] = field(default_factory=dict)  # failed training runs by kind
    sources: dict[str, int] = field(default_factory=dict)  # runs trained on, by where they came from
    calls_by_source: dict[str, int] = field(default_factory=dict)  # module calls trained on, by source
    balance_dropped: int = 0  # runs left out so that no class takes over

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trained": self.trained, "successful_runs": self.successful_runs,
                               "conversations": self.conversations, "adapter": self.program.adapter,
                               "with_demos": self.with_demos, "notes": self.notes,
                               "trace_failures": self.trace_failures, "sources": self.sources,
                               "calls_by_source": self.calls_by_source, "balance_dropped": self.balance_dropped}
        if self.report:
            r = self.report
            out["training"] = {"examples": r.examples, "tokens": r.tokens, "steps": r.steps, "seconds": round(r.seconds, 1),
                               "tokens_per_second": round(r.tokens_per_second, 1), "first_loss": round(r.first_loss, 4),
                               "last_loss": round(r.last_loss, 4), "dropped_too_long": r.dropped_too_long}
        return out


def training_conversations(program: Program, traces: Sequence[Sequence[TraceEntry]], with_demos: bool,
                           sources: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One chat example per module call: the messages the module would send, then the reply it gave.

    Messages are rendered anew from the call's inputs, so a hint shown during rationalization never
    reaches the training prompt.
    """
    predictors = dict(program.named_predictors())
    rows = []
    for n, trace in enumerate(traces):
        for entry in trace:
            if entry.outputs is None or entry.module not in predictors:
                continue
            predictor = predictors[entry.module]
            messages = render_messages(predictor.signature, predictor.demos if with_demos else [], entry.inputs)
            messages.append({"role": "assistant", "content": render_reply(predictor.signature, entry.outputs)})
            row = {"module": entry.module, "messages": messages}
            if sources is not None:
                row["source"] = sources[n]
            rows.append(row)
    return rows


@dataclass
class _Kept:
    example: int  # index into the training set
    source: str  # "runs", "sampled" or "rationalized"
    trace: list[TraceEntry]


def _replies(trace: Sequence[TraceEntry]) -> tuple:
    return tuple((e.module, e.reply) for e in trace)


def hint_of(example: Example) -> dict[str, Any]:
    """The labels a rationalizing module may be shown: the final answers, not a gold reasoning."""
    return {k: v for k, v in example.labels().items() if k not in (REASONING.name, MODULE_LABELS)}


def choice_field(program: Program, example: Example) -> tuple[str, int] | None:
    """(name, number of choices) of the first choice-typed output field the example has a label for."""
    for predictor in program.predictors():
        for f in predictor.signature.outputs:
            if f.type == "choice" and f.name in example:
                return f.name, len(f.choices)
    return None


def balance(kept: list[_Kept], train: Sequence[Example], program: Program) -> tuple[list[_Kept], str | None]:
    """No class keeps more than ceil(len(kept) / choices) runs; earlier sources are kept first."""
    found = choice_field(program, train[0]) if train else None
    if found is None:
        return kept, "balance: no choice-typed answer field, nothing to balance"
    name, choices = found
    cap = math.ceil(len(kept) / choices)
    counts: Counter = Counter()
    out = []
    for k in kept:
        label = str(train[k.example][name])
        if counts[label] < cap:
            counts[label] += 1
            out.append(k)
    return out, None


def gather_runs(program: Program, lm: LM, train: Sequence[Example], metric: Metric, settings: WeightSettings,
                generation: GenerationSettings, *, extended: bool, seed: int,
                progress: bool) -> tuple[list[_Kept], dict[str, int], list[str], int]:
    """The passing runs to train on, each with its source; failed runs by kind; notes; runs balanced away."""
    threshold = settings.metric_threshold
    runs = evaluate(program, lm, train, metric, generation, progress=progress, desc="traces")
    failures = runs.failures()
    kept = [_Kept(i, "runs", r.trace) for i, r in enumerate(runs.results) if r.error is None and r.score >= threshold]
    if not extended:
        return kept, failures, [], 0
    more: ExtendedWeightSettings = settings.extended
    notes: list[str] = []
    seen = {(k.example, _replies(k.trace)) for k in kept}  # distinct per example: the same reply may fit two
    if more.samples:
        order = [i for _ in range(more.samples) for i in range(len(train))]
        seeds = [seed * 1000 + 1 + n // len(train) for n in range(len(order))]
        sampled = evaluate(program, lm, [train[i] for i in order], metric,
                           replace(generation, temperature=more.sample_temperature),
                           progress=progress, desc=f"samples x{more.samples}", seed=seeds)
        for i, r in zip(order, sampled.results):
            if r.error is None and r.score >= threshold and (i, _replies(r.trace)) not in seen:
                seen.add((i, _replies(r.trace)))
                kept.append(_Kept(i, "sampled", r.trace))
    if more.rationalize:
        passed = {k.example for k in kept}
        missing = [i for i in range(len(train)) if i not in passed]
        if missing:
            hinted = evaluate(program, lm, [train[i] for i in missing], metric, generation, progress=progress,
                              desc="rationalize", hints=hint_of)
            kept += [_Kept(i, "rationalized", r.trace) for i, r in zip(missing, hinted.results)
                     if r.error is None and r.score >= threshold]
    dropped = 0
    if more.balance:
        before = len(kept)
        kept, note = balance(kept, train, program)
        dropped = before - len(kept)
        notes += [note] if note else []
    return kept, failures, notes, dropped


def _launch(launcher: str, lm: LM, out_dir: Path, lora) -> TrainReport:
    """Training in processes of their own (lm/train_launch.py) from the engine's model folder;
    an engine that loads adapters by path (all of tandem's) serves the result like any other."""
    from ..errors import UsageError
    from ..lm.train_launch import launch

    path = getattr(lm, "path", None)
    if path is None:
        raise UsageError(f"--launcher trains from the model's own folder, and LM '{lm.name}' names none")
    can_load = getattr(lm, "can_load_adapters", None)
    if can_load is not None and not can_load():
        raise UsageError("the server cannot load adapters at runtime, so nothing would serve this step's adapter")
    dtype = str(getattr(lm, "dtype", "float32")).removeprefix("torch.")
    return launch(launcher, path, dtype, out_dir / "train.jsonl", out_dir / "adapter", lora)


def bootstrap_finetune(
    program: Program,
    lm: LM,
    train: Sequence[Example],
    val: Sequence[Example],
    metric: Metric,
    settings: WeightSettings = WeightSettings(),
    *,
    out_dir: str | Path,
    seed: int = 0,
    generation: GenerationSettings = GenerationSettings(),
    progress: bool = True,
    extended: bool = False,
) -> WeightResult:
    """Return a new program that points at a freshly trained adapter in `out_dir/adapter`.

    `extended`: also learn from sampled and rationalized runs, class-balanced (`settings.extended`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept, failures, notes, dropped = gather_runs(program, lm, train, metric, settings, generation,
                                                 extended=extended, seed=seed, progress=progress)
    sources = dict(Counter(k.source for k in kept))
    if not kept:
        log.warning("weight step: %s", NO_TRACES)
        return WeightResult(program.clone(), False, 0, 0, notes=[NO_TRACES] + notes, with_demos=settings.with_demos,
                            trace_failures=failures, balance_dropped=dropped)

    rows = training_conversations(program, [k.trace for k in kept], settings.with_demos, [k.source for k in kept])
    with open(out_dir / "train.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    finetune = getattr(lm, "finetune", None)
    if finetune is None:
        raise TypeError(f"LM '{lm.name}' cannot fine-tune: weight steps need the local engine")
    lora = replace(settings.lora, seed=seed)
    if settings.launcher:
        report = _launch(settings.launcher, lm, out_dir, lora)
    else:
        report = finetune([row["messages"] for row in rows], out_dir / "adapter", lora, progress=progress)

    new = program.clone()
    new.adapter = str((out_dir / "adapter").resolve())
    if not settings.with_demos:
        for predictor in new.predictors():
            predictor.demos = []
    demos = "with" if settings.with_demos else "without"
    passing = sources.get("runs", 0)
    if extended:
        where = ", ".join(f"{n} {source}" for source, n in sources.items())
        notes.insert(0, f"trained on {len(rows)} module calls from {len(kept)} runs ({where}), prompts {demos} demos"
                        + (f"; balance left out {dropped}" if dropped else ""))
    else:
        notes.insert(0, f"trained on {len(rows)} module calls from {passing} passing runs, prompts {demos} demos")
    if report.dropped_too_long:
        notes.append(f"{report.dropped_too_long} calls longer than max_length={lora.max_length} left out")
    return WeightResult(new, True, passing, len(rows), report, notes, settings.with_demos, failures, sources,
                        dict(Counter(row["source"] for row in rows)), dropped)
