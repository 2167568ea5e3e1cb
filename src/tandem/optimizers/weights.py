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
- rationalized: an example with no passing run is run once more with its final answers (`hint_of`)
  shown as a hint (STaR, Zelikman et al. 2022); kept if it passes and no reply talks about the
  hint, and trained on without the hint;
- balance: where the answer is a choice field, no class (a canonical choice) keeps more than twice
  the runs of the smallest class, so the class a weak model happens to favour cannot take the
  adapter over; earlier sources are kept first (runs, then sampled, then rationalized).

Do no harm, by validation (`keep_checkpoint="best"`, the default): training saves checkpoints on the
way (every epoch, or every `checkpoint_every` optimizer steps), each is scored on val, and the step
returns the best of them and of the program it started from; a tie keeps the start, then the earlier
checkpoint. So a weight step that only hurt (a LoRA collapsed to one class, say) returns its input
unchanged, demos included. Test is never read. `keep_checkpoint="last"` returns the last checkpoint,
as the paper did.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ..answers import ValScore, choice_field, collapse_note
from ..errors import TandemError, UsageError
from ..evaluate import SOFT_METRIC_ERRORS, Metric, MetricError, evaluate
from ..lm.base import LM, can_train
from ..program import Example, Prediction, Program, TraceEntry
from ..prompts import render_messages, render_reply
from ..settings import ExtendedWeightSettings, GenerationSettings, WeightSettings
from ..signatures import InvalidValue
from ..training.launch import launch
from ..training.lora import check_adapters, finetune
from ..training.reports import TrainingCall, TrainReport

log = logging.getLogger(__name__)

NO_TRACES = "no successful traces, weights unchanged"


@dataclass
class Checkpoint:
    """A weight step's candidate program on val: its start (step 0) or the adapter after an optimizer step."""

    step: int
    epoch: float
    adapter: str | None
    val: float
    val_errors: int
    answers: dict[str, int]
    train: float | None = None  # the score on the first `train_curve` training examples: did it learn them?

    @property
    def score(self) -> ValScore:
        return ValScore(self.val, self.val_errors, self.answers)

    def describe(self) -> str:
        where = "the start" if self.step == 0 else f"step {self.step} (epoch {self.epoch:g})"
        collapsed = collapse_note(self.answers)
        return f"{where}: val {self.val:.1f}" + (f", {collapsed.removesuffix(' val')}" if collapsed else "")


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
    hint_dropped: int = 0  # rationalized runs left out because a reply talks about the hint
    checkpoints: list[Checkpoint] = field(default_factory=list)  # the start (step 0), then each one scored on val
    kept_step: int | None = None  # the checkpoint returned (0: the start); None where none was chosen by val

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trained": self.trained, "successful_runs": self.successful_runs,
                               "conversations": self.conversations, "adapter": self.program.adapter,
                               "with_demos": self.with_demos, "notes": self.notes,
                               "trace_failures": self.trace_failures, "sources": self.sources,
                               "calls_by_source": self.calls_by_source, "balance_dropped": self.balance_dropped,
                               "hint_dropped": self.hint_dropped}
        if self.checkpoints:
            out["checkpoints"] = [asdict(c) for c in self.checkpoints]
            out["kept_step"] = self.kept_step
        if self.report:
            r = self.report
            out["training"] = {"examples": r.examples, "tokens": r.tokens, "steps": r.steps, "epochs": r.epochs,
                               "seconds": round(r.seconds, 1),
                               "tokens_per_second": round(r.tokens_per_second, 1), "first_loss": round(r.first_loss, 4),
                               "last_loss": round(r.last_loss, 4), "dropped_too_long": r.dropped_too_long,
                               "step_losses": [round(x, 4) for x in r.step_losses]}
        return out


def training_conversations(program: Program, traces: Sequence[Sequence[TraceEntry]], with_demos: bool,
                           sources: Sequence[str] | None = None, reasoning: str = "all") -> list[dict[str, Any]]:
    """One chat example per module call: the messages the module would send, then the reply it gave.

    Messages are rendered anew from the call's inputs, so a hint shown during rationalization never
    reaches the training prompt. Each row names its answer's class (`group`: the call's choice-typed
    outputs, where it has any) and, with `reasoning="answer"`, where in the reply the loss starts
    (`loss_from`: after a chain of thought's reasoning, which stays in the call untaught).
    """
    predictors = dict(program.named_predictors())
    rows = []
    for n, trace in enumerate(traces):
        for entry in trace:
            if entry.outputs is None or entry.module not in predictors:
                continue
            predictor = predictors[entry.module]
            messages = render_messages(predictor.signature, predictor.demos if with_demos else [], entry.inputs)
            reply = render_reply(predictor.signature, entry.outputs)
            messages.append({"role": "assistant", "content": reply})
            row: dict[str, Any] = {"module": entry.module, "messages": messages}
            choices = [str(entry.outputs[f.name]) for f in predictor.signature.outputs if f.type == "choice"]
            if choices:
                row["group"] = "|".join(choices)
            if reasoning == "answer" and predictor.rationale and entry.outputs.get(predictor.rationale):
                row["loss_from"] = answer_start(predictor.signature, entry.outputs, predictor.rationale, reply)
            if sources is not None:
                row["source"] = sources[n]
            rows.append(row)
    return rows


def answer_start(signature, outputs: dict[str, Any], rationale: str, reply: str) -> int:
    """Where the answer begins in `reply`: the reply rendered without the rationale is its end."""
    answer = render_reply(signature, {k: v for k, v in outputs.items() if k != rationale})
    if not answer or not reply.endswith(answer):
        raise ValueError(f"the reply does not end with its answer fields: {reply[-200:]!r}")
    return len(reply) - len(answer)


def contradicts(trace: Sequence[TraceEntry], program: Program) -> bool:
    """Whether a call of the run reasons toward another class than it answers: its reasoning names some
    other choice of a choice-typed answer and never the one it gave (whole words, any case)."""
    predictors = dict(program.named_predictors())
    for entry in trace:
        predictor = predictors.get(entry.module)
        if predictor is None or entry.outputs is None or not predictor.rationale:
            continue
        text = str(entry.outputs.get(predictor.rationale, "")).lower()
        for f in predictor.signature.outputs:
            if f.type != "choice":
                continue
            given = str(entry.outputs.get(f.name, "")).lower()
            named = {c.lower() for c in f.choices if re.search(rf"\b{re.escape(c.lower())}\b", text)}
            if named and given not in named:
                return True
    return False


@dataclass
class _Kept:
    example: int  # index into the training set
    source: str  # "runs", "sampled" or "rationalized"
    trace: list[TraceEntry]


def _replies(trace: Sequence[TraceEntry]) -> tuple:
    return tuple((e.module, e.reply) for e in trace)


class _Reading(Prediction):
    """A prediction that notes the fields read from it; iterating it reads them all."""

    def __init__(self, data: dict[str, Any]):
        super().__init__(data)
        self._read: set[str] = set()

    def __getitem__(self, key: str) -> Any:  # attribute access comes here too
        self._read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._read.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)

    def __iter__(self):
        self._read.update(dict.keys(self))
        return super().__iter__()

    def keys(self):
        self._read.update(dict.keys(self))
        return super().keys()

    def values(self):
        self._read.update(dict.keys(self))
        return super().values()

    def items(self):
        self._read.update(dict.keys(self))
        return super().items()


def hint_of(example: Example, program: Program, metric: Metric) -> dict[str, Any]:
    """The final answers a rationalizing module may be shown: the gold values the metric judges.

    The rule: a label is a final answer when some module writes it (an output field of its
    signature) and the metric reads it from the prediction. The metric is called once on a
    prediction made of the example's gold outputs and every field it reads is noted (a metric
    that iterates the prediction reads all of it). A gold rationale is written by a module but
    never judged by a metric that scores answers, so it stays out whatever its name: GSM8K shows
    `answer`, never its gold `reasoning`; a task with a gold `rationale`, `explanation` or
    `solution` beside its answer shows the answer. Several judged outputs (`question -> answer,
    answer_type`) are all shown. HotPotQA shows its answer (its search queries are labeled only
    in `module_labels`, which no module writes, like `gold_titles`); Iris its species.

    A metric that grades the rationale itself makes it part of the answer: a data task whose
    signature lists `rationale` as an output compares every output, rationale included.
    """
    outputs = {f.name for p in program.predictors() for f in p.signature.outputs}
    gold = _Reading({k: v for k, v in example.labels().items() if k in outputs})
    try:
        metric(example, gold)
    except (KeyError, AttributeError, *SOFT_METRIC_ERRORS):
        pass  # a field the probe lacks, or a value it cannot score: what the metric read before that still counts
    except TandemError:
        raise
    except Exception as exc:  # anything else is the metric's bug: it stops the step, as it would on a run
        raise MetricError(f"the metric raised {type(exc).__name__} on the gold answers of {dict(example)!r:.200}: "
                          f"{exc}") from exc
    return {k: v for k, v in dict.items(gold) if k in gold._read and v not in (None, "")}


# A rationalized run is trained on without the hint, so a reply that cites it ("as the hint says",
# "the given answer is") would teach the model to lean on something its prompt never holds. Plain
# words are enough: the hint is the only place a reply could have taken "hint" from.
_HINT_TALK = re.compile(r"\bhint(s|ed)?\b|\b(given|provided|stated) answer\b", re.IGNORECASE)


def talks_about_hint(trace: Sequence[TraceEntry]) -> bool:
    return any(e.reply and _HINT_TALK.search(e.reply) for e in trace)


def balance(kept: list[_Kept], train: Sequence[Example], program: Program) -> tuple[list[_Kept], str | None]:
    """No class keeps more than twice the runs of the smallest class that has any; earlier runs in
    `kept` (runs, then sampled, then rationalized) are kept first.

    A class is a canonical choice: the gold label through the field's `check`, so "Setosa" and
    "setosa" are one class. Twice, not once: a strict cap at the smallest class would throw away
    most of what a weak model got right for the sake of one rare class.
    """
    found = choice_field(program, train[0]) if train else None
    if found is None:
        return kept, "balance: no choice-typed answer field, nothing to balance"

    def label(k: _Kept) -> str:
        gold = str(train[k.example][found.name])
        try:
            return found.check(gold)
        except InvalidValue:  # not one of the choices: a class of its own
            return gold

    classes = [label(k) for k in kept]
    cap = 2 * min(Counter(classes).values(), default=0)
    taken: Counter = Counter()
    out = []
    for k, c in zip(kept, classes):
        if taken[c] < cap:
            taken[c] += 1
            out.append(k)
    return out, None


@dataclass
class _Gathered:
    kept: list[_Kept]
    failures: dict[str, int]  # failed greedy runs by kind
    notes: list[str] = field(default_factory=list)
    balance_dropped: int = 0
    hint_dropped: int = 0


def gather_runs(program: Program, lm: LM, train: Sequence[Example], metric: Metric, settings: WeightSettings,
                generation: GenerationSettings, *, extended: bool, seed: int, progress: bool) -> _Gathered:
    """The passing runs to train on, each with its source; failed runs by kind; notes; runs left out."""
    threshold = settings.metric_threshold
    runs = evaluate(program, lm, train, metric, generation, progress=progress, desc="traces")
    kept = [_Kept(i, "runs", r.trace) for i, r in enumerate(runs.results) if r.error is None and r.score >= threshold]
    out = _Gathered(kept, runs.failures())
    if not extended:
        return out
    more: ExtendedWeightSettings = settings.extended
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
        hints = {i: hint_of(train[i], program, metric) for i in range(len(train)) if i not in passed}
        missing = [i for i, hint in hints.items() if hint]
        if len(missing) < len(hints):  # with nothing to show, the run would be the failed greedy one again
            out.notes.append(f"rationalize: {len(hints) - len(missing)} examples have no labeled answer that the "
                             "metric reads, so no hint; not rerun")
        if missing:
            shown = {id(train[i]): hints[i] for i in missing}
            hinted = evaluate(program, lm, [train[i] for i in missing], metric, generation, progress=progress,
                              desc="rationalize", hints=lambda example: shown[id(example)])
            for i, r in zip(missing, hinted.results):
                if r.error is None and r.score >= threshold:
                    if talks_about_hint(r.trace):
                        out.hint_dropped += 1
                    else:
                        kept.append(_Kept(i, "rationalized", r.trace))
            if out.hint_dropped:
                out.notes.append(f"rationalize: left out {out.hint_dropped} passing runs whose reply talks about "
                                 "the hint")
    if more.balance:
        before = len(kept)
        out.kept, note = balance(kept, train, program)
        out.balance_dropped = before - len(out.kept)
        out.notes += [note] if note else []
    return out


def too_little(rows: Sequence[dict[str, Any]], runs: int, contradicting: int, extended: bool, least: int) -> str | None:
    """Why these training calls are too little to learn from, in one line that names the count and what
    gives more; None where they are enough. Too few calls, one class only (an adapter would learn to answer
    it whatever the input), or, where the whole reply is taught, reasoning that argues against the answer in
    every run. `least` <= 1 (`--min-calls 1`) asks for none of these checks."""
    if least <= 1:  # --min-calls 1: train on whatever was gathered
        return None
    more = "--train-size (more examples)" if extended else "a w+ step (sampled and rationalized runs) or --train-size"
    if len(rows) < least:
        return f"too little to learn from: {len(rows)} training calls, fewer than --min-calls {least}; {more} gives more"
    classes = Counter(row["group"] for row in rows if "group" in row)
    if len(classes) == 1 and sum(classes.values()) == len(rows):
        return (f"too little to learn from: all {len(rows)} training calls answer {next(iter(classes))!r}, so an "
                f"adapter would answer it whatever the input; {more} gives the other classes")
    if runs and contradicting == runs:
        return (f"too little to learn from: the reasoning of all {contradicting} runs names another class than "
                "their answer; --reasoning answer teaches the answers alone")
    return None


def _launch(launcher: str, lm: LM, out_dir: Path, lora, checkpoint_dir: Path | None) -> TrainReport:
    """Training in processes of their own (training/launch.py) from the engine's model folder;
    an engine that loads adapters by path (all of tandem's) serves the result like any other."""
    path = getattr(lm, "path", None)
    if path is None:
        raise UsageError(f"--launcher trains from the model's own folder, and LM '{lm.name}' names none")
    check_adapters(lm, out_dir, lora.rank)
    dtype = str(getattr(lm, "dtype", "float32")).removeprefix("torch.")
    return launch(launcher, path, dtype, out_dir / "train.jsonl", out_dir / "adapter", lora, checkpoint_dir)


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
    start: ValScore | None = None,
) -> WeightResult:
    """Return a new program that points at a freshly trained adapter in `out_dir/adapter`, or at the
    checkpoint best on val (`out_dir/checkpoints/step-NNNN`), or `program` itself where no checkpoint
    beat it on val (`settings.keep_checkpoint`).

    `extended`: also learn from sampled and rationalized runs, class-balanced (`settings.extended`).
    `start`: `program`'s score on val where the caller has it (the orchestrator does); else it is scored.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gathered = gather_runs(program, lm, train, metric, settings, generation, extended=extended, seed=seed,
                           progress=progress)
    kept, notes, dropped = gathered.kept, gathered.notes, gathered.balance_dropped
    sources = dict(Counter(k.source for k in kept))
    if not kept:
        log.warning("weight step: %s", NO_TRACES)
        return WeightResult(program.clone(), False, 0, 0, notes=[NO_TRACES] + notes, with_demos=settings.with_demos,
                            trace_failures=gathered.failures, balance_dropped=dropped,
                            hint_dropped=gathered.hint_dropped)

    against = [contradicts(k.trace, program) for k in kept]
    contradicting = sum(against)
    if settings.reasoning == "consistent" and contradicting:
        notes.append(f"reasoning: left out {contradicting} runs whose reasoning names another class than their "
                     "answer")
        kept = [k for k, bad in zip(kept, against) if not bad]
    rows = training_conversations(program, [k.trace for k in kept], settings.with_demos, [k.source for k in kept],
                                  settings.reasoning)
    with open(out_dir / "train.jsonl", "w") as f:  # written either way: what was gathered can be read
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    refusal = too_little(rows, len(kept), contradicting if settings.reasoning == "all" else 0, extended,
                         settings.min_calls)
    if refusal:
        log.warning("weight step: %s", refusal)
        return WeightResult(program.clone(), False, sources.get("runs", 0), len(rows), notes=[refusal] + notes,
                            with_demos=settings.with_demos, trace_failures=gathered.failures, sources=sources,
                            balance_dropped=dropped, hint_dropped=gathered.hint_dropped)
    if not can_train(lm, "finetune"):
        raise TypeError(f"LM '{lm.name}' cannot fine-tune: weight steps need the local engine")
    lora = replace(settings.lora, seed=seed)
    by_val = settings.keep_checkpoint == "best" and bool(val)
    checkpoint_dir = out_dir / "checkpoints" if by_val else None
    if settings.launcher:
        report = _launch(settings.launcher, lm, out_dir, lora, checkpoint_dir)
    else:
        report = finetune(lm, [TrainingCall.of(row) for row in rows], out_dir / "adapter", lora, progress=progress,
                          checkpoint_dir=checkpoint_dir)

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
    notes.append(f"{report.steps} optimizer steps ({report.epochs} epochs)")
    if report.dropped_too_long:
        notes.append(f"{report.dropped_too_long} calls longer than max_length={lora.max_length} left out")
    checkpoints: list[Checkpoint] = []
    kept_step: int | None = None
    if by_val:
        new, checkpoints, kept_step, note = keep_best(program, new, report, lm, val, metric, generation, start,
                                                      progress, train[:settings.train_curve])
        notes.append(note)
    return WeightResult(new, True, passing, len(rows), report, notes, settings.with_demos, gathered.failures, sources,
                        dict(Counter(row["source"] for row in rows)), dropped, gathered.hint_dropped, checkpoints,
                        kept_step)


def keep_best(program: Program, trained: Program, report: TrainReport, lm: LM, val: Sequence[Example], metric: Metric,
              generation: GenerationSettings, start: ValScore | None, progress: bool,
              train: Sequence[Example] = ()) -> tuple[Program, list[Checkpoint], int, str]:
    """Score every checkpoint of `report` on val (as `trained`, with that adapter) beside `program`, the
    step's start, and return the best (a tie keeps the start, then the earlier checkpoint), every score,
    the step kept (0: the start) and a note that says what was kept and why. `train`: training examples
    scored too at every checkpoint, for the learning curve only (never to choose)."""
    if start is None:
        start = ValScore.of(program, evaluate(program, lm, val, metric, generation, progress=progress,
                                              desc="weights: val, the start"))

    def on_train(candidate: Program, where: str) -> float | None:
        return evaluate(candidate, lm, train, metric, generation, progress=progress,
                        desc=f"weights: train, {where}").score if train else None

    scored = [Checkpoint(0, 0.0, program.adapter, start.score, start.errors, start.answers,
                         on_train(program, "the start"))]
    candidates = {0: program}
    for c in report.checkpoints:
        candidate = trained.clone()
        candidate.adapter = str(Path(c["path"]).resolve())
        where = f"step {c['step']}/{report.steps}"
        result = evaluate(candidate, lm, val, metric, generation, progress=progress, desc=f"weights: val, {where}")
        got = ValScore.of(candidate, result)
        scored.append(Checkpoint(c["step"], c["epoch"], candidate.adapter, got.score, got.errors, got.answers,
                                 on_train(candidate, where)))
        candidates[c["step"]] = candidate
    best = scored[0]
    for c in scored[1:]:
        if c.score.beats(best.score):
            best = c
    others = "; ".join(c.describe() for c in scored if c is not best)
    if best.step == 0:
        note = f"kept the start: no checkpoint beat its val {start.score:.1f} ({others})"
    else:
        note = f"kept {best.describe()}, the best on val ({others})"
    log.info("weight step: %s", note)
    return candidates[best.step], scored, best.step, note
