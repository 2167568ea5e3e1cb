"""The reply grammar and the reply parser agree: what constrained decoding can write parses back to
exactly the fields the grammar put there; and choices that differ only by punctuation stay apart.

Acceptance is checked by xgrammar itself, character by character (a matcher over an empty vocabulary
takes strings), so no model or tokenizer is needed.
"""

import random

import pytest
import xgrammar

from tandem.errors import UsageError
from tandem.lm.grammar import LABEL_SUFFIX, LINE_PREFIX
from tandem.program import ChainOfThought
from tandem.prompts import Invalid, _label_pattern, parse_reply, reply_format
from tandem.signatures import REASONING, Field, Signature


def acceptor(grammar: str):
    """A function telling whether `grammar` accepts a whole string."""
    compiled = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([]), cache_enabled=False).compile_grammar(grammar)
    matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)

    def accepts(text: str) -> bool:
        matcher.reset()
        return matcher.accept_string(text) and matcher.is_terminated()

    return accepts


ISSUE_REPLY = "Reasoning: first guess\nAnswer : Paris\nbut actually it is London\nAnswer: London\nAnswer Type: city"


def test_a_label_that_another_label_continues_cannot_start_a_line_of_free_text():
    """Issue 15: after "Answer " the grammar forgot that the line already was a label plus a space."""
    sig = ChainOfThought("question -> answer, answer_type").signature
    accepts = acceptor(reply_format(sig).grammar())
    assert not accepts(ISSUE_REPLY)
    for line in ("Answer :", "answer _ :", "**Answer Type** :", "> Question\t:"):
        assert not accepts(f"Reasoning: so\n{line} x\nAnswer: London\nAnswer Type: city"), line
    fine = "Reasoning: so\nAnswer Types: many\nAnswer Ty: x\n**Answer**\nAnswer Type Code: 3\nAnswer: London\nAnswer Type: city"
    assert accepts(fine)
    assert parse_reply(sig, fine)["answer"] == "London"


# -- property: over random signatures whose labels share prefixes -------------------------------------

NAMES = ["answer", "answer_type", "answer_type_code", "question", "question_id", "reason", "context", "a", "an"]
OTHER_LABELS = ["Answers", "Answer Ty", "Questions", "Reasoning Step", "Answer Code", "Contexts", "An A"]
LOOKALIKES = {"k": "\u212a", "s": "\u017f", "i": "\u0131"}  # Unicode folds them into ASCII letters; the parser must not
WORDS = ["so", "the", "x", "Paris", ":", "**", "12", "not", "is", "--", "Type", "Id"]


def random_signature(rng: random.Random) -> Signature:
    names = rng.sample(NAMES, rng.randint(2, 6))
    cut = rng.randint(1, len(names) - 1)
    outputs = [Field(n) for n in names[cut:]]
    if rng.random() < 0.3:  # a typed last field: its value line is fixed, the text before it is not
        outputs[-1] = Field(outputs[-1].name, type="int") if rng.random() < 0.5 else \
            Field(outputs[-1].name, choices=("A+", "A", "b-c"))
    if rng.random() < 0.5:
        outputs.insert(0, REASONING)
    return Signature(tuple(Field(n) for n in names[:cut]), tuple(outputs))


def near_label_line(rng: random.Random, labels: list[str]) -> str:
    label = rng.choice(labels + OTHER_LABELS)
    if rng.random() < 0.2:
        label = label[: rng.randint(1, len(label))]
    label = "".join(c.upper() if rng.random() < 0.3 else c.lower() if rng.random() < 0.3 else c for c in label)
    if rng.random() < 0.1:
        label = "".join(LOOKALIKES.get(c, c) for c in label)
    prefix = "".join(rng.choice(LINE_PREFIX) for _ in range(rng.choice([0, 0, 1, 2, 3])))
    suffix = "".join(rng.choice(LABEL_SUFFIX) for _ in range(rng.choice([0, 0, 1, 2, 3])))
    colon = ":" if rng.random() < 0.6 else rng.choice(["", " ", "-", ";"])
    return prefix + label + suffix + colon + rng.choice(["", " x", " Paris", ":", " Answer: 4"])


def free_text(rng: random.Random, labels: list[str]) -> str:
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(1, 4)))]  # the first line follows "Label: " on its line
    if rng.random() < 0.3:
        lines[0] = near_label_line(rng, labels).lstrip(" \t") or "x"
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        lines.append(near_label_line(rng, labels) if rng.random() < 0.7 else rng.choice(["", " ".join(WORDS[:3])]))
    return "\n".join(lines)


def value(rng: random.Random, f: Field, labels: list[str]) -> str:
    if f.type == "int":
        return str(rng.randint(-50, 5000))
    if f.type == "choice":
        choice = rng.choice(f.choices)
        return rng.choice([choice, choice[:1].upper() + choice[1:]])  # as the grammar lets it be written
    if f.name == "reasoning" and rng.random() < 0.2:
        return ""  # optional here (reply_format's `optional`): the grammar lets it be empty
    return free_text(rng, labels)


def test_every_reply_the_grammar_accepts_parses_back_to_its_fields():
    """A seeded generator (many cases, reproducible, no extra dependency): for random signatures and random
    free text full of near-label lines, the grammar accepts a reply exactly when no line of its free text
    reads as a label to parse_reply, and then parse_reply gives back each field as written. The phase
    grammars (a field at a time, for vLLM) accept exactly the same pieces."""
    rng = random.Random(15)
    accepted = rejected = 0
    for _ in range(150):
        sig = random_signature(rng)
        fmt = reply_format(sig, optional=("reasoning",))
        labels = [f.label for f in sig.fields]
        pattern = _label_pattern(sig.fields)
        whole = acceptor(fmt.grammar())
        phases = [acceptor(fmt.grammar(phase=i)) for i in range(len(sig.outputs))]
        for _ in range(25):
            values = [value(rng, f, labels) for f in sig.outputs]
            reply = "\n".join(f"{f.label}: {v}" for f, v in zip(sig.outputs, values))
            clean = [not any(pattern.match(line) for line in v.split("\n")[1:]) for v in values]
            assert whole(reply) == all(clean), (str(sig), reply)
            for i, (f, v) in enumerate(zip(sig.outputs, values)):
                piece = f" {v}"  # the first label is written for the model (PhasedReply)
                piece += f"\n{sig.outputs[i + 1].label}:" if i + 1 < len(sig.outputs) else ""
                assert phases[i](piece) == clean[i], (str(sig), i, piece)
            if all(clean):
                accepted += 1
                expected = {f.name: f.check(v) if f.type != "text" else v.strip() for f, v in zip(sig.outputs, values)}
                assert parse_reply(sig, reply, optional=("reasoning",)) == expected, (str(sig), reply)
            else:
                rejected += 1
    assert accepted > 800 and rejected > 800  # both sides of the property were exercised


# -- choices that differ only by punctuation ---------------------------------------------------------


@pytest.mark.parametrize("choices", [("A+", "A", "A-", "B"), ("C", "C++", "C#"), ("-1", "0", "1", "+1"),
                                     ("setosa", "versicolor", "virginica")])
def test_every_choice_parses_back_as_itself(choices):
    sig = Signature.parse(f"q -> grade: {'|'.join(choices)}")
    accepts = acceptor(reply_format(sig).grammar())
    for c in choices:
        for written in (c, c[:1].upper() + c[1:], c.lower(), f"**{c}**", f"{c}.", f"The grade is {c}.", f"`{c}`"):
            assert parse_reply(sig, f"Grade: {written}")["grade"] == c, written
        for variant in (c, c[:1].upper() + c[1:]):  # what the grammar lets a model write
            assert accepts(f"Grade: {variant}") and parse_reply(sig, f"Grade: {variant}")["grade"] == c


@pytest.mark.parametrize("written", ["A or A+", "A+, maybe A-", "C"])
def test_a_value_naming_several_or_no_grades_is_invalid(written):
    with pytest.raises(Invalid):
        parse_reply(Signature.parse("q -> grade: A+|A|A-|B"), f"Grade: {written}\n")


@pytest.mark.parametrize("spec", ["grade: A|a.", "lang: c-sharp|C sharp", "label: not_entailment|Not Entailment",
                                  "grade: (A)|A|B"])
def test_choices_a_reply_cannot_tell_apart_are_refused_by_field(spec):
    with pytest.raises(UsageError, match=f"field '{spec.split(':')[0]}'"):
        Signature.parse(f"q -> {spec}")


@pytest.mark.parametrize("written, expected", [
    ("**Virginica.**", "virginica"), ("Iris-versicolor", "versicolor"), ("It is most likely versicolor.", "versicolor"),
    ("virginica, because the petals are long", "virginica"),
])
def test_word_choices_still_read_loosely(written, expected):
    sig = Signature.parse("q -> species: setosa|versicolor|virginica")
    assert parse_reply(sig, f"Species: {written}")["species"] == expected


@pytest.mark.parametrize("written", ["setosa or virginica", "rose"])
def test_word_choices_naming_several_or_none_are_invalid(written):
    with pytest.raises(Invalid):
        parse_reply(Signature.parse("q -> species: setosa|versicolor|virginica"), f"Species: {written}")


def test_a_longer_choice_found_wins_over_one_inside_it():
    sig = Signature.parse("q -> label: entailment|not_entailment")
    assert parse_reply(sig, "Label: It is not entailment.")["label"] == "not_entailment"
    assert parse_reply(sig, "Label: entailment, clearly")["label"] == "entailment"
