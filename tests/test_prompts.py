import pytest

from tandem.prompts import ParseError, parse_reply, placeholder_reply, render_messages, stop_strings
from tandem.signatures import REASONING, Signature


def cot(text: str) -> Signature:
    return Signature.parse(text, "Do the thing.").prepend_output(REASONING)


def test_signature_shorthand_and_labels():
    sig = Signature.parse("context, question -> search_query", descriptions={"question": "what is asked"})
    assert sig.input_names == ["context", "question"]
    assert sig.output_names == ["search_query"]
    assert sig.outputs[0].label == "Search Query"
    assert sig.inputs[1].description == "what is asked"
    assert str(sig) == "context, question -> search_query"


@pytest.mark.parametrize("bad", ["question answer", "a -> b -> c", "-> answer", "question ->", "a, a -> b", "a b -> c"])
def test_signature_rejects_malformed(bad):
    with pytest.raises(ValueError):
        Signature.parse(bad)


def test_signature_rejects_descriptions_of_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields"):
        Signature.parse("q -> a", descriptions={"answr": "typo"})


def test_render_puts_instructions_format_demos_and_inputs_in_order():
    sig = cot("question -> answer")
    demos = [{"question": "1+1?", "reasoning": "One and one.", "answer": "2"}, {"question": "2+2?", "answer": "4"}]
    messages = render_messages(sig, demos, {"question": "3+3?"})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("Do the thing.")
    # The format describes each field; no fill-in line ("Reasoning: ...") for a small model to copy.
    assert "- Reasoning (free text) - " in system and "- Answer (free text)" in system and ": ..." not in system
    # A labeled demo without reasoning is a solved example in the system message, never a reply without it.
    assert system.endswith("Examples:\n\nQuestion: 2+2?\nAnswer: 4")
    assert messages[1]["content"] == "Question: 1+1?"
    assert messages[2]["content"] == "Reasoning: One and one.\nAnswer: 2"
    assert messages[-1]["content"] == "Question: 3+3?"


def test_render_lists_passages_numbered_and_refuses_missing_inputs():
    sig = Signature.parse("context, question -> answer")
    user = render_messages(sig, [], {"context": ["A | a", "B | b"], "question": "q"})[-1]["content"]
    assert user == "Context:\n[1] A | a\n[2] B | b\nQuestion: q"
    with pytest.raises(ValueError, match="missing inputs"):
        render_messages(sig, [], {"question": "q"})


def test_parse_reads_fields_in_any_case_and_markdown():
    sig = cot("question -> answer")
    reply = "**Reasoning:** two steps\nthen more\n\nANSWER: 42\n"
    assert parse_reply(sig, reply) == {"reasoning": "two steps\nthen more", "answer": "42"}


def test_parse_keeps_the_first_answer_and_ignores_echoed_inputs():
    sig = cot("question -> answer")
    reply = "Reasoning: r\nAnswer: 7\nQuestion: invented\nAnswer: 8"
    assert parse_reply(sig, reply)["answer"] == "7"


def test_parse_needs_every_field_unless_told_a_field_is_optional():
    sig = cot("question -> answer")
    with pytest.raises(ParseError, match="no reasoning") as missing:
        parse_reply(sig, "Answer: yes")
    assert missing.value.missing == ("reasoning",)
    assert parse_reply(sig, "Answer: yes", optional=("reasoning",)) == {"reasoning": "", "answer": "yes"}
    with pytest.raises(ParseError, match="no answer"):
        parse_reply(sig, "Reasoning: I think so, the answer is 4")
    with pytest.raises(ParseError, match="empty answer"):
        parse_reply(sig, "Reasoning: hmm\nAnswer:   ")
    with pytest.raises(ParseError):
        parse_reply(sig, "")


def test_stop_strings_are_the_input_labels_on_a_new_line():
    assert stop_strings(Signature.parse("context, question -> answer")) == ("\nContext:", "\nQuestion:")


def test_placeholder_reply_parses_back():
    sig = cot("context, question -> search_query")
    reply = placeholder_reply(render_messages(sig, [], {"context": [], "question": "q"}))
    assert set(parse_reply(sig, reply)) == {"reasoning", "search_query"}


def test_empty_fields_are_left_out_of_demos_and_replies():
    from tandem.prompts import render_reply

    sig = cot("question -> answer")
    assert render_reply(sig, {"reasoning": "", "answer": "4"}) == "Answer: 4"
    messages = render_messages(sig, [{"question": "q", "reasoning": "", "answer": "4"}], {"question": "x"})
    assert len(messages) == 2 and messages[0]["content"].endswith("Examples:\n\nQuestion: q\nAnswer: 4")
