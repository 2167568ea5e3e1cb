"""Typed output fields, and constrained decoding on the real transformers engine (tiny random model)."""

import pytest

from tandem.lm import Request
from tandem.lm.local import LocalLM
from tandem.program import ChainOfThought, Predict, Program
from tandem.prompts import Invalid, ParseError, _label_pattern, parse_reply, reply_format, system_message
from tandem.signatures import Field, Signature

IRIS = "petal_length, petal_width -> species: setosa|versicolor|virginica"


def test_shorthand_declares_types_and_round_trips():
    sig = Signature.parse("question -> reasoning: text, answer: int, species: a b|c")
    assert [(f.name, f.type, f.choices) for f in sig.outputs] == [
        ("reasoning", "text", ()), ("answer", "int", ()), ("species", "choice", ("a b", "c"))]
    assert str(sig) == "question -> reasoning, answer: int, species: a b|c"
    assert Signature.parse(str(sig)) == sig
    assert Field("y", choices=("x", "z")).type == "choice"  # the Python spelling


@pytest.mark.parametrize("bad, message", [
    ("q -> answer: float", "unknown type 'float'"),
    ("q: int -> answer", "types are for output fields"),
    ("q -> label: a|A", "distinct"),
    ("q -> label: a|", "non-empty"),
])
def test_bad_types_are_refused_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        Signature.parse(bad)


@pytest.mark.parametrize("value, expected", [
    ("setosa", "setosa"), ("**Virginica.**", "virginica"), ("Iris-versicolor", "versicolor"),
    ("virginica, because the petals are long", "virginica"),  # trailing text after the choice
    ("It is most likely versicolor.", "versicolor"),  # exactly one choice named
])
def test_choice_values_are_made_canonical(value, expected):
    assert parse_reply(Signature.parse(IRIS), f"Species: {value}")["species"] == expected


@pytest.mark.parametrize("value", ["rose", "setosa or virginica", ""])
def test_a_value_outside_the_choices_is_its_own_failure_kind(value):
    with pytest.raises(ParseError) as info:
        parse_reply(Signature.parse(IRIS), f"Species: {value}")
    assert info.value.kind == ("unparsed" if not value else "invalid")


@pytest.mark.parametrize("kind, value, expected", [
    ("int", "42", "42"), ("int", "$1,200", "1200"), ("int", "18 eggs, 2 left", "18"),
    ("int", "The answer is 7.", "7"), ("int", "-3", "-3"), ("int", "4.0", "4"),
    ("number", "2.50 dollars", "2.5"), ("number", "about 1,000,000", "1000000"),
])
def test_numbers(kind, value, expected):
    assert parse_reply(Signature.parse(f"q -> answer: {kind}"), f"Answer: {value}")["answer"] == expected


@pytest.mark.parametrize("kind, value", [("int", "4.5"), ("int", "none"), ("number", "many")])
def test_not_a_number_is_invalid(kind, value):
    with pytest.raises(Invalid, match="Answer"):
        parse_reply(Signature.parse(f"q -> answer: {kind}"), f"Answer: {value}")


def test_the_prompt_says_the_type():
    text = system_message(Signature.parse("q -> answer: int, species: a|b"))
    assert "- Answer (an integer)" in text and "- Species (one of: a, b)" in text


@pytest.mark.parametrize("text, ok", [
    ("one line", True), ("first\nsecond line\n\n- a list item", True),
    ("so\nAnswer: 4", False), ("so\n**answer**: 4", False), ("so\n> QUESTION :", False),
    ("so\nAnswers: many", True), ("so\nThe answer: 4", True), ("so\nAnswer", True),
])
def test_free_text_lines_may_not_begin_like_a_field(text, ok, embedded_model_dir):
    """The grammar itself, run by xgrammar: what parse_reply would read as a field is refused."""
    import xgrammar
    from transformers import AutoTokenizer

    info = xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(embedded_model_dir))
    grammar = reply_format(ChainOfThought("question -> answer: int").signature).grammar()
    matcher = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(info).compile_grammar(grammar))
    assert matcher.accept_string(f"Reasoning: {text}\nAnswer: 4") == ok


def test_grammar_has_every_field_in_order():
    grammar = reply_format(ChainOfThought(IRIS).signature).grammar()
    assert grammar.splitlines()[0] == 'root ::= "Reasoning:" " "? v0 "\\n" "Species:" " "? v1'
    assert '"setosa" | "Setosa"' in grammar


# -- constrained decoding on the real engine --------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    engine = LocalLM(tiny_model_dir, dtype="float32", max_batch=8, max_wait=0.05)
    yield engine
    engine.close()


PROBLEMS = [{"petal_length": 1.4 + i / 10, "petal_width": 0.2 * i} for i in range(6)]


@pytest.mark.parametrize("limit", [12, 24, 200])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_constrained_reply_parses_with_a_declared_value(lm, limit, temperature):
    """A random model writes noise; constrained, every reply still has every field and a valid species,
    even when the token limit leaves little room for the reasoning."""
    module = ChainOfThought(IRIS)
    requests = [Request(tuple(module.messages(p)), max_new_tokens=limit, temperature=temperature, seed=i,
                        format=reply_format(module.signature)) for i, p in enumerate(PROBLEMS)]
    for completion in lm.generate(requests):
        assert completion.completion_tokens <= limit
        parsed = parse_reply(module.signature, completion.text)
        assert parsed["species"] in ("setosa", "versicolor", "virginica"), completion.text
        labels = _label_pattern(module.signature.fields).findall(completion.text)
        assert labels == ["Reasoning", "Species"], completion.text  # each field once; no line of text looks like one


def test_numbers_and_several_free_fields_reach_the_last_field(lm):
    module = Predict("question -> search_query, note, answer: number")
    requests = [Request(tuple(module.messages({"question": f"q{i}"})), max_new_tokens=90, seed=i,
                        format=reply_format(module.signature, optional=())) for i in range(4)]
    for completion in lm.generate(requests):
        parsed = parse_reply(module.signature, completion.text, optional=())
        float(parsed["answer"])
        assert all(parsed[name] for name in ("search_query", "note"))


def test_unconstrained_requests_in_the_same_batch_are_left_free(lm):
    module = Predict(IRIS)
    free = Request(tuple(module.messages(PROBLEMS[0])), max_new_tokens=16)
    bound = Request(tuple(module.messages(PROBLEMS[0])), max_new_tokens=16, format=reply_format(module.signature))
    alone = lm.generate([free])[0]
    together = lm.generate([free, bound])
    assert together[0].text == alone.text  # the mask touched only its own row
    assert not together[0].text.startswith("Species:")  # the random model does not write the format by itself
    assert together[1].text.startswith("Species:")
    assert free.key("m") == Request(free.messages, max_new_tokens=16).key("m") != bound.key("m")


def test_a_limit_too_small_for_the_format_is_reported_as_truncated(lm):
    """6 tokens cannot hold "Reasoning:", the break and a species: the run fails as cut, not as invalid."""
    program = _Iris()
    run = program.execute(lm, PROBLEMS[0], max_new_tokens=6, constrained=True)
    assert run.failure is not None and run.failure.startswith("truncated at 6 tokens")


class _Iris(Program):
    def __init__(self):
        self.classify = ChainOfThought(IRIS)

    def forward(self, run, **inputs):
        return self.classify(run, **inputs)
