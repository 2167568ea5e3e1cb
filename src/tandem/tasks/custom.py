"""Tasks nobody here wrote: a Python file or module that defines one, or data files and a signature.

Two ways in, both ending in the same `Task` as the built-in ones:

- `import_task("path/to/file.py:NAME")` or `import_task("package.module:NAME")`: NAME is a `Task`
  or a function (no arguments) returning one. See examples/wine_task.py.
- `data_task("train.jsonl", signature="text -> label", ...)`: JSON Lines or CSV rows, every row
  checked up front, one program module (`predict` or `cot`) over the signature, and a metric
  comparing each output field (`exact`, `contains`, `f1`, `number`).

A task records where it came from (`Task.source`: file paths and content hashes), so a run folder
made from other data or code refuses to resume.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from ..program import ChainOfThought, Example, Predict, Prediction, Program, Run
from ..signatures import Field, InvalidValue, Signature
from .base import SPLIT_SEED, Task
from .metrics import COMPARISONS

PROGRAMS = ("cot", "predict")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_task(spec: str) -> Task:
    """The Task that `path/to/file.py:NAME` or `package.module:NAME` defines."""
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise UsageError(f"task {spec!r}: write path/to/file.py:NAME or package.module:NAME")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise UsageError(f"task {spec!r}: no file {path}")
        module_name = "tandem_task_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling-free tools look modules up by name
        loader.loader.exec_module(module)
        source = {"file": str(path.resolve()), "sha256": _sha256(path)}
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise UsageError(f"task {spec!r}: cannot import {where} ({exc})") from None
        file = Path(getattr(module, "__file__", "") or "")
        source = {"module": where, **({"sha256": _sha256(file)} if file.is_file() else {})}
    if not hasattr(module, name):
        raise UsageError(f"task {spec!r}: {where} defines no {name}")
    obj = getattr(module, name)
    task = obj if isinstance(obj, Task) else obj() if callable(obj) else obj
    if not isinstance(task, Task):
        raise UsageError(f"task {spec!r}: {name} gave a {type(task).__name__}, not a tandem Task")
    task.source = {"spec": spec, **source}
    return task


class SignatureProgram(Program):
    """One module over a signature: what a data-file task runs."""

    def __init__(self, signature: str, instructions: str = "", kind: str = "cot"):
        if kind not in PROGRAMS:
            raise UsageError(f"--program must be one of {', '.join(PROGRAMS)}, got {kind!r}")
        self.predict = (ChainOfThought if kind == "cot" else Predict)(signature, instructions)

    def forward(self, run: Run, **inputs: Any) -> Prediction:
        return self.predict(run, **inputs)


def read_rows(path: str | Path, fields: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every row of a JSON Lines or CSV file; each row must have every field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{path}: no such data file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            lacking = [name for name in fields if name not in columns]
            if columns and lacking:
                raise UsageError(f"{path}: no column {lacking[0]!r} (columns: {', '.join(columns)})")
            rows = [(n, row) for n, row in enumerate(reader, 2)]
    elif path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise UsageError(f"{path}:{n}: a row must be a JSON object, got {type(row).__name__}")
                rows.append((n, row))
        lacking = [name for name in fields if rows and not any(name in row for _, row in rows)]
        if lacking:
            raise UsageError(f"{path}: no row has the field {lacking[0]!r} that the signature names")
    else:
        raise UsageError(f"{path}: data files are .jsonl or .csv, not {path.suffix or 'no extension'}")
    if not rows:
        raise UsageError(f"{path}: no rows")
    for n, row in rows:
        for name in fields:
            if row.get(name) in (None, ""):
                raise UsageError(f"{path}:{n}: missing field {name!r}")
    return rows


def data_task(
    train: str | Path,
    signature: str,
    *,
    val: str | Path | None = None,
    test: str | Path | None = None,
    instructions: str = "",
    metric: str = "exact",
    program: str = "cot",
    name: str | None = None,
) -> Task:
    """A task from data files. A split without its own file is carved from `train` with a fixed seed
    (a quarter each for test and val)."""
    if metric not in COMPARISONS:
        raise UsageError(f"--metric must be one of {', '.join(COMPARISONS)}, got {metric!r}")
    sig = Signature.parse(signature, instructions)
    SignatureProgram(signature, instructions, program)  # refuses a bad program kind before reading data
    fields = sig.input_names + sig.output_names

    typed = [f for f in sig.outputs if f.type != "text"]

    def examples(path: str | Path) -> list[Example]:
        rows = read_rows(path, fields)
        for n, row in rows:  # a gold label no reply could match is a data error, said before anything runs
            for f in typed:
                try:
                    f.check(str(row[f.name]))
                except InvalidValue as exc:
                    raise UsageError(f"{Path(path).expanduser()}:{n}: {exc}") from None
        return [Example({f: row[f] for f in fields}, inputs=tuple(sig.input_names)) for _, row in rows]

    pool = examples(train)
    random.Random(SPLIT_SEED).shuffle(pool)
    carve = (val is None) + (test is None)
    if carve and len(pool) < 4 * carve:
        raise UsageError(f"{train}: {len(pool)} rows are too few to carve {carve} more split(s) from; give --val/--test")
    quarter = len(pool) // 4
    test_rows = examples(test) if test is not None else pool[:quarter]
    pool = pool if test is not None else pool[quarter:]
    val_rows = examples(val) if val is not None else pool[:quarter]
    train_rows = pool if val is not None else pool[quarter:]
    compare = COMPARISONS[metric]

    def same(f: Field, got: str, gold: str) -> float:
        """Typed values are compared as values: the parser made the reply's canonical, and the gold is
        made canonical the same way (`--metric exact` would read choices "A+" and "A-" both as "a")."""
        return compare(got, gold) if f.type == "text" else float(got == f.check(gold))

    def score(example: Example, prediction: Prediction) -> float:
        return statistics.mean(same(f, str(prediction[f.name]), str(example[f.name])) for f in sig.outputs)

    files = {split: {"path": str(Path(p).resolve()), "sha256": _sha256(Path(p).expanduser())}
             for split, p in (("train", train), ("val", val), ("test", test)) if p is not None}
    source = {"data": files, "signature": signature, "instructions": instructions, "metric": metric, "program": program}
    return Task(name or Path(train).stem, train_rows, val_rows, test_rows,
                lambda: SignatureProgram(signature, instructions, program), score, source=source)


def program_from_source(source: dict[str, Any], data_dir: str | None = None) -> Program:
    """A fresh program of the task a run folder recorded (`Task.source`), without reading its data
    where the program does not need it."""
    from . import load_task

    if "signature" in source:
        return SignatureProgram(source["signature"], source.get("instructions", ""), source.get("program", "cot"))
    if "spec" in source:
        return import_task(source["spec"]).make_program()
    if "builtin" in source:
        return load_task(source["builtin"], data_dir).make_program()
    raise UsageError(f"unknown task source {source!r}")
