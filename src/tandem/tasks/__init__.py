"""The paper's three tasks, one file each: data and splits, the program, the metric."""

from __future__ import annotations

from . import gsm8k, hotpotqa, iris
from ..errors import UsageError
from .base import DATA_ENV, DataNotFoundError, Task

LOADERS = {"gsm8k": gsm8k.load, "hotpotqa": hotpotqa.load, "iris": iris.load}


def load_task(name: str, data_dir: str | None = None) -> Task:
    if name not in LOADERS:
        raise UsageError(f"unknown task '{name}': choose one of {', '.join(sorted(LOADERS))}")
    return LOADERS[name](data_dir)


__all__ = ["Task", "load_task", "LOADERS", "DataNotFoundError", "DATA_ENV"]
