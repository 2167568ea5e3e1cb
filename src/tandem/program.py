"""LM programs: modules that call an LM through signatures, composed in plain Python.

A program's learnable state is plain data: instructions and demos per predictor plus an adapter
reference. Each execution gets a `Run` that carries the LM, the adapter and the trace, so a
program object holds no LM and many executions can share it from many threads.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError
from .lm.base import LM, Message, Request
from .prompts import (
    Invalid, ModelOutputError, NoReasoning, ParseError, Truncated, check_reasoning, parse_reply, render_messages,
    reply_format, stop_strings,
)
from .signatures import REASONING, Signature, ensure_signature

STATE_VERSION = 1


MODULE_LABELS = "module_labels"


class Example(dict):
    """A labeled example: a dict of fields, with `inputs` naming the ones a program receives.

    Where a dataset labels intermediate steps too, `example["module_labels"]` maps a predictor's
    name to a complete demo for it (inputs and outputs); prompt optimization uses it as that
    module's labeled demo. Metrics see only the final labels.
    """

    def __init__(self, data: Mapping[str, Any] | None = None, *, inputs: tuple[str, ...] = (), **fields: Any):
        super().__init__(data or {}, **fields)
        unknown = [k for k in inputs if k not in self]
        if unknown:
            raise KeyError(f"input fields not in example: {unknown}")
        self.input_keys = tuple(inputs)

    def inputs(self) -> dict[str, Any]:
        return {k: self[k] for k in self.input_keys}

    def labels(self) -> dict[str, Any]:
        return {k: v for k, v in self.items() if k not in self.input_keys}

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Prediction(dict):
    """Output fields of a module or program, readable as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class TraceEntry:
    """One module call: what went in, the exact messages, the raw reply, what was parsed, and what it
    cost (tokens, when it started and how long it took, batching and queueing included)."""

    module: str
    inputs: dict[str, Any]
    messages: list[Message]
    reply: str | None = None
    outputs: dict[str, str] | None = None
    error: str | None = None
    # What the engine sampled (`Completion.token_ids`, `.forced`), for r steps to train on; not shown in traces.
    token_ids: list[int] | None = field(default=None, repr=False)
    forced: list[int] = field(default_factory=list, repr=False)
    finish_reason: str | None = field(default=None, repr=False)  # "length": cut at the token limit
    failure: str | None = None  # the error's kind: "unparsed", "truncated at 96 tokens before Species", ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # the reply came from the LM call cache
    started: float | None = None  # wall clock (time.time()) when the call was made
    seconds: float | None = None


@dataclass
class Run:
    """One execution of a program: the LM it calls, the adapter, sampling settings and the trace."""

    lm: LM
    adapter: str | None = None
    temperature: float = 0.0
    max_new_tokens: int = 512
    seed: int = 0
    constrained: bool = False  # ask the engine to decode within each module's reply format
    hints: dict[str, Any] | None = None  # rationalization: correct outputs shown to the modules that write them
    trace: list[TraceEntry] = field(default_factory=list)
    prediction: Prediction | None = None
    error: str | None = None  # the failure's message, when what the model wrote could not be used
    failure: str | None = None  # its kind: "unparsed", "truncated at 96 tokens before Species", ...
    exception: Exception | None = field(default=None, repr=False)


class Module:
    """Anything that holds predictors. Like torch's `named_parameters`, `named_predictors` walks attributes."""

    def named_predictors(self) -> list[tuple[str, "Predict"]]:
        found: list[tuple[str, Predict]] = []
        seen: set[int] = set()

        def walk(obj: Any, prefix: str) -> None:
            if id(obj) in seen:
                return
            if isinstance(obj, Predict):
                seen.add(id(obj))
                found.append((prefix, obj))
            elif isinstance(obj, Module):
                seen.add(id(obj))
                for name, value in vars(obj).items():
                    walk(value, f"{prefix}.{name}" if prefix else name)
            elif isinstance(obj, (list, tuple)):
                for i, value in enumerate(obj):
                    walk(value, f"{prefix}[{i}]")
            elif isinstance(obj, dict):
                for key, value in obj.items():
                    walk(value, f"{prefix}[{key!r}]")

        for name, value in vars(self).items():
            walk(value, name)
        return found

    def predictors(self) -> list["Predict"]:
        return [p for _, p in self.named_predictors()]


class Predict(Module):
    """One LM call through a signature; its state is instructions plus demos."""

    rationale: str | None = None  # an output field that must hold real reasoning (ChainOfThought's)

    def __init__(self, signature: str | Signature, instructions: str = "", max_new_tokens: int | None = None):
        self.signature = ensure_signature(signature, instructions)
        self.demos: list[dict[str, Any]] = []
        self.max_new_tokens = max_new_tokens
        self.name = "predict"

    def messages(self, inputs: Mapping[str, Any], demos: list[dict[str, Any]] | None = None,
                 hint: Mapping[str, Any] | None = None) -> list[Message]:
        return render_messages(self.signature, self.demos if demos is None else demos, inputs, hint)

    def __call__(self, run: Run, **inputs: Any) -> Prediction:
        messages = self.messages(inputs, hint=run.hints)
        limit = min(run.max_new_tokens, self.max_new_tokens or run.max_new_tokens)
        request = Request(
            tuple(messages),
            max_new_tokens=limit,
            temperature=run.temperature,
            stop=stop_strings(self.signature),
            adapter=run.adapter,
            seed=run.seed,
            format=reply_format(self.signature) if run.constrained else None,
        )
        entry = TraceEntry(self.name, dict(inputs), messages)
        run.trace.append(entry)
        entry.started = time.time()
        (completion,) = run.lm.generate([request])
        entry.seconds = time.time() - entry.started
        entry.reply = completion.text
        entry.token_ids = None if completion.token_ids is None else list(completion.token_ids)
        entry.forced = list(completion.forced)
        entry.finish_reason = completion.finish_reason
        entry.prompt_tokens, entry.completion_tokens = completion.prompt_tokens, completion.completion_tokens
        entry.cached = completion.cached
        fields = {f.name: f for f in self.signature.outputs}
        try:
            entry.outputs = parse_reply(self.signature, entry.reply)
            if self.rationale:
                check_reasoning(fields[self.rationale], entry.outputs[self.rationale])
        except ModelOutputError as exc:
            missing = exc.missing if isinstance(exc, ParseError) else ()
            if completion.finish_reason == "length" and missing:  # it was cut: say so, not "no field"
                exc = Truncated(limit, fields[missing[0]].label, entry.reply, inside=isinstance(exc, Invalid))
            elif missing == (self.rationale,):  # the answer came without a chain of thought
                exc = NoReasoning(f"reply has no {fields[self.rationale].label}: {entry.reply[:200]!r}")
            entry.error, entry.failure = f"{exc.kind}: {exc}", exc.kind
            raise exc from None
        return Prediction(entry.outputs)

    def get_state(self) -> dict[str, Any]:
        return {"instructions": self.signature.instructions, "demos": copy.deepcopy(self.demos)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.signature = self.signature.with_instructions(state.get("instructions", self.signature.instructions))
        self.demos = copy.deepcopy(list(state.get("demos", [])))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.signature}, demos={len(self.demos)})"


class ChainOfThought(Predict):
    """A Predict whose reply starts with a reasoning field before the outputs. The reasoning must be
    real in either decoding mode (`prompts.check_reasoning`): a reply without it, or with a placeholder,
    fails as "no reasoning", so no demo and no weight step learns an answer without its reasoning."""

    rationale = REASONING.name

    def __init__(self, signature: str | Signature, instructions: str = "", max_new_tokens: int | None = None):
        super().__init__(signature, instructions, max_new_tokens)
        self.signature = self.signature.prepend_output(REASONING)


class Program(Module):
    """Subclass and write `forward(self, run, **inputs) -> Prediction` in plain Python."""

    adapter: str | None = None

    def forward(self, run: Run, **inputs: Any) -> Prediction:
        raise NotImplementedError

    def execute(self, lm: LM, inputs: Mapping[str, Any], **settings: Any) -> Run:
        """Run the program once.

        Only what the model wrote may fail softly: a ModelOutputError (a reply that does not parse,
        or was cut at its token limit) is recorded on the Run with its kind. Anything else (the
        LM backend raising, a bug in `forward`) propagates and stops the caller.
        """
        for name, predictor in self.named_predictors():
            predictor.name = name
        run = Run(lm, adapter=self.adapter, **settings)
        try:
            run.prediction = self.forward(run, **inputs)
        except ModelOutputError as exc:
            run.error = f"{exc.kind}: {exc}"
            run.failure = exc.kind
            run.exception = exc
        return run

    # -- learnable state as plain data ----------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "adapter": self.adapter,
            "predictors": {name: p.get_state() for name, p in self.named_predictors()},
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        mine = dict(self.named_predictors())
        theirs = state.get("predictors", {})
        if set(mine) != set(theirs):
            raise UsageError(
                f"state does not fit this program: it has predictors {sorted(theirs)}, the program {sorted(mine)}"
            )
        for name, predictor in mine.items():
            predictor.set_state(theirs[name])
        self.adapter = state.get("adapter")

    def clone(self) -> "Program":
        """A copy whose learnable state can change without touching this one (tools like retrievers are shared)."""
        new = copy.copy(self)
        for name, value in vars(self).items():
            setattr(new, name, _clone_member(value))
        return new

    def with_state(self, state: Mapping[str, Any]) -> "Program":
        new = self.clone()
        new.set_state(state)
        return new

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state as JSON; an adapter inside the same folder tree is stored relative to the file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.get_state()
        if self.adapter:
            state["adapter"] = os.path.relpath(Path(self.adapter).resolve(), path.parent.resolve())
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(state, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    def load(self, path: str | os.PathLike) -> "Program":
        """A clone of this program with the state from `path` (a state file, or a folder holding
        program.json, as `tandem export` writes)."""
        if Path(path).is_dir():
            path = Path(path) / "program.json"
        state = load_state(path)
        return self.with_state(state)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"program state file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(state, dict) or "predictors" not in state:
        raise UsageError(f"{path} is not a tandem program state (no 'predictors' key)")
    if state.get("adapter"):
        state["adapter"] = str((path.parent / state["adapter"]).resolve())
        if not Path(state["adapter"]).is_dir():
            raise UsageError(f"{path} points at adapter folder {state['adapter']}, which does not exist")
    return state


def _clone_member(value: Any) -> Any:
    if isinstance(value, Program):
        return value.clone()
    if isinstance(value, Predict):
        return copy.deepcopy(value)
    if isinstance(value, list):
        return [_clone_member(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone_member(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone_member(v) for k, v in value.items()}
    return value


def trace_as_dict(entry: TraceEntry) -> dict[str, Any]:
    """A trace entry as people read it: the token ids an r step trains on are left out."""
    return {k: v for k, v in asdict(entry).items() if k not in ("token_ids", "forced", "finish_reason")}
