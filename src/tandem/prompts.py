"""The one place where a module's prompt is rendered and its reply parsed.

`render_messages` turns signature + demos + inputs into chat messages; `parse_reply` turns
the model's text back into output fields. Both are pure functions, so what the model sees is
exactly what `tandem show-prompt` prints.

The format is plain "Label: value" lines. Each complete demo is a user turn (its inputs) followed
by an assistant turn (its outputs), so a chat model sees demos as earlier turns of the conversation.
A demo without some output field (a labeled row has no reasoning) is shown in the system message as
a solved example instead: as a reply it would teach the model to leave that field out.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from .lm.grammar import LABEL_SUFFIX, LINE_PREFIX, FieldFormat, ReplyFormat, choice_variants
from .signatures import Field, InvalidValue, Signature

Message = dict[str, str]


class ModelOutputError(ValueError):
    """What the model wrote cannot be used. The only failure that fails one example softly:
    the evaluator counts it by `kind` and goes on; every other error stops the evaluation."""

    kind = "model output"


class ParseError(ModelOutputError):
    """The reply did not contain the fields the signature asks for; `missing` names them."""

    kind = "unparsed"

    def __init__(self, message: str, missing: Sequence[str] = ()):
        super().__init__(message)
        self.missing = tuple(missing)


class Truncated(ParseError):
    """The reply hit its token limit before writing a field; `kind` says which and at what limit."""

    def __init__(self, limit: int, field: str, reply: str, inside: bool = False):
        where = "in" if inside else "before"
        super().__init__(f"reply truncated at {limit} tokens {where} its {field} field: {reply[-120:]!r}", (field,))
        self.limit = limit
        self.field = field
        self.kind = f"truncated at {limit} tokens {where} {field}"


class NoReasoning(ModelOutputError):
    """A chain-of-thought reply without reasoning: none, a placeholder ("...", "<reasoning>", the
    field's description copied) or fewer than MIN_REASONING_WORDS words. Its answer was reached without
    a chain of thought, so there is nothing in it for a demo or a weight step to learn from; in either
    decoding mode it fails, counted as its own kind."""

    kind = "no reasoning"


class Invalid(ParseError):
    """A field is there, but its value is not of the field's type (not one of its choices, no number)."""

    kind = "invalid"


def _format_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(f"[{i}] {item}" for i, item in enumerate(value, 1)) or "(none)"
    return str(value).strip()


def _render_fields(fields: Sequence[Field], values: Mapping[str, object]) -> str:
    parts = []
    for f in fields:
        # An absent or empty field is left out: a demo or training target never shows "Reasoning: " with nothing.
        if values.get(f.name) not in (None, ""):
            value = _format_value(values[f.name])
            sep = "\n" if "\n" in value else " "
            parts.append(f"{f.label}:{sep}{value}")
    return "\n".join(parts)


FORMAT_HEADER = "Write these fields, in this order, each on a new line that starts with its label and a colon:"


def _describe(fields: Sequence[Field], outputs: bool = False) -> str:
    """One line a field. Output fields say what they hold without a fill-in line ("Reasoning: ..."),
    which small models copy as their reply."""
    def line(f: Field) -> str:
        kind = f.kind or ("free text" if outputs else "")
        return f"- {f.label}" + (f" ({kind})" if kind else "") + (f" - {f.description}" if f.description else "")

    return "\n".join(line(f) for f in fields)


def complete(signature: Signature, demo: Mapping[str, object]) -> bool:
    """Whether a demo has every output field, as a reply must: only such demos are shown as replies."""
    return all(demo.get(name) not in (None, "") for name in signature.output_names)


def system_message(signature: Signature, examples: Sequence[Mapping[str, object]] = ()) -> str:
    """Instructions, the fields, the reply format; then `examples`, demos that lack an output field
    (labeled rows have no reasoning), shown as solved examples rather than as replies, so the model
    is not taught to leave that field out."""
    lines = []
    if signature.instructions:
        lines += [signature.instructions.strip(), ""]
    lines += ["You are given:", _describe(signature.inputs), "", FORMAT_HEADER, _describe(signature.outputs, True)]
    if examples:
        lines += ["", "Examples:"]
        for example in examples:
            lines += ["", _render_fields(signature.inputs, example), _render_fields(signature.outputs, example)]
    return "\n".join(lines)


def render_messages(
    signature: Signature, demos: Sequence[Mapping[str, object]], inputs: Mapping[str, object],
    hint: Mapping[str, object] | None = None,
) -> list[Message]:
    """Chat messages for one call: system (instructions, format, incomplete demos), complete demos as
    turns, then the inputs.

    `hint` (output field -> its correct value) is for rationalization only: the last turn then
    tells the model the answer it must reach. Training prompts are rendered without it.
    """
    missing = [name for name in signature.input_names if name not in inputs]
    if missing:
        raise ValueError(f"missing inputs for signature '{signature}': {missing}")
    whole = [d for d in demos if complete(signature, d)]
    partial = [d for d in demos if not complete(signature, d)]
    messages: list[Message] = [{"role": "system", "content": system_message(signature, partial)}]
    for demo in whole:
        messages.append({"role": "user", "content": _render_fields(signature.inputs, demo)})
        messages.append({"role": "assistant", "content": render_reply(signature, demo)})
    last = _render_fields(signature.inputs, inputs)
    shown = {f.label: hint[f.name] for f in signature.outputs if hint and hint.get(f.name) not in (None, "")}
    if shown:
        answer = "; ".join(f"{label}: {_format_value(value)}" for label, value in shown.items())
        last += f"\n\nHint: the correct answer is {answer}. Explain the reasoning that leads to it."
    messages.append({"role": "user", "content": last})
    return messages


def render_reply(signature: Signature, outputs: Mapping[str, object]) -> str:
    """The assistant message for given outputs, as a demo shows it and as fine-tuning teaches it."""
    return _render_fields(signature.outputs, outputs)


def stop_strings(signature: Signature) -> tuple[str, ...]:
    """A reply that starts a new input field has begun inventing the next example: stop there."""
    return tuple(f"\n{f.label}:" for f in signature.inputs)


def _label_pattern(fields: Sequence[Field]) -> re.Pattern[str]:
    labels = "|".join(re.escape(f.label) for f in fields)
    # Tolerates markdown emphasis and any case: "**Answer:** 42", "answer: 42". What is a label line
    # must be exactly what the reply grammar keeps free text from writing (lm/grammar.py): the same
    # characters around the label, and ASCII case only (IGNORECASE alone also reads the Kelvin sign as a k).
    prefix, suffix = (f"[{re.escape(chars)}]*" for chars in (LINE_PREFIX, LABEL_SUFFIX))
    return re.compile(rf"^{prefix}({labels}){suffix}:[*_]*[ \t]*", re.IGNORECASE | re.MULTILINE | re.ASCII)


def parse_reply(signature: Signature, reply: str, optional: Sequence[str] = ()) -> dict[str, str]:
    """Read output fields from "Label: value" lines; raise ParseError if a required one is absent.

    Each field's value runs until the next known label. The first occurrence of a field after
    the previous one wins, so a model that repeats "Answer:" later does not overwrite it.
    """
    by_label = {f.label.lower(): f.name for f in signature.fields}
    matches = list(_label_pattern(signature.fields).finditer(reply))
    values: dict[str, str] = {}
    for i, m in enumerate(matches):
        name = by_label[m.group(1).lower()]
        if name not in signature.output_names or name in values:
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(reply)
        values[name] = reply[m.end() : end].strip()
    missing = [n for n in signature.output_names if n not in values and n not in optional]
    if missing:
        raise ParseError(f"reply has no {', '.join(missing)} field: {reply[:200]!r}", missing)
    empty = [n for n in signature.output_names if n in values and not values[n] and n not in optional]
    if empty:
        raise ParseError(f"reply has an empty {', '.join(empty)} field: {reply[:200]!r}", empty)
    out = {}
    for f in signature.outputs:
        try:
            out[f.name] = f.check(values[f.name]) if values.get(f.name) else values.get(f.name, "")
        except InvalidValue as exc:
            raise Invalid(str(exc), (f.name,)) from None
    return out


MIN_REASONING_WORDS = 5
_SLOT = re.compile(r"^[<\[{(](.*)[>\]})]$", re.DOTALL)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def check_reasoning(field: Field, text: str) -> None:
    """Raise NoReasoning unless `text` is reasoning: words of its own, at least MIN_REASONING_WORDS
    of them (counted as words, not tokens, so every tokenizer judges alike)."""
    words = _words(text)
    slot = _SLOT.match(text.strip())
    if not words or (slot and len(_words(slot.group(1))) <= 3) or words == _words(field.description):
        raise NoReasoning(f"{field.label} is a placeholder: {text[:80]!r}")
    if len(words) < MIN_REASONING_WORDS:
        raise NoReasoning(f"{field.label} has {len(words)} word(s), fewer than {MIN_REASONING_WORDS}: {text[:80]!r}")


def reply_format(signature: Signature, optional: Sequence[str] = ()) -> ReplyFormat:
    """What a constrained engine must make the reply: every output field, in order, typed values one
    line each from their set. Free text stays free (empty where the parser allows it), except that
    none of its lines may begin with a label of the signature, which `parse_reply` would read as a field."""
    fields = tuple(FieldFormat(f.label, f.type, f.choices, f.name in optional) for f in signature.outputs)
    return ReplyFormat(fields, tuple(f.label for f in signature.fields))


def placeholder_reply(messages: Sequence[Message], fmt: ReplyFormat | None = None) -> str:
    """A reply with every output field filled by a placeholder, for showing prompts without a model.
    Given the request's reply format, typed fields get a value of their type (the first choice, 0)."""
    if fmt is not None:
        def value(f: FieldFormat) -> str:
            return f.choices[0] if f.type == "choice" else "0" if f.type in ("int", "number") else \
                f"<{f.label.lower()}, as the model writes it>"
        return "\n".join(f"{f.label}: {value(f)}" for f in fmt.fields)
    fmt_text = messages[0]["content"].split(FORMAT_HEADER, 1)[-1].split("\n\n", 1)[0]
    labels = [re.split(r" \(| - ", line[2:], maxsplit=1)[0] for line in fmt_text.splitlines() if line.startswith("- ")]
    return "\n".join(f"{label}: <{label.lower()}, as the model writes it>" for label in labels)


def forced_spans(signature: Signature, reply: str) -> tuple[tuple[int, int], ...]:
    """Where a constrained engine, not the model, wrote `reply`: (start, end) character spans.

    Under the reply grammar (lm/grammar.py) each output field's label is fixed text, and a choice
    is the model's only up to the first characters that tell it from the other choices ("s" of
    "setosa" among setosa | versicolor | virginica); the rest of it is forced. Free text, numbers
    and the line breaks that end a field are the model's.
    """
    fmt = {f.label.lower(): f for f in reply_format(signature).fields}
    matches = list(_label_pattern(signature.outputs).finditer(reply))
    spans = []
    for i, m in enumerate(matches):
        spans.append((m.start(), m.end()))
        f = fmt[m.group(1).lower()]
        if f.type != "choice":
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(reply)
        value = reply[m.end():end].rstrip()
        variants = choice_variants(f)
        written = max((v for v in variants if value.startswith(v)), key=len, default=None)
        if written is None:
            continue
        chosen = next(k for k in range(1, len(written) + 1)
                      if not any(v != written and v.startswith(written[:k]) for v in variants)
                      or k == len(written))
        if chosen < len(written):
            spans.append((m.end() + chosen, m.end() + len(written)))
    return tuple(spans)
