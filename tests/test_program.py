import json

import pytest

from tandem.errors import UsageError

from tandem import ChainOfThought, Example, Predict, Program, ScriptedLM
from tandem.program import load_state
from tandem.prompts import FORMAT_HEADER


class TwoStep(Program):
    def __init__(self):
        self.hops = [ChainOfThought("question -> query") for _ in range(2)]
        self.answer = Predict("question, query -> answer", "Answer briefly.")
        self.tool = object()  # not state: shared by clones

    def forward(self, run, question):
        query = ""
        for hop in self.hops:
            query = hop(run, question=question).query
        return self.answer(run, question=question, query=query)


def reply(request):
    system = request.messages[0]["content"]
    return "Reasoning: I work it out step by step.\nQuery: q1" if "- Query" in system.split(FORMAT_HEADER)[1] else "Answer: a1"


def test_named_predictors_walks_lists_like_named_parameters():
    names = [name for name, _ in TwoStep().named_predictors()]
    assert names == ["hops[0]", "hops[1]", "answer"]


def test_execute_records_one_trace_entry_per_call_with_messages_and_reply():
    lm = ScriptedLM(reply)
    run = TwoStep().execute(lm, {"question": "why?"})
    assert run.error is None and run.prediction.answer == "a1"
    assert [t.module for t in run.trace] == ["hops[0]", "hops[1]", "answer"]
    assert run.trace[0].reply == "Reasoning: I work it out step by step.\nQuery: q1"
    assert run.trace[2].inputs == {"question": "why?", "query": "q1"}
    assert run.trace[2].messages[-1]["content"] == "Question: why?\nQuery: q1"
    assert len(lm.requests) == 3


def test_a_reply_that_does_not_parse_fails_the_run_not_the_caller():
    run = TwoStep().execute(ScriptedLM(lambda r: "I refuse"), {"question": "why?"})
    assert run.prediction is None
    assert run.error.startswith("unparsed") and run.failure == "unparsed"
    assert run.trace[0].error and run.trace[0].reply == "I refuse"


def test_run_settings_reach_the_request():
    lm = ScriptedLM(reply)
    program = TwoStep()
    program.adapter = "/some/adapter"
    program.execute(lm, {"question": "q"}, temperature=0.7, max_new_tokens=99, seed=3)
    r = lm.requests[0]
    assert (r.temperature, r.max_new_tokens, r.seed, r.adapter) == (0.7, 99, 3, "/some/adapter")
    assert r.stop == ("\nQuestion:",)


def test_state_round_trips_through_json_and_adapter_path_is_relative(tmp_path):
    program = TwoStep()
    program.hops[1].demos = [{"question": "x", "reasoning": "y", "query": "z"}]
    program.answer.signature = program.answer.signature.with_instructions("New instructions.")
    (tmp_path / "adapters" / "w1").mkdir(parents=True)
    program.adapter = str(tmp_path / "adapters" / "w1")
    path = program.save(tmp_path / "state.json")
    raw = json.loads(path.read_text())
    assert raw["adapter"] == "adapters/w1"
    assert raw["predictors"]["answer"]["instructions"] == "New instructions."

    loaded = TwoStep().load(path)
    assert loaded.get_state() == program.get_state()
    assert loaded.hops[1].demos == program.hops[1].demos
    assert loaded.answer.signature.instructions == "New instructions."


def test_state_that_does_not_fit_is_refused_with_the_names(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"predictors": {"solve": {"demos": []}}}))
    with pytest.raises(ValueError, match="solve"):
        TwoStep().load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_state(path)


def test_clone_copies_state_and_shares_tools():
    program = TwoStep()
    twin = program.clone()
    twin.hops[0].demos.append({"question": "a", "query": "b"})
    assert program.hops[0].demos == []
    assert twin.tool is program.tool
    assert twin.hops[0] is not program.hops[0]


def test_example_inputs_and_labels():
    ex = Example(question="q", answer="a", inputs=("question",))
    assert ex.inputs() == {"question": "q"} and ex.labels() == {"answer": "a"}
    assert ex.answer == "a"
    with pytest.raises(KeyError):
        Example(question="q", inputs=("missing",))


def test_state_pointing_at_a_missing_adapter_is_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"adapter": "gone", "predictors": {}}))
    with pytest.raises(UsageError, match="does not exist"):
        load_state(path)


@pytest.mark.parametrize("reply", [
    "Reasoning: ...\nAnswer: 4",  # the template's placeholder, copied
    "Reasoning: …\nAnswer: 4",
    "Reasoning: <reasoning>\nAnswer: 4",
    "Reasoning: Think step by step before giving the answer.\nAnswer: 4",  # the field's description, copied
    "Reasoning: it is four\nAnswer: 4",  # three words
    "Answer: 4",  # free decoding: the answer without a chain of thought
])
def test_a_chain_of_thought_without_real_reasoning_fails_as_its_own_kind(reply):
    program = Solo(ChainOfThought("question -> answer"))
    run = program.execute(ScriptedLM(lambda request: reply), {"question": "2+2?"})
    assert run.failure == "no reasoning" and run.prediction is None
    assert run.trace[0].error.startswith("no reasoning: ")


def test_real_reasoning_passes_and_a_plain_predict_needs_none():
    cot = Solo(ChainOfThought("question -> answer"))
    run = cot.execute(ScriptedLM(lambda r: "Reasoning: two and two make four\nAnswer: 4"), {"question": "2+2?"})
    assert run.failure is None and run.prediction.answer == "4"
    plain = Solo(Predict("question -> answer"))
    assert plain.execute(ScriptedLM(lambda r: "Answer: 4"), {"question": "2+2?"}).prediction.answer == "4"


class Solo(Program):
    def __init__(self, module):
        self.module = module

    def forward(self, run, question):
        return self.module(run, question=question)
