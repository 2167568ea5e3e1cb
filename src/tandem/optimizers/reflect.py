"""G: instruction evolution with GEPA (Agrawal et al. 2025, "Reflective Prompt Evolution Can Outperform
Reinforcement Learning"), on the authors' `gepa` package: tandem writes the adapter, GEPA the search.

A candidate is every module's instructions, `{predictor name: text}`; the seed is the current
program's. Each GEPA iteration picks a parent from its Pareto front, runs it on a minibatch of
training examples with traces, has the reflection LM rewrite one module's instructions (round
robin over the modules) from those traces and each run's feedback, and runs the child on the same
minibatch; only a child that does strictly better there is scored on val and joins the pool.
Runs go through tandem's `evaluate` with the program's demos and adapter as they are: only the
instructions change.

How the splits are used, and why:
- train is GEPA's trainset: the minibatches the reflection LM reads, and where a proposal must
  first beat its parent. The instructions are written from training runs only, so the examples
  that judge them (val) never appear in the reflection prompt.
- val is GEPA's valset: every candidate that passes its minibatch is scored on all of val, GEPA's
  Pareto front (the best candidates per val example) picks the parents, and the step keeps the
  candidate with the best val score (ties: fewer failed runs, then the earlier candidate, so the
  starting instructions win a tie), the rule Π's random search follows. Val is what chooses
  between steps anyway; test is never seen.

Budget: `max_metric_calls` counts every scored program run, the starting instructions' val runs
included. GEPA checks its budget only between iterations, so an iteration could overrun it: the
adapter refuses any evaluation that would pass it (`BudgetExhausted` ends the search there), and
GEPA is stopped before an iteration whose two minibatches no longer fit.

Resume: every finished run and every reflection is appended to `journal.jsonl` in the step folder
(JSON lines keyed by content: the program state, the example, the prompt). A rerun replays GEPA
from its seed: its choices are seeded and depend only on the scores and the reflections, which
the journal gives back, so finished runs are read back rather than run again and the search goes
on where it stopped. GEPA's own `run_dir` is not used: it saves its state with pickle (and swaps
sys.stdout for a tee while it runs), while a run folder holds JSON only.

GEPA internals relied on (gepa 0.1.x): `gepa.optimize` with an adapter (`evaluate`,
`make_reflective_dataset`), `reflection_lm` as a `str -> str` callable, `stop_callbacks`, and the
callbacks `on_candidate_selected`, `on_evaluation_end`, `on_proposal_end`, `on_candidate_accepted`,
`on_candidate_rejected` and `on_valset_evaluated`, which give the lineage.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..errors import UsageError
from ..evaluate import ExampleResult, Feedback, Metric, evaluate
from ..lm.base import LM, Request
from ..lm.cache import adapter_digest
from ..program import MODULE_LABELS, Example, Prediction, Program, TraceEntry, trace_as_dict
from ..rundir import describe_lm
from ..settings import GenerationSettings, ReflectionSettings
from .weights import hint_of

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"


class BudgetExhausted(Exception):
    """An evaluation would pass `max_metric_calls`: the search ends, nothing past the budget runs."""


# -- the parts: budget, journal, feedback -------------------------------------------------------


@dataclass
class Budget:
    """Metric calls: spent before they run, refused past the total."""

    total: int
    spent: int = 0

    @property
    def left(self) -> int:
        return self.total - self.spent

    def spend(self, n: int) -> None:
        if n > self.left:
            raise BudgetExhausted(f"{n} metric calls asked, {self.left} of {self.total} left")
        self.spent += n


class Journal:
    """Append-only JSON lines: every finished run and reflection of a g step, by a content key.
    A line cut short by a kill is skipped when read back."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.entries[(row["kind"], row["key"])] = row["value"]
        self.earlier = set(self.entries)  # what an earlier, stopped attempt at the step left

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        return self.entries.get((kind, key))

    def put(self, kind: str, key: str, value: dict[str, Any]) -> None:
        self.entries[(kind, key)] = value
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "key": key, "value": value}, ensure_ascii=False, default=str) + "\n")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _stored(result: ExampleResult) -> dict[str, Any]:
    return {"score": result.score, "prediction": None if result.prediction is None else dict(result.prediction),
            "trace": [trace_as_dict(t) for t in result.trace], "error": result.error, "failure": result.failure}


def _restored(example: Example, value: dict[str, Any]) -> ExampleResult:
    prediction = None if value["prediction"] is None else Prediction(value["prediction"])
    return ExampleResult(example, prediction, value["score"], [TraceEntry(**t) for t in value["trace"]],
                         value["error"], value["failure"])


def metric_identity(metric: Metric) -> str:
    """The metric's name and a digest of its code: what a journaled score depends on besides the run."""
    target = metric if inspect.isfunction(metric) or inspect.ismethod(metric) else type(metric)
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
    try:
        code = inspect.getsource(target)
    except (OSError, TypeError):  # defined where no source is kept (a REPL): its bytecode instead
        raw = getattr(target, "__code__", None)
        code = repr((raw.co_code, raw.co_consts)) if raw is not None else name
    return f"{name}:{hashlib.sha256(code.encode()).hexdigest()[:16]}"


def default_feedback(example: Example, prediction: Prediction | None, program: Program, metric: Metric) -> str:
    """The gold answers the metric reads (`weights.hint_of`) beside the ones given; all labels where
    the metric reads none of them."""
    gold = hint_of(example, program, metric) or {k: v for k, v in example.labels().items() if k != MODULE_LABELS}
    given = {k: prediction.get(k) for k in gold} if prediction is not None else {}
    text = "; ".join(f"{k}: {v!r}" for k, v in gold.items())
    shown = "; ".join(f"{k}: {v!r}" for k, v in given.items() if v is not None)
    return f"The correct answer is {text}; " + (f"the answer given was {shown}." if shown else "no answer was given.")


def feedback_text(result: ExampleResult, program: Program, metric: Metric, task_feedback: Feedback | None) -> str:
    """What the reflection LM reads about one run: the metric's score, why the run failed where it
    did (its failure kind and message), then the task's own feedback or the default (the gold answer,
    found by calling `metric` once on it: a g step passes a metric that counts against its budget)."""
    parts = [f"Score: {result.score:g} (1 is best)."]
    if result.failure:
        parts.append(f"The run failed ({result.failure}): {str(result.error)[:300]}")
    if task_feedback is not None:
        parts.append(task_feedback(result.example, result.prediction, result.trace))
    else:
        parts.append(default_feedback(result.example, result.prediction, program, metric))
    return " ".join(parts)


def with_instructions(program: Program, candidate: dict[str, str]) -> Program:
    """A copy of `program` whose named modules have `candidate`'s instructions (demos, adapter kept)."""
    new = program.clone()
    for name, predictor in new.named_predictors():
        if name in candidate:
            predictor.signature = predictor.signature.with_instructions(candidate[name])
    return new


def instructions_of(program: Program) -> dict[str, str]:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


# -- what GEPA calls ----------------------------------------------------------------------------


class _Errors:
    """The first error GEPA would swallow (it logs failed reflections and goes on): the search is
    stopped at once and the error raised when `gepa.optimize` returns, as any other step's would be."""

    def __init__(self) -> None:
        self.first: BaseException | None = None

    def record(self, exc: BaseException) -> None:
        self.first = self.first or exc


class InstructionAdapter:
    """GEPA's adapter over a tandem program: evaluates a candidate's instructions with `evaluate`,
    reads back journaled runs, and builds each module's reflective dataset from the traces."""

    propose_new_texts = None  # GEPA's own proposer, with the reflection LM

    def __init__(self, program: Program, lm: LM, metric: Metric, generation: GenerationSettings,
                 feedback: Feedback | None, budget: Budget, journal: Journal, errors: _Errors, bar: tqdm):
        self.program, self.lm, self.metric, self.generation = program, lm, metric, generation
        self.feedback, self.budget, self.journal, self.errors, self.bar = feedback, budget, journal, errors, bar
        self.read_back = 0  # runs an earlier attempt at the step left in the journal, read back instead of rerun
        # What a run's score depends on besides the instructions and the example: a folder reused with
        # another LM, another metric or a retrained adapter at the same path reads back none of its runs.
        self.scored_by = (describe_lm(lm), metric_identity(metric), adapter_digest(program.adapter))

    def run_key(self, program: Program, example: Example) -> str:
        return _digest(program.get_state(), dict(example), list(example.input_keys), self.generation.run_kwargs(),
                       *self.scored_by)

    def feedback_metric(self, example: Example, prediction: Prediction) -> Any:
        """The metric, for the default feedback's probe: each call counts against the budget like a run's."""
        self.budget.spend(1)
        return self.metric(example, prediction)

    def results(self, candidate: dict[str, str], batch: Sequence[Example]) -> list[ExampleResult]:
        """Each example run with `candidate`'s instructions: from the journal where it was done, else now."""
        self.budget.spend(len(batch))
        program = with_instructions(self.program, candidate)
        keys = [self.run_key(program, example) for example in batch]
        found = [self.journal.get("run", key) for key in keys]
        results: list[ExampleResult | None] = [None if v is None else _restored(e, v) for e, v in zip(batch, found)]
        todo = [i for i, r in enumerate(results) if r is None]  # a run done earlier in this search is read back too
        self.read_back += sum(("run", key) in self.journal.earlier for key in keys)
        self.bar.update(len(batch) - len(todo))

        def keep(j: int, result: ExampleResult) -> None:
            results[todo[j]] = result
            self.journal.put("run", keys[todo[j]], _stored(result))
            self.bar.update(1)

        if todo:
            evaluate(program, self.lm, [batch[i] for i in todo], self.metric, self.generation, progress=False,
                     on_result=keep)
        return results  # type: ignore[return-value]

    def results_of(self, candidate: dict[str, str], examples: Sequence[Example]) -> list[ExampleResult | None]:
        """The journaled runs of `candidate` on `examples` (None where there is none), spending nothing."""
        program = with_instructions(self.program, candidate)
        found = [self.journal.get("run", self.run_key(program, example)) for example in examples]
        return [None if v is None else _restored(e, v) for e, v in zip(examples, found)]

    def evaluate(self, batch, candidate, capture_traces=False):
        from gepa import EvaluationBatch

        results = self.results(candidate, batch)
        return EvaluationBatch(outputs=[None if r.prediction is None else dict(r.prediction) for r in results],
                               scores=[r.score for r in results], trajectories=results if capture_traces else None)

    def make_reflective_dataset(self, candidate, eval_batch, components_to_update):
        """Per module: each of its calls in the minibatch's runs, with what it read, what it wrote (or
        its failed reply) and the run's feedback."""
        try:
            program = with_instructions(self.program, candidate)
            dataset: dict[str, list[dict[str, Any]]] = {name: [] for name in components_to_update}
            for result in eval_batch.trajectories:
                text = feedback_text(result, program, self.feedback_metric, self.feedback)
                for entry in result.trace:
                    if entry.module in dataset:
                        dataset[entry.module].append(_record(entry, text))
            return dataset
        except BudgetExhausted:  # no bug: the stop callback ends the search before the next iteration
            raise
        except Exception as exc:  # GEPA would log it and go on; a bug here (or the metric's) must stop the step
            self.errors.record(exc)
            raise


def _record(entry: TraceEntry, feedback: str) -> dict[str, Any]:
    wrote: Any = entry.outputs if entry.outputs is not None else (entry.reply or "(no reply)")
    if entry.error:
        feedback += f" This module's reply could not be used: {entry.error[:300]}"
    return {"Inputs": entry.inputs, "Generated Outputs": wrote, "Feedback": feedback}


class ReflectionCall:
    """GEPA's `reflection_lm` (`prompt -> text`) on a tandem LM of any engine, journaled. Each call has
    its own sampling seed (the step's seed and the call's number), so asking twice is two samples,
    and a replay asks the same calls in the same order."""

    def __init__(self, lm: LM, settings: ReflectionSettings, seed: int, journal: Journal, errors: _Errors):
        self.lm, self.settings, self.seed, self.journal, self.errors = lm, settings, seed, journal, errors
        self.calls = 0

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        messages = ({"role": "user", "content": prompt},) if isinstance(prompt, str) else tuple(prompt)
        request = Request(messages, max_new_tokens=self.settings.reflection_max_tokens,
                          temperature=self.settings.reflection_temperature, seed=self.seed * 10_000 + self.calls)
        self.calls += 1
        key = _digest(describe_lm(self.lm), asdict(request))
        if (done := self.journal.get("reflection", key)) is not None:
            return done["reply"]
        try:
            (completion,) = self.lm.generate([request])
        except Exception as exc:  # GEPA logs a failed reflection and goes on; this stops the step instead
            self.errors.record(exc)
            raise
        self.journal.put("reflection", key, {"prompt": prompt, "reply": completion.text})
        return completion.text


@dataclass
class Proposal:
    """One reflection: the parent, the module(s) GEPA chose to rewrite and the new text, the minibatch
    sums before and after."""

    iteration: int
    parent: int | None
    modules: list[str]
    instructions: dict[str, str]
    minibatch_before: float | None = None
    minibatch_after: float | None = None
    candidate: int | None = None  # its index in the pool, where it passed its minibatch and was scored on val
    note: str = ""


@dataclass
class Candidate:
    """A candidate in GEPA's pool (the seed is 0), scored on all of val."""

    index: int
    parents: list[int]
    changed: list[str]  # modules whose instructions differ from the first parent's
    instructions: dict[str, str]
    val: float  # percent
    val_errors: int = 0
    val_failures: dict[str, int] = field(default_factory=dict)


class Lineage:
    """GEPA's callbacks, kept as the step's lineage: every proposal and every candidate scored on val."""

    def __init__(self) -> None:
        self.proposals: list[Proposal] = []
        self.candidates: list[Candidate] = []
        self._parent: int | None = None
        self._parent_sum: float | None = None

    def on_candidate_selected(self, event) -> None:
        self._parent = event["candidate_idx"]

    def on_evaluation_end(self, event) -> None:
        if event["candidate_idx"] is None and self.proposals:  # the child, on its parent's minibatch
            self.proposals[-1].minibatch_after = sum(event["scores"])
        elif event["candidate_idx"] is not None:
            self._parent_sum = sum(event["scores"])

    def on_proposal_end(self, event) -> None:
        texts = dict(event["new_instructions"])
        self.proposals.append(Proposal(event["iteration"], self._parent, sorted(texts), texts, self._parent_sum))

    def on_candidate_accepted(self, event) -> None:
        self.proposals[-1].candidate = event["new_candidate_idx"]

    def on_valset_evaluated(self, event) -> None:
        parents = [p for p in event["parent_ids"] if p is not None]
        instructions = dict(event["candidate"])
        before = self.candidates[parents[0]].instructions if parents else instructions
        changed = sorted(name for name, text in instructions.items() if before.get(name) != text)
        self.candidates.append(Candidate(event["candidate_idx"], parents, changed, instructions,
                                         100.0 * event["average_score"]))


class _Stop:
    """Stops GEPA before an iteration whose metric calls no longer fit the budget (`per_iteration`: its
    two minibatches, and the default feedback's probe of each run), or after an error."""

    def __init__(self, budget: Budget, per_iteration: int, errors: _Errors):
        self.budget, self.per_iteration, self.errors = budget, per_iteration, errors

    def __call__(self, state) -> bool:
        return self.budget.left < self.per_iteration or self.errors.first is not None


class _Log:
    """GEPA's log lines, to tandem's log (GEPA's default logger prints)."""

    def log(self, message: str) -> None:
        log.debug("gepa: %s", message)


# -- the step -----------------------------------------------------------------------------------


@dataclass
class ReflectionResult:
    program: Program
    best: int  # the kept candidate's index (0: the starting instructions)
    candidates: list[Candidate]
    proposals: list[Proposal]
    before: dict[str, str]
    after: dict[str, str]
    metric_calls: int
    max_metric_calls: int
    read_back: int  # runs the journal gave back (a resumed step)
    reflection_lm: dict[str, Any]
    reflection_lm_is_task_lm: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"best_candidate": self.best, "instructions_before": self.before, "instructions_after": self.after,
                "changed": sorted(n for n in self.before if self.before[n] != self.after[n]),
                "metric_calls": self.metric_calls, "max_metric_calls": self.max_metric_calls,
                "read_back": self.read_back, "reflection_lm": self.reflection_lm,
                "reflection_lm_is_task_lm": self.reflection_lm_is_task_lm, "notes": self.notes,
                "candidates": [asdict(c) for c in self.candidates], "proposals": [asdict(p) for p in self.proposals]}


def iteration_calls(settings: ReflectionSettings, default_feedback: bool) -> int:
    """Metric calls of one GEPA iteration before val: the parent's and the child's minibatch, and where the
    feedback is the default one, its probe of the gold answer for each of the parent's runs."""
    return (3 if default_feedback else 2) * settings.reflection_minibatch_size


def check_budget(settings: ReflectionSettings, val_size: int, default_feedback: bool = True) -> None:
    """Refuse a budget that cannot score the starting instructions and one proposal on val, besides
    the proposal's iteration: such a step would spend its calls and could never change anything."""
    iteration = iteration_calls(settings, default_feedback)
    least = 2 * val_size + iteration
    if settings.max_metric_calls < least:
        probes = " and the feedback's probes" if default_feedback else ""
        raise UsageError(f"--max-metric-calls {settings.max_metric_calls} is too small for a g step: scoring the "
                         f"starting instructions and one proposal on val ({val_size} runs each) and the proposal's "
                         f"two minibatches{probes} ({settings.reflection_minibatch_size} each) take {least}")


def evolve_instructions(
    program: Program,
    lm: LM,
    train: Sequence[Example],
    val: Sequence[Example],
    metric: Metric,
    settings: ReflectionSettings = ReflectionSettings(),
    *,
    out_dir: str | Path,
    reflection_lm: LM | None = None,
    feedback: Feedback | None = None,
    seed: int = 0,
    generation: GenerationSettings = GenerationSettings(),
    progress: bool = True,
) -> ReflectionResult:
    """Return a new program whose instructions are the best on val that GEPA found; `program` is not
    changed. `reflection_lm` writes the instructions (default: `lm`); `feedback` is the task's own
    (default: the gold answer the metric reads). `out_dir` holds the journal a rerun resumes from."""
    import gepa

    if not train or not val:
        raise ValueError("instruction evolution needs training and validation examples")
    seed_candidate = instructions_of(program)
    if not seed_candidate:
        raise UsageError("a g step needs a program with at least one module")
    check_budget(settings, len(val), feedback is None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reflector = reflection_lm or lm
    journal, errors, lineage = Journal(out_dir / JOURNAL), _Errors(), Lineage()
    budget = Budget(settings.max_metric_calls)
    notes: list[str] = []
    with tqdm(total=budget.total, desc="g: metric calls", unit="run", disable=not progress, dynamic_ncols=True) as bar:
        adapter = InstructionAdapter(program, lm, metric, generation, feedback, budget, journal, errors, bar)
        reflect = ReflectionCall(reflector, settings, seed, journal, errors)
        try:
            gepa.optimize(seed_candidate=seed_candidate, trainset=list(train), valset=list(val), adapter=adapter,
                          reflection_lm=reflect, max_metric_calls=budget.total,
                          stop_callbacks=[_Stop(budget, iteration_calls(settings, feedback is None), errors)],
                          reflection_minibatch_size=settings.reflection_minibatch_size,
                          candidate_selection_strategy="pareto", module_selector="round_robin",
                          callbacks=[lineage], logger=_Log(), seed=seed, raise_on_exception=True)
        except BudgetExhausted:
            last = lineage.proposals[-1] if lineage.proposals else None
            if last and last.candidate is None and (last.minibatch_after or 0) > (last.minibatch_before or 0):
                last.note = "passed its minibatch; the budget left could not score it on val"
        if errors.first is not None:
            raise errors.first
    for c in lineage.candidates:  # failed runs on val, from the runs themselves
        runs = adapter.results_of(c.instructions, val)
        c.val_failures = _failures(runs)
        c.val_errors = sum(c.val_failures.values())
    best = max(lineage.candidates, key=lambda c: (c.val, -c.val_errors))  # max keeps the first of equals
    scored = len(lineage.candidates) - 1
    kept = "the starting instructions" if best.index == 0 else f"candidate {best.index} ({', '.join(best.changed)})"
    notes.append(f"GEPA: {len(lineage.proposals)} proposal(s), {scored} scored on val; kept {kept}"
                 f" (val {best.val:.1f}%, start {lineage.candidates[0].val:.1f}%); {budget.spent}/{budget.total} "
                 "metric calls")
    if adapter.read_back:
        notes.append(f"resumed: {adapter.read_back} runs read back from {JOURNAL}")
    new = with_instructions(program, best.instructions)
    return ReflectionResult(new, best.index, lineage.candidates, lineage.proposals, seed_candidate,
                            instructions_of(new), budget.spent, budget.total, adapter.read_back,
                            describe_lm(reflector), describe_lm(reflector) == describe_lm(lm), notes)


def _failures(results: Sequence[ExampleResult | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        if r is not None and r.failure:
            counts[r.failure] = counts.get(r.failure, 0) + 1
    return counts


# -- the report -------------------------------------------------------------------------------
