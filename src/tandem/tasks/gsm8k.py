"""GSM8K: grade-school math word problems; one chain-of-thought module; the final number must match."""

from __future__ import annotations

import random
import re

from ..program import ChainOfThought, Example, Prediction, Program, Run
from .base import SPLIT_SEED, Task, find_data_file, read_jsonl
from .metrics import parse_number

VAL_SIZE = 500
INSTRUCTIONS = "Solve the grade-school math word problem. Reason step by step, then give the final answer as a single number."


class GSM8KProgram(Program):
    def __init__(self) -> None:
        self.solve = ChainOfThought("question -> answer: number", INSTRUCTIONS)

    def forward(self, run: Run, question: str) -> Prediction:
        return self.solve(run, question=question)


def metric(example: Example, prediction: Prediction) -> float:
    got = parse_number(prediction.answer)
    return float(got is not None and abs(got - float(example.answer)) < 1e-6)


def feedback(example: Example, prediction: Prediction | None, trace) -> str:
    """For the reflection LM (g steps): the gold number beside the number given."""
    if prediction is None:
        given = "no answer was given"
    else:
        got = parse_number(prediction.answer)
        given = f"the answer given was {got:g}" if got is not None else \
            f"the answer given, {str(prediction.answer)[:80]!r}, holds no number"
    return f"The correct answer is {example.answer}; {given}."


def _example(row: dict) -> Example:
    solution, gold = row["answer"].rsplit("####", 1)
    reasoning = re.sub(r"<<[^>]*>>", "", solution).strip()
    return Example(question=row["question"], reasoning=reasoning, answer=gold.strip().replace(",", ""), inputs=("question",))


def load(data_dir: str | None = None) -> Task:
    """train/val: the official train file split with a fixed seed (val 500); test: the official 1,319."""
    pool = [_example(r) for r in read_jsonl(find_data_file("gsm8k/train.jsonl", data_dir))]
    test = [_example(r) for r in read_jsonl(find_data_file("gsm8k/test.jsonl", data_dir))]
    random.Random(SPLIT_SEED).shuffle(pool)
    return Task("gsm8k", pool[VAL_SIZE:], pool[:VAL_SIZE], test, GSM8KProgram, metric, feedback=feedback)
