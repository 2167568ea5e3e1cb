"""What a program answered on a split: the tally of its choice-typed answer ("setosa 16/20, versicolor
4/20") and the collapse check every step's record carries (one class for most of val)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .evaluate import EvalResult
from .program import Example, Program
from .signatures import Field, InvalidValue

@dataclass
class ValScore:
    """A program's val score, its failed runs and its answers: what picks a step's checkpoint."""

    score: float
    errors: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # failed runs by kind

    @classmethod
    def of(cls, program: Program, result: EvalResult) -> "ValScore":
        return cls(result.score, result.n_errors, answers(program, result), result.failures())

    def beats(self, other: "ValScore") -> bool:
        """Strictly better: a higher score, or as high with fewer failed runs (a tie keeps `other`)."""
        return (self.score, -self.errors) > (other.score, -other.errors)


FAILED = "(failed)"
COLLAPSE_SHARE = 0.8  # a weight step whose val answers are one class more often than this has collapsed


def choice_field(program: Program, example: Example) -> Field | None:
    """The first choice-typed output field the example has a label for."""
    for predictor in program.predictors():
        for f in predictor.signature.outputs:
            if f.type == "choice" and f.name in example:
                return f
    return None


def answers(program: Program, result: EvalResult) -> dict[str, int]:
    """How often each value of the program's choice-typed answer was given ("setosa": 20), canonical
    values, failed runs as "(failed)"; empty where the answer is not a choice."""
    found = choice_field(program, result.results[0].example) if result.results else None
    if found is None:
        return {}
    counts: Counter = Counter()
    for r in result.results:
        value = r.prediction.get(found.name) if r.prediction is not None and not r.error else None
        try:
            counts[found.check(str(value)) if value is not None else FAILED] += 1
        except InvalidValue:
            counts[str(value)] += 1
    return dict(counts.most_common())


def collapse_note(answers: dict[str, int]) -> str | None:
    """"collapsed: 'setosa' for 20/20 val" when one class (not a failure) takes more than 80% of val."""
    total = sum(answers.values())
    top, n = next(iter(answers.items()), (None, 0))
    if total and top != FAILED and n > COLLAPSE_SHARE * total:
        return f"collapsed: {top!r} for {n}/{total} val"
    return None


def describe_answers(answers: dict[str, int]) -> str:
    total = sum(answers.values())
    return ", ".join(f"{value} {n}/{total}" for value, n in answers.items())
