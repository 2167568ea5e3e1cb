"""Constrained decoding on the tokenizers users bring: SentencePiece (Llama-2, Mistral) and byte-level BPE
(Llama-3), on tandem's engine; and field-at-a-time replies priced within their limit."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tandem.lm import Request
from tandem.lm.constrained import Budget, PhasedReply
from tandem.lm.local import LocalLM
from tandem.program import ChainOfThought, Predict
from tandem.prompts import parse_reply, reply_format

IRIS = ChainOfThought("petal_length, petal_width -> species: setosa|versicolor|virginica")
TWO = ChainOfThought("question -> answer: int, answer_type: city|person|number")
FREE_THEN_TYPED = Predict("question -> answer, answer_type: city|person")


def requests(module, limit: int, n: int = 6) -> list[Request]:
    inputs = [{"petal_length": 1.0 + i, "petal_width": 0.3 * i} if "petal_length" in module.signature.input_names
              else {"question": f"What is {i} and {i + 1}?"} for i in range(n)]
    return [Request(tuple(module.messages(x)), max_new_tokens=limit, temperature=1.0, seed=i,
                    format=reply_format(module.signature)) for i, x in enumerate(inputs)]


def test_sentencepiece_text_is_forced_without_the_space_its_decoder_hides(sentencepiece_model_dir):
    """"Species:" encodes as ["▁Species", ":"], which decodes to "Species:" but adds " Species:" to a
    reply: the grammar rejects it. Tokens for forced text must add exactly the text."""
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_model_dir)
    plain = tokenizer("Species:", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(plain)[0].startswith("▁")  # the trap is really there
    budget = Budget(tokenizer)
    for text in ("Species:", "\nSpecies:", "\nAnswer Type:", "setosa", " virginica", "icolor"):
        ids = budget.tokens(text)
        assert ids and budget.spell(ids) == text.encode(), text


def test_bytelevel_vocabulary_has_tokens_spanning_a_colon_and_a_letter(bytelevel_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(bytelevel_model_dir)
    pieces = Budget(tokenizer).pieces
    assert any(p.startswith(b":") and p[1:2].isalpha() for p in pieces)


def test_a_label_ending_inside_a_token_moves_the_engine_to_the_next_field(bytelevel_model_dir):
    """"\\nSpecies" then ":setosa" (one token): the label has arrived though no token ends with it."""
    from tandem.lm.constrained import Constraints

    tokenizer = AutoTokenizer.from_pretrained(bytelevel_model_dir)
    constraints = Constraints(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    row = constraints.row(reply_format(IRIS.signature), 64)
    spanning = constraints.budget.pieces.index(b":setosa")
    for token in [*constraints.tokens("Reasoning:"), *constraints.tokens(" small petals"),
                  *constraints.tokens("\nSpecies"), spanning]:
        row.accept(token)
    assert row.field == 1


def smallest_limit(budget: Budget, module) -> int:
    return budget.smallest(reply_format(module.signature))


@pytest.mark.parametrize("model", ["sentencepiece_model_dir", "bytelevel_model_dir"])
def test_constrained_replies_parse_on_every_tokenizer(request, model):
    """Sampled replies of a random model, at the smallest limit the format fits and a roomier one:
    every field there, typed values in their sets, no engine error."""
    lm = LocalLM(request.getfixturevalue(model), dtype="float32", max_batch=8)
    try:
        for module in (IRIS, TWO, FREE_THEN_TYPED):
            fits = smallest_limit(lm._constraints().budget, module)
            for limit in (fits, fits + 40):
                for completion in lm.generate(requests(module, limit)):
                    parsed = parse_reply(module.signature, completion.text)
                    assert completion.completion_tokens <= limit
                    for f in module.signature.outputs:
                        if f.type == "choice":
                            assert parsed[f.name] in f.choices
    finally:
        lm.close()


# -- field-at-a-time replies (vLLM, servers), priced with PhasedReply ----------------------------------


def run_phases(reply: PhasedReply, budget: Budget, write) -> None:
    """Drive `reply` as an engine does, with `write(max_tokens, grammar_phase)` standing in for the model."""
    while reply.next_phase():
        text, tokens, finish = write(reply, reply.max_tokens())
        reply.take(text, tokens, finish)


def greedy_worst_case(budget: Budget):
    """A model that spends every token it may: free text to the limit, choices one letter a token,
    numbers to their longest; it writes the next label itself when it has room, else is cut."""
    def write(reply: PhasedReply, room: int):
        fmt = reply.request.format
        f = fmt.fields[reply.field]
        head = " "  # the first label is written for the model
        value = max(f.choices, key=len) if f.type == "choice" else "1" * 15 if f.type in ("int", "number") else ""
        pieces = [head, *value] if f.type != "text" else [head] + ["word "] * 10_000
        if reply.field + 1 < len(fmt.fields):
            pieces.append(f"\n{fmt.fields[reply.field + 1].label}:")
        text, used = "", 0
        for piece in pieces:
            cost = len(budget.tokens(piece)) or 1
            if used + cost > room:
                return text, used, "length"
            text, used = text + piece, used + cost
        return text, used, "stop"
    return write


@pytest.mark.parametrize("limit", [12, 24, 40, 96])
@pytest.mark.parametrize("module", [IRIS, TWO, FREE_THEN_TYPED], ids=["iris", "int-choice", "free-choice"])
def test_phases_stay_within_the_limit_and_later_fields_keep_their_share(tiny_model_dir, module, limit):
    budget = Budget(AutoTokenizer.from_pretrained(tiny_model_dir), jump_forward=False)
    fmt = reply_format(module.signature)
    reply = PhasedReply(Request(({"role": "user", "content": "x"},), max_new_tokens=limit, format=fmt), budget)
    run_phases(reply, budget, greedy_worst_case(budget))
    assert reply.used <= limit
    if limit >= smallest_limit(budget, module):  # the worst case fits: it must parse
        parse_reply(module.signature, reply.text)
        assert reply.finish == "stop"


def test_a_typed_phase_cut_while_writing_its_break_is_recovered(tiny_model_dir):
    budget = Budget(AutoTokenizer.from_pretrained(tiny_model_dir), jump_forward=False)
    fmt = reply_format(TWO.signature)
    reply = PhasedReply(Request(({"role": "user", "content": "x"},), max_new_tokens=80, format=fmt), budget)
    assert reply.text == "Reasoning:"  # written for the model
    reply.take(" adding them\nAnswer:", 6, "stop")
    assert reply.field == 1
    reply.take(" 7\nAnswer T", 5, "length")  # out of room mid-label: the value is whole, the break is written for it
    assert reply.field == 2 and reply.text.endswith(" 7\nAnswer Type:") and reply.used <= 80
    reply.take(" number", 1, "stop")
    assert parse_reply(TWO.signature, reply.text) == {"reasoning": "adding them", "answer": "7", "answer_type": "number"}
