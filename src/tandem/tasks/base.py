"""What a task is (splits, a program factory, a metric) and where its data lives."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UsageError
from ..evaluate import Feedback, Metric
from ..program import Example, Program

SPLIT_SEED = 0  # splits are fixed across experiments; seeds vary the optimizers, not the data
DATA_ENV = "TANDEM_DATA_DIR"


class DataNotFoundError(UsageError, FileNotFoundError):
    """A data file is missing: the message says where tandem looked and how to point it elsewhere."""


@dataclass
class Task:
    name: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
    make_program: Callable[[], Program]
    metric: Metric  # what optimizers maximize and the table reports
    report_metrics: dict[str, Metric] = field(default_factory=dict)  # shown beside it, never optimized
    source: dict[str, Any] = field(default_factory=dict)  # where it came from: a run folder records it
    # g steps: what the reflection LM is told about a run besides its score and failure (default: the gold
    # answer the metric reads, beside the one given); see optimizers/reflect.py
    feedback: Feedback | None = None

    def __post_init__(self) -> None:
        if not self.source:
            self.source = {"builtin": self.name}
        if not callable(self.metric) or not callable(self.make_program):
            raise UsageError(f"task {self.name!r}: make_program and metric must be callables")
        if self.feedback is not None and not callable(self.feedback):
            raise UsageError(f"task {self.name!r}: feedback must be a callable (example, prediction, trace) -> str")

    def sized(self, sizes: Any) -> tuple[list[Example], list[Example], list[Example]]:
        """train, val and test cut to `sizes` (a DataSettings: train_size, val_size, test_size)."""
        return self.train[: sizes.train_size], self.val[: sizes.val_size], self.test[: sizes.test_size]

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "val", "test"):
            raise UsageError(f"split must be train, val or test, got {name!r}")
        return getattr(self, name)


def _default_data_dirs() -> list[Path]:
    repo = Path(__file__).resolve().parents[3]  # src/tandem/tasks/base.py -> the checkout
    return [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]


def find_data_file(relative: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The file `relative` under --data-dir, $TANDEM_DATA_DIR, or ../shared/data, in that order."""
    if data_dir is not None or os.environ.get(DATA_ENV):
        candidates = [Path(data_dir or os.environ[DATA_ENV]).expanduser()]
    else:
        candidates = list(dict.fromkeys(_default_data_dirs()))
    for folder in candidates:
        if (folder / relative).is_file():
            return folder / relative
    looked = ", ".join(str(c / relative) for c in candidates)
    raise DataNotFoundError(f"data file not found: looked for {looked}; pass --data-dir DIR or set {DATA_ENV}")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
