"""The one evaluation loop: run a program over examples concurrently, score each, count failures.

Concurrency is what makes a local model fast: N executions run in threads, and their LM calls
meet in the backend's dynamic batcher. Only what the model wrote fails an example softly: a
reply that does not parse, one cut at its token limit, or a prediction the metric cannot score
(the metric raises ValueError or ArithmeticError: a number that will not parse, a ratio by zero).
Such an example scores 0 and is counted by kind; past `max_errors` the evaluation stops. Any
other error (the LM backend failing, a bug in the program, a TypeError, KeyError or
AttributeError in the metric) stops the evaluation at once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from .errors import TandemError
from .lm.base import LM
from .program import Example, Prediction, Program, TraceEntry
from .settings import GenerationSettings

log = logging.getLogger(__name__)

Metric = Callable[[Example, Prediction], float]
# What a reflection LM (g steps) reads about one run besides the score: `feedback(example, prediction,
# trace)`, the prediction None where the run failed. A task may define one (Task.feedback).
Feedback = Callable[[Example, Prediction | None, Sequence[TraceEntry]], str]


METRIC_FAILURE = "metric could not score"


class ErrorBudgetExceeded(TandemError, RuntimeError):
    pass


class MetricError(RuntimeError):
    """The metric failed in a way no prediction explains: a bug in it (or in the program's outputs it
    reads). Names the example; the metric's own exception is its `__cause__`."""


# What a metric raises on a prediction it cannot read (a number that will not parse, a ratio by zero):
# that is what the model wrote, so only the example fails. A TypeError, KeyError or AttributeError
# (a field the prediction never has, a None where a value belongs) is a bug and stops everything.
SOFT_METRIC_ERRORS = (ValueError, ArithmeticError)


@dataclass
class ExampleResult:
    example: Example
    prediction: Prediction | None
    score: float
    trace: list[TraceEntry]
    error: str | None = None  # why the example failed, when it did
    failure: str | None = None  # the kind of failure: "unparsed", "truncated at 96 tokens before Species", ...


@dataclass
class EvalResult:
    results: list[ExampleResult]
    seconds: float
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Mean metric in percent; failed examples count as 0."""
        return 100.0 * sum(r.score for r in self.results) / len(self.results) if self.results else 0.0

    @property
    def n_errors(self) -> int:
        return sum(r.error is not None for r in self.results)

    def mean(self, metric: Metric) -> float | None:
        """Another metric over the same runs, in percent: failed runs count as 0, and examples the
        metric cannot judge (it returns None) are left out; None if none is left."""
        values = [0.0 if r.prediction is None or r.error else metric(r.example, r.prediction) for r in self.results]
        kept = [v for v in values if v is not None]
        return 100.0 * sum(kept) / len(kept) if kept else None

    def failures(self) -> dict[str, int]:
        """Failed examples by kind, most frequent first."""
        return dict(Counter(r.failure for r in self.results if r.failure).most_common())

    def summary(self) -> str:
        n = len(self.results)
        line = f"score {self.score:.1f}% on {n} examples, {self.n_errors} failed"
        if self.n_errors:
            line += " (" + describe_failures(self.failures()) + ")"
        rate = n / self.seconds if self.seconds else 0.0
        line += f", {self.seconds:.1f}s ({rate:.2f} examples/s)"
        return line


def evaluate(
    program: Program,
    lm: LM,
    examples: Sequence[Example],
    metric: Metric,
    generation: GenerationSettings = GenerationSettings(),
    *,
    max_errors: int | None = None,
    progress: bool = True,
    desc: str = "eval",
    seed: int | Sequence[int] = 0,
    hints: Callable[[Example], Mapping[str, Any]] | None = None,
    on_result: Callable[[int, ExampleResult], None] | None = None,
) -> EvalResult:
    """Run `program` on every example (`generation.threads` at once) and score it with `metric`.

    `seed` (one, or one per example) tells sampled runs apart at temperature > 0, so the same
    example can be listed several times for several samples; `hints(example)` gives the correct
    outputs shown to the modules (rationalization, in the weight step). `on_result(i, result)` is
    called in this thread as each example finishes, so a caller can keep what is done (a g step's
    journal) even if the evaluation is stopped before its end.
    """
    seeds = [seed] * len(examples) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(examples):
        raise ValueError(f"{len(seeds)} seeds for {len(examples)} examples")
    run_settings = generation.run_kwargs()
    started = time.perf_counter()
    usage_before = _usage(lm)
    results: list[ExampleResult | None] = [None] * len(examples)
    errors = finished = 0
    correct = 0.0

    def one(i: int, example: Example, seed: int) -> ExampleResult:
        run = program.execute(lm, example.inputs(), **run_settings, seed=seed, hints=hints(example) if hints else None)
        if run.failure is not None:
            return ExampleResult(example, None, 0.0, run.trace, run.error, run.failure)
        try:
            value = metric(example, run.prediction)
        except SOFT_METRIC_ERRORS as exc:
            # The prediction is odd in a way the metric cannot score: this example fails, counted.
            error = f"{METRIC_FAILURE}: {type(exc).__name__}: {exc}"
            return ExampleResult(example, run.prediction, 0.0, run.trace, error, METRIC_FAILURE)
        except TandemError:  # an engine behind the metric failing already says what it is
            raise
        except Exception as exc:
            raise MetricError(f"the metric raised {type(exc).__name__} on {_where(i, example)}: {exc}") from exc
        try:
            score = float(value)
        except (TypeError, ValueError):  # a missing return (None) is the metric's bug, not the model's
            raise MetricError(f"the metric returned {value!r} on {_where(i, example)}; it must return a number") \
                from None
        return ExampleResult(example, run.prediction, score, run.trace)

    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=generation.threads) as pool:
        futures = {pool.submit(one, i, ex, s): i for i, (ex, s) in enumerate(zip(examples, seeds))}
        try:
            for fut in as_completed(futures):
                result = fut.result()
                results[futures[fut]] = result
                if on_result is not None:
                    on_result(futures[fut], result)
                correct += result.score
                finished += 1
                if result.error:
                    errors += 1
                    log.debug("example %d failed: %s", futures[fut], result.error)
                    if max_errors is not None and errors > max_errors:
                        raise ErrorBudgetExceeded(
                            f"{errors} examples failed, more than max_errors={max_errors}; latest: {result.error}"
                        )
                bar.update(1)
                bar.set_postfix(score=f"{100 * correct / finished:.1f}%", failed=errors, refresh=False)
        except BaseException:  # Ctrl-C or the error budget: stop now, not when the running batch ends
            for f in futures:
                f.cancel()
            cancel = getattr(lm, "cancel", None)
            if cancel is not None:
                cancel()
            raise
        finally:
            bar.close()
    done = [r for r in results if r is not None]
    return EvalResult(done, time.perf_counter() - started, _usage_delta(usage_before, _usage(lm)))


def describe_failures(failures: dict[str, int], total: int | None = None) -> str:
    """`{"unparsed": 3, "truncated at 96 tokens before Species": 2}` -> "3 unparsed, 2 truncated ..."."""
    of = f"/{total}" if total is not None else ""
    return ", ".join(f"{n}{of} {kind}" for kind, n in failures.items())


def _where(i: int, example: Example, width: int = 120) -> str:
    """`example 3 (question='How many ...')`: enough to find it in the data."""
    text = ", ".join(f"{k}={v!r}" for k, v in example.inputs().items())
    return f"example {i} ({text if len(text) <= width else text[: width - 3] + '...'})"


def _usage(lm: LM) -> dict[str, float]:
    usage = getattr(lm, "usage", None)
    if usage is None:
        return {}
    out = {k: v for k, v in vars(usage).items() if isinstance(v, (int, float))}
    out.update(usage.extra)
    inner = getattr(lm, "lm", None)  # a cache in front of an engine: the engine counts real work
    if inner is not None and getattr(inner, "usage", None) is not None:
        out.update({f"engine_{k}": v for k, v in _usage(inner).items()})
    return out


def _usage_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after}
