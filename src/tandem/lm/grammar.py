"""The reply format as an EBNF grammar, in the dialect xgrammar reads (vLLM's structured outputs too).

    root ::= "Reasoning:" " "? v0 "\\n" "Species:" " "? v1
    v1   ::= "setosa" | "Setosa" | ...

Typed values are one line. Free text may run over several lines, but no line of it may begin
the way `prompts.parse_reply` recognizes a field (`Answer:`, `**answer**:`, `> Question:`, any
case, any label of the signature): a char-level automaton over the labels, written out as rules,
forbids exactly that. So a constrained reply has each field once, where the format puts it, and
a free field cannot end early at an input label's stop string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import FieldFormat, ReplyFormat

# Digits are bounded so that a model cannot loop on "1111..." until its token limit.
NUMBERS = {"int": '"-"? [0-9]{1,15}', "number": '"-"? [0-9]{1,15} ("." [0-9]{1,6})?'}
LINE_PREFIX = " \t>#*_"  # what parse_reply lets stand before a label at the start of a line
LABEL_SUFFIX = "*_ \t"  # ... and between the label and its colon


def literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def char_class(chars: str, negate: bool = False) -> str:
    escaped = "".join({"\n": "\\n", "\t": "\\t", "\\": "\\\\", "]": "\\]", "^": "\\^", "-": "\\-",
                       "[": "\\["}.get(c, c) for c in sorted(set(chars)))
    return f"[{'^' if negate else ''}{escaped}]"


def _cases(c: str) -> str:
    return "".join(dict.fromkeys(c.lower() + c.upper()))


def free_text_rules(labels: tuple[str, ...]) -> list[str]:
    """Rules `rest` (free text from mid-line on) and `ls` (after a newline) that never let a line
    begin with one of `labels` followed by a colon."""
    trie: list[dict] = [{"next": {}, "end": False}]
    for label in labels:
        node = 0
        for c in label.lower():
            if c not in trie[node]["next"]:
                trie.append({"next": {}, "end": False})
                trie[node]["next"][c] = len(trie) - 1
            node = trie[node]["next"][c]
        trie[node]["end"] = True

    def alternatives(node: int, stay: str) -> list[str]:
        out = ['""', '"\\n" ls']
        taken = "\n"
        for c, child in trie[node]["next"].items():
            out.append(f"{char_class(_cases(c))} t{child}")
            taken += _cases(c)
        if stay:
            out.append(f"{char_class(stay)} {'ls' if node == 0 else f't{node}'}")
            taken += stay
        if trie[node]["end"]:
            out.append(f"{char_class(LABEL_SUFFIX)} after")
            taken += LABEL_SUFFIX + ":"
        out.append(f"{char_class(taken, negate=True)} rest")
        return out

    rules = ['rest ::= [^\\n]* ("\\n" ls)?',
             f"ls ::= {' | '.join(alternatives(0, LINE_PREFIX))}",
             f'after ::= "" | {char_class(LABEL_SUFFIX)} after | "\\n" ls | {char_class(LABEL_SUFFIX + ":" + chr(10), True)} rest']
    rules += [f"t{n} ::= {' | '.join(alternatives(n, ''))}" for n in range(1, len(trie))]
    return rules


def value_rule(f: "FieldFormat") -> str:
    if f.type == "choice":
        variants = dict.fromkeys(v for c in f.choices for v in (c, c[:1].upper() + c[1:]))
        return " | ".join(literal(v) for v in variants)
    if f.type in NUMBERS:
        return NUMBERS[f.type]
    return "rest" if f.optional else "[^\\n \\t] rest"


def reply_grammar(fmt: "ReplyFormat", phase: int | None = None) -> str:
    """The whole reply; or, for `phase` i, only what one generation phase writes: field i's value
    (its label too when i is 0) and then the next field's label (engines that continue a reply
    field by field; see lm/vllm.py)."""
    parts, rules = [], []
    fields = list(enumerate(fmt.fields)) if phase is None else [(phase, fmt.fields[phase])]
    for i, f in fields:
        label = literal(f.label + ":") + " " if i == 0 or phase is None else ""
        parts.append(('"\\n" ' if i and phase is None else "") + f'{label}" "? v{i}')
        rules.append(f"v{i} ::= {value_rule(f)}")
    if phase is not None and phase + 1 < len(fmt.fields):
        parts.append(f'"\\n" {literal(fmt.fields[phase + 1].label + ":")}')
    if any(f.type == "text" for _, f in fields):
        rules += free_text_rules(fmt.line_labels or tuple(f.label for f in fmt.fields))
    return "\n".join([f"root ::= {' '.join(parts)}", *rules])
