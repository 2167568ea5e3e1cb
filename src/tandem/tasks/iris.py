"""Iris as an LM program: four measurements in, the species out, one chain-of-thought module."""

from __future__ import annotations

import re

from ..program import ChainOfThought, Example, Prediction, Program, Run
from .base import SPLIT_SEED, Task

SPECIES = ("setosa", "versicolor", "virginica")
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
INSTRUCTIONS = (
    "Given the sepal and petal measurements of an iris flower in centimeters, "
    "tell its species: setosa, versicolor or virginica."
)


class IrisProgram(Program):
    def __init__(self) -> None:
        self.classify = ChainOfThought(f"{', '.join(FEATURES)} -> species: {'|'.join(SPECIES)}", INSTRUCTIONS)

    def forward(self, run: Run, **measurements: float) -> Prediction:
        return self.classify(run, **measurements)


def normalize_species(text: str) -> str:
    words = [w for w in re.findall(r"[a-z]+", str(text).lower()) if w != "iris"]
    return " ".join(words)


def metric(example: Example, prediction: Prediction) -> float:
    return float(normalize_species(prediction.species) == example.species)


def feedback(example: Example, prediction: Prediction | None, trace) -> str:
    """For the reflection LM (g steps): the gold species beside the one given."""
    given = f"the answer given was {normalize_species(prediction.species)!r}" if prediction is not None \
        else "no species was given"
    return f"The correct species is {example.species!r}; {given}."


def load(data_dir: str | None = None) -> Task:
    """150 rows from scikit-learn, split 50/50/50 stratified by species with a fixed seed."""
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    data = load_iris()
    rows = [
        Example({**{f: float(v) for f, v in zip(FEATURES, x)}, "species": SPECIES[y]}, inputs=FEATURES)
        for x, y in zip(data.data, data.target)
    ]
    labels = [r["species"] for r in rows]
    train, rest = train_test_split(rows, train_size=50, stratify=labels, random_state=SPLIT_SEED)
    val, test = train_test_split(rest, train_size=50, stratify=[r["species"] for r in rest], random_state=SPLIT_SEED)
    return Task("iris", train, val, test, IrisProgram, metric, feedback=feedback)
