"""The paper's three tasks, one file each (data and splits, the program, the metric), and tasks of
your own: a Python file or module (`path/to/file.py:NAME`), or data files plus a signature.

May import: program, signatures, evaluate, retrieve, errors. Never an LM engine, an optimizer or the CLI."""

from __future__ import annotations

from ..errors import UsageError
from . import gsm8k, hotpotqa, iris
from .base import DATA_ENV, DataNotFoundError, Task
from .custom import SignatureProgram, data_task, import_task, program_from_source

LOADERS = {"gsm8k": gsm8k.load, "hotpotqa": hotpotqa.load, "iris": iris.load}


def load_task(spec: str, data_dir: str | None = None) -> Task:
    """A built-in task by name, or `path/to/file.py:NAME` / `package.module:NAME` (a Task or a function returning one)."""
    if ":" in spec:
        return import_task(spec)
    if spec not in LOADERS:
        raise UsageError(f"unknown task '{spec}': choose one of {', '.join(sorted(LOADERS))}, "
                         "or name your own as path/to/file.py:NAME or package.module:NAME")
    return LOADERS[spec](data_dir)


__all__ = ["Task", "load_task", "data_task", "import_task", "program_from_source", "SignatureProgram", "LOADERS",
           "DataNotFoundError", "DATA_ENV"]
