"""A task of your own, written only against tandem's public API: wine cultivars from scikit-learn.

Run it like a built-in task:  tandem optimize --task examples/wine_task.py:wine --model smollm2-135m ...
A task is splits of `Example`s, a factory for the program, and a metric(example, prediction).
"""

from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split

from tandem import ChainOfThought, Example, Program
from tandem.tasks import Task

CULTIVARS = ("barolo", "grignolino", "barbera")  # the three cultivars of the UCI wine data
FEATURES = ("alcohol", "malic_acid", "flavanoids", "color_intensity", "proline")


class WineProgram(Program):
    def __init__(self):
        self.classify = ChainOfThought(f"{', '.join(FEATURES)} -> cultivar",
                                       f"Tell the cultivar of an Italian wine from its chemistry: {', '.join(CULTIVARS)}.")

    def forward(self, run, **chemistry):
        return self.classify(run, **chemistry)


def metric(example, prediction):
    return float(prediction.cultivar.strip().lower() == example.cultivar)


def wine() -> Task:
    data = load_wine()
    index = [list(data.feature_names).index(f) for f in FEATURES]
    rows = [Example({**{f: round(float(x[i]), 2) for f, i in zip(FEATURES, index)}, "cultivar": CULTIVARS[y]},
                    inputs=FEATURES) for x, y in zip(data.data, data.target)]
    train, rest = train_test_split(rows, train_size=60, stratify=[r["cultivar"] for r in rows], random_state=0)
    val, test = train_test_split(rest, train_size=50, stratify=[r["cultivar"] for r in rest], random_state=0)
    return Task("wine", train, val, test, WineProgram, metric)
