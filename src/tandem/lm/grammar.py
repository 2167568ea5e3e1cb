"""The reply format (`ReplyFormat`: output fields, labels, types) and its EBNF grammar, in the dialect
xgrammar reads (vLLM's structured outputs too).

    root ::= "Reasoning:" " "? v0 "\\n" "Species:" " "? v1
    v1   ::= "setosa" | "Setosa" | ...

Typed values are one line. Free text may run over several lines, but no line of it may begin
the way `prompts.parse_reply` recognizes a field (`Answer:`, `**answer**:`, `> Question:`, any
case, any label of the signature): a deterministic char-level automaton over the labels, written
out as rules, forbids exactly that (the parser reads LINE_PREFIX and LABEL_SUFFIX from here). So a
constrained reply has each field once, where the format puts it, and a free field cannot end early
at an input label's stop string.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldFormat:
    """One output field of a constrained reply: its label, type and choices (see signatures.Field)."""

    label: str
    type: str = "text"  # text | int | number | choice
    choices: tuple[str, ...] = ()
    optional: bool = False  # free text that may be left empty (reasoning)


VALUE_TOKENS = {"int": 17, "number": 24}  # the most tokens a typed value can take (one digit a token, sign, dot)


@dataclass(frozen=True)
class ReplyFormat:
    """The shape a reply must have: `Label: value`, one per output field, in order.

    Engine-neutral: `grammar()` is an EBNF grammar that xgrammar reads, for the
    local engine and for vLLM's structured outputs alike, so every engine enforces the same format.
    Typed values are one line; a choice may be written as declared or capitalized. Free text may
    run over lines, none of which may begin with one of `line_labels` (the signature's labels,
    inputs too), so the reply parses back exactly as it was written.
    """

    fields: tuple[FieldFormat, ...]
    line_labels: tuple[str, ...] = ()

    def grammar(self, phase: int | None = None) -> str:
        """The grammar of the whole reply, or of one phase of it (`reply_grammar`)."""
        return reply_grammar(self, phase)


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


def _fold(c: str) -> str:
    return c.lower() if c.isascii() else c  # parse_reply ignores ASCII case only (re.ASCII)


def free_text_rules(labels: tuple[str, ...]) -> list[str]:
    """Rules `rest` (free text from mid-line on) and `ls` (after a newline) that never let a line
    begin the way `prompts.parse_reply` reads a field: LINE_PREFIX chars, one of `labels` in any
    case, LABEL_SUFFIX chars, then ':'.

    The start of a line is read by a deterministic automaton, built by subset construction over the
    states "in the prefix" (`p`), "at node n of the label trie" (n) and "after a whole label, in
    its suffix" (`s`): after "Answer " a line may be inside "Answer Type" and also one ':' away from
    "Answer:", and must remember both. Once no label can follow, the line runs free to its end.
    """
    trie: list[dict[str, int]] = [{}]
    ends: set[int] = set()
    for label in labels:
        node = 0
        for c in map(_fold, label):
            if c not in trie[node]:
                trie.append({})
                trie[node][c] = len(trie) - 1
            node = trie[node][c]
        ends.add(node)

    def closure(states: set) -> frozenset:
        if "p" in states:
            states.add(0)
        if ends & states:
            states.add("s")
        # A leaf of the trie can go nowhere: leaving it out merges "after Answer Type" with "in a suffix",
        # fewer rules for xgrammar to compile.
        return frozenset(q for q in states if not isinstance(q, int) or trie[q])

    def step(states: frozenset, c: str) -> frozenset:
        nxt = {trie[n][_fold(c)] for n in states if isinstance(n, int) and _fold(c) in trie[n]}
        nxt |= {q for q in ("p", "s") if q in states and c in (LINE_PREFIX if q == "p" else LABEL_SUFFIX)}
        return closure(nxt)

    alphabet = "".join(dict.fromkeys(LINE_PREFIX + LABEL_SUFFIX + "".join(
        c.lower() + c.upper() if c.isascii() else c for node in trie for c in node)))
    start = closure({"p"})
    names, rules = {start: "ls"}, ['rest ::= [^\\n]* ("\\n" ls)?']
    todo = [start]
    for states in todo:  # grows as new states are found
        taken = "\n" + (":" if "s" in states else "")  # ':' after a whole label would make it a field
        by_target: dict[frozenset, str] = {}
        for c in alphabet:
            target = step(states, c)
            if target and c not in taken:
                by_target[target] = by_target.get(target, "") + c
        alternatives = ['""', '"\\n" ls']
        for target, chars in by_target.items():
            if target not in names:
                names[target] = f"t{len(names)}"
                todo.append(target)
            alternatives.append(f"{char_class(chars)} {names[target]}")
            taken += chars
        alternatives.append(f"{char_class(taken, negate=True)} rest")
        rules.append(f"{names[states]} ::= {' | '.join(alternatives)}")
    return rules


def choice_variants(f: FieldFormat) -> list[str]:
    """How the grammar lets a choice be written: as declared, or with a capital first letter."""
    return list(dict.fromkeys(v for c in f.choices for v in (c, c[:1].upper() + c[1:])))


def value_rule(f: FieldFormat) -> str:
    if f.type == "choice":
        return " | ".join(literal(v) for v in choice_variants(f))
    if f.type in NUMBERS:
        return NUMBERS[f.type]
    return "rest" if f.optional else "[^\\n \\t] rest"


def reply_grammar(fmt: ReplyFormat, phase: int | None = None) -> str:
    """The whole reply; or, for `phase` i, only what one generation phase writes: field i's value
    and then the next field's label (engines that continue a reply field by field write the first
    label themselves; see `PhasedReply`)."""
    parts, rules = [], []
    fields = list(enumerate(fmt.fields)) if phase is None else [(phase, fmt.fields[phase])]
    for i, f in fields:
        label = literal(f.label + ":") + " " if phase is None else ""
        parts.append(('"\\n" ' if i and phase is None else "") + f'{label}" "? v{i}')
        rules.append(f"v{i} ::= {value_rule(f)}")
    if phase is not None and phase + 1 < len(fmt.fields):
        parts.append(f'"\\n" {literal(fmt.fields[phase + 1].label + ":")}')
    if any(f.type == "text" for _, f in fields):
        rules += free_text_rules(fmt.line_labels or tuple(f.label for f in fmt.fields))
    return "\n".join([f"root ::= {' '.join(parts)}", *rules])
