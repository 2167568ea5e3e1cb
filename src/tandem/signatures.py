"""Signatures: what a module reads and writes, declared as named fields plus instructions."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import UsageError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Field:
    name: str
    description: str = ""

    @property
    def label(self) -> str:
        """The marker the prompt uses for this field: `search_query` -> `Search Query`."""
        return " ".join(part.capitalize() for part in self.name.split("_"))


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

    @classmethod
    def parse(cls, text: str, instructions: str = "", descriptions: dict[str, str] | None = None) -> "Signature":
        """`"context, question -> answer"` with optional per-field descriptions."""
        if text.count("->") != 1:
            raise UsageError(f"signature {text!r} must look like 'in1, in2 -> out1'")
        descriptions = descriptions or {}
        left, right = (side.split(",") for side in text.split("->"))

        def fields(names: list[str]) -> tuple[Field, ...]:
            return tuple(Field(n.strip(), descriptions.get(n.strip(), "")) for n in names if n.strip())

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
        return f"{', '.join(self.input_names)} -> {', '.join(self.output_names)}"


def ensure_signature(spec: "str | Signature", instructions: str = "", descriptions: dict[str, str] | None = None) -> Signature:
    if isinstance(spec, Signature):
        return spec.with_instructions(instructions) if instructions else spec
    return Signature.parse(spec, instructions, descriptions)


REASONING = Field("reasoning", "Think step by step before giving the answer.")

__all__ = ["Field", "Signature", "ensure_signature", "REASONING"]
