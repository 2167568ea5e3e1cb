"""Signatures: what a module reads and writes, declared as named fields plus instructions.

An output field may say what it holds: free text (the default), an integer, a number, or one of
fixed choices. In the string shorthand the type follows the name after a colon:

    "question -> answer: int"
    "sepal_length, petal_length -> species: setosa|versicolor|virginica"
    "question -> reasoning: text, answer: number"

A typed field's value is checked and made canonical when a reply is parsed (`Field.check`), and
the engine can constrain decoding to it (`prompts.reply_format`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import UsageError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


TYPES = ("text", "int", "number", "choice")
_NUMBER = re.compile(r"[-+]?\$?\s*(\d[\d,]*(?:\.\d+)?|\.\d+)")
# What does not tell choices apart: case, spaces, sentence punctuation, quotes, brackets, markdown, and a
# hyphen or slash inside a word ("Iris-versicolor" reads "iris versicolor"). Other symbols do: A+, A-, C#, -1.
_CHOICE_BREAK = re.compile(r"""[\s.,;:!?"'`()\[\]{}<>*_]+|(?<=[^\W_])[-/](?=[^\W_])""")
_EMPHASIS = "*_` \t\n"


def _choice_words(text: str) -> tuple[str, ...]:
    """`text` as the words a choice is recognized by: "**Iris-Versicolor.**" -> ("iris", "versicolor")."""
    return tuple(w for w in _CHOICE_BREAK.split(text.lower()) if w)


class InvalidValue(ValueError):
    """A value that is not of its field's type (a word where an integer belongs, a choice not offered)."""


@dataclass(frozen=True)
class Field:
    name: str
    description: str = ""
    type: str = "text"  # text | int | number | choice
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.choices and self.type == "text":
            object.__setattr__(self, "type", "choice")
        object.__setattr__(self, "choices", tuple(str(c).strip() for c in self.choices))
        if self.type not in TYPES:
            raise UsageError(f"field {self.name!r}: unknown type {self.type!r}; write int, number, text or a|b|c")
        if (self.type == "choice") != bool(self.choices):
            raise UsageError(f"field {self.name!r}: choices go with type 'choice' and it needs them")
        if self.type == "choice" and (len(set(c.lower() for c in self.choices)) != len(self.choices)
                                      or not all(self.choices) or any("\n" in c for c in self.choices)):
            raise UsageError(f"field {self.name!r}: choices must be distinct, non-empty, one line each: {self.choices}")
        seen: dict[tuple[str, ...], str] = {}
        for c in self.choices:
            words = _choice_words(c)
            if words in seen:  # a reply naming one could not be told from the other
                raise UsageError(f"field {self.name!r}: choices {seen[words]!r} and {c!r} differ only in case or "
                                 "punctuation that replies do not keep; rename one")
            if words:
                seen[words] = c

    @property
    def label(self) -> str:
        """The marker the prompt uses for this field: `search_query` -> `Search Query`."""
        return " ".join(part.capitalize() for part in self.name.split("_"))

    @property
    def kind(self) -> str:
        """How the prompt describes the value: "", "an integer", "a number", "one of: a, b, c"."""
        return {"text": "", "int": "an integer", "number": "a number",
                "choice": "one of: " + ", ".join(self.choices)}[self.type]

    def check(self, value: str) -> str:
        """The canonical value of a parsed reply field, or InvalidValue.

        Choices: a value that is a choice, ignoring case, markdown emphasis and a final period, gives it
        ("**Setosa.**" -> "setosa", "A+" -> "A+"). Else a value that names exactly one choice among its
        words (`_choice_words`) gives it ("virginica, because ..." -> "virginica"; a choice found inside a
        longer one found there is part of it), one that names none or several is invalid.
        Numbers: currency signs and thousands commas are ignored; a value that starts with a number
        gives it, else the last number it holds ("The answer is 1,200." -> "1200").
        """
        if self.type == "text":
            return value
        if self.type == "choice":
            return self._choice(value)
        numbers = list(_NUMBER.finditer(value))
        if not numbers:
            raise InvalidValue(f"{self.label} {value[:60]!r} holds no number")
        first = numbers[0]
        found = first if not value[: first.start()].strip(" *_$") else numbers[-1]
        text = found.group(1).replace(",", "")
        sign = "-" if found.group(0).lstrip().startswith("-") else ""
        number = float(sign + text)
        if self.type == "int":
            if number != int(number):
                raise InvalidValue(f"{self.label} {value[:60]!r} is not an integer")
            return str(int(number))
        return str(int(number)) if number == int(number) else repr(number)

    def _choice(self, value: str) -> str:
        exact = {c.lower(): c for c in self.choices}
        bare = value.strip(_EMPHASIS)
        for form in (value.strip(), bare, bare[:-1].strip(_EMPHASIS) if bare.endswith(".") else ""):
            if form.lower() in exact:
                return exact[form.lower()]
        text = _choice_words(value)
        found = [(i, i + len(words), c) for c in self.choices if (words := _choice_words(c))
                 for i in range(len(text) - len(words) + 1) if text[i : i + len(words)] == words]
        named = {c for start, end, c in found
                 if not any(s <= start and end <= e and e - s > end - start for s, e, _ in found)}
        if len(named) == 1:
            return named.pop()
        raise InvalidValue(f"{self.label} {value[:60]!r} is not one of {'|'.join(self.choices)}")

    def spec(self) -> str:
        """The field in signature shorthand: `answer`, `answer: int`, `species: a|b|c`."""
        if self.type == "text":
            return self.name
        return f"{self.name}: {'|'.join(self.choices) if self.type == 'choice' else self.type}"

    @classmethod
    def parse(cls, text: str, description: str = "") -> "Field":
        """`name`, `name: int|number|text` or `name: a|b|c`."""
        name, colon, kind = (part.strip() for part in text.partition(":"))
        if not colon:
            return cls(name, description)
        if "|" in kind:
            return cls(name, description, "choice", tuple(c for c in kind.split("|")))
        if kind not in ("text", "int", "number"):
            raise UsageError(f"field {name!r}: unknown type {kind!r}; write int, number, text or a|b|c")
        return cls(name, description, kind)


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Field, ...]
    outputs: tuple[Field, ...]
    instructions: str = ""

    def __post_init__(self) -> None:
        names = [f.name for f in self.inputs + self.outputs]
        if not self.inputs or not self.outputs:
            raise UsageError("a signature needs at least one input and one output field")
        for name in names:
            if not _NAME.match(name):
                raise UsageError(f"field name {name!r} is not an identifier")
        if len(set(names)) != len(names):
            raise UsageError(f"duplicate field names in {names}")
        typed = [f.name for f in self.inputs if f.type != "text"]
        if typed:
            raise UsageError(f"types are for output fields; input {typed[0]!r} has one")

    @classmethod
    def parse(cls, text: str, instructions: str = "", descriptions: dict[str, str] | None = None) -> "Signature":
        """`"context, question -> answer"` with optional per-field descriptions."""
        if text.count("->") != 1:
            raise UsageError(f"signature {text!r} must look like 'in1, in2 -> out1'")
        descriptions = descriptions or {}
        left, right = (side.split(",") for side in text.split("->"))

        def fields(specs: list[str]) -> tuple[Field, ...]:
            parsed = [Field.parse(s) for s in specs if s.strip()]
            return tuple(replace(f, description=descriptions.get(f.name, "")) for f in parsed)

        sig = cls(fields(left), fields(right), instructions)
        unknown = set(descriptions) - {f.name for f in sig.fields}
        if unknown:
            raise UsageError(f"descriptions given for unknown fields: {sorted(unknown)}")
        return sig

    @property
    def fields(self) -> tuple[Field, ...]:
        return self.inputs + self.outputs

    @property
    def input_names(self) -> list[str]:
        return [f.name for f in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [f.name for f in self.outputs]

    def with_instructions(self, instructions: str) -> "Signature":
        return replace(self, instructions=instructions)

    def prepend_output(self, new: Field) -> "Signature":
        return replace(self, outputs=(new,) + self.outputs)

    def __str__(self) -> str:
        return f"{', '.join(self.input_names)} -> {', '.join(f.spec() for f in self.outputs)}"


def ensure_signature(spec: "str | Signature", instructions: str = "", descriptions: dict[str, str] | None = None) -> Signature:
    if isinstance(spec, Signature):
        return spec.with_instructions(instructions) if instructions else spec
    return Signature.parse(spec, instructions, descriptions)


REASONING = Field("reasoning", "Think step by step before giving the answer.")

__all__ = ["Field", "InvalidValue", "Signature", "ensure_signature", "REASONING", "TYPES"]
