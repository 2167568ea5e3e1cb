"""The extended weight step (w+): sampled runs, rationalization and class balance, with a scripted LM."""

import json

import pytest

from tandem import ChainOfThought, Example, Predict, Program, ScriptedLM
from tandem.evaluate import MetricError
from tandem.experiments import parse_strategies
from tandem.optimizers import WeightSettings, better_together, bootstrap_finetune, parse_strategy
from tandem.optimizers.weights import _Kept, balance, hint_of
from tandem.settings import ExtendedWeightSettings, OptimizeSettings

GOLDS = ["a", "a", "a", "a", "b", "c"]


class Classify(Program):
    def __init__(self):
        self.classify = ChainOfThought("x -> label: a|b|c")

    def forward(self, run, x):
        return self.classify(run, x=x)


def metric(example, prediction):
    return float(prediction.label == example.label)


def data():
    return [Example(x=f"item {i} is {gold}", label=gold, inputs=("x",)) for i, gold in enumerate(GOLDS)]


def reply(request):
    """Greedy: always "a". Sampled: odd seeds repeat the greedy reply, even seeds are right (never for
    item 5). Shown a hint: follows it."""
    prompt = request.messages[-1]["content"]
    if "Hint: the correct answer is Label: " in prompt:
        return f"Reasoning: worked back from the petals\nLabel: {prompt.split('Label: ')[-1][0]}"
    gold = prompt.split(" is ")[1][0]
    if request.temperature > 0 and request.seed % 2 == 0 and "item 5" not in prompt:
        return f"Reasoning: this one was sampled with seed {request.seed}\nLabel: {gold}"
    return "Reasoning: a guess from the first letter\nLabel: a"


def finetune(tmp_path, extended, respond=reply, program=None, examples=None, score=metric, least=1, **options):
    lm = ScriptedLM(respond, trainable=True)
    # The data a step trains on, not which checkpoint it keeps (tests/test_checkpoints.py): no val runs.
    settings = WeightSettings(extended=ExtendedWeightSettings(**options), keep_checkpoint="last", min_calls=least)
    examples = examples or data()
    result = bootstrap_finetune(program or Classify(), lm, examples, examples, score, settings, out_dir=tmp_path,
                                progress=False, extended=extended)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    return lm, result, rows


def test_the_paper_step_trains_on_exactly_the_passing_greedy_runs(tmp_path):
    lm, result, rows = finetune(tmp_path, extended=False, least=2)
    assert len(lm.requests) == len(GOLDS)  # one greedy run per example, nothing else
    assert all(r.temperature == 0 and "Hint" not in r.messages[-1]["content"] for r in lm.requests)
    assert result.sources == {"runs": 4} and result.conversations == 4
    assert [r["messages"][-1]["content"] for r in rows] == ["Reasoning: a guess from the first letter\nLabel: a"] * 4
    # every passing run answers "a": an adapter would learn that class alone, so none is trained
    assert not result.trained and lm.finetuned == [] and result.program.adapter is None
    assert result.notes[0].startswith("too little to learn from: all 4 training calls answer 'a'")


def test_sampled_runs_keep_only_passing_distinct_replies(tmp_path):
    lm, result, rows = finetune(tmp_path, extended=True, samples=2, rationalize=False, balance=False)
    sampled = [r for r in lm.requests if r.temperature > 0]
    assert len(sampled) == 2 * len(GOLDS) and all(r.temperature == 0.7 for r in sampled)
    assert len({r.seed for r in sampled}) == 2
    # seed 1 repeats the greedy reply (kept once), seed 2 is right on items 0-4, never on item 5
    assert result.sources == {"runs": 4, "sampled": 5}
    replies = [r["messages"][-1]["content"] for r in rows]
    assert replies.count("Reasoning: a guess from the first letter\nLabel: a") == 4  # the odd seed's repeats were not kept again
    assert replies[4:] == ["Reasoning: this one was sampled with seed 2\nLabel: a"] * 4 + [
        "Reasoning: this one was sampled with seed 2\nLabel: b"]
    assert [r["source"] for r in rows] == ["runs"] * 4 + ["sampled"] * 5


def test_rationalization_keeps_passing_hinted_calls_without_the_hint(tmp_path):
    lm, result, rows = finetune(tmp_path, extended=True, samples=0, rationalize=True, balance=False)
    hinted = [r for r in lm.requests if "Hint" in r.messages[-1]["content"]]
    assert len(hinted) == 2  # items 4 and 5 had no passing run
    assert "Label: b" in hinted[0].messages[-1]["content"] or "Label: b" in hinted[1].messages[-1]["content"]
    assert result.sources == {"runs": 4, "rationalized": 2}
    rationalized = [r for r in rows if r["source"] == "rationalized"]
    assert [r["messages"][-1]["content"] for r in rationalized] == [
        "Reasoning: worked back from the petals\nLabel: b", "Reasoning: worked back from the petals\nLabel: c"]
    assert not any("Hint" in m["content"] for r in rows for m in r["messages"])  # the training prompt has no hint
    assert result.hint_dropped == 0


def test_a_rationalized_reply_that_talks_about_the_hint_is_left_out_and_counted(tmp_path):
    def cites(request):  # item 5's hinted reply leans on the hint
        text = reply(request)
        if "item 5" in request.messages[-1]["content"]:
            text = text.replace("worked back from the petals", "as the hint says, it is this label")
        return text

    lm, result, rows = finetune(tmp_path, extended=True, respond=cites, samples=0, rationalize=True, balance=False)
    assert result.sources == {"runs": 4, "rationalized": 1}  # item 4 kept; item 5 passed but cited the hint
    assert result.hint_dropped == 1 and result.summary()["hint_dropped"] == 1
    assert any("left out 1 passing runs whose reply talks about the hint" in n for n in result.notes)
    assert not any("hint" in r["messages"][-1]["content"].lower() for r in rows)


class Explain(Program):
    """A module that writes its rationale under a name of its own before the answer."""

    def __init__(self):
        self.solve = Predict("question -> rationale, answer")

    def forward(self, run, question):
        return self.solve(run, question=question)


class Typed(Program):
    """Two outputs, both answers."""

    def __init__(self):
        self.solve = ChainOfThought("question -> answer, answer_type")

    def forward(self, run, question):
        return self.solve(run, question=question)


def test_the_hint_shows_the_answers_the_metric_judges_never_a_gold_rationale(tmp_path):
    def respond(request):
        prompt = request.messages[-1]["content"]
        if "Hint:" in prompt:
            return "Rationale: six sevens\nAnswer: 42"
        return "Rationale: no idea\nAnswer: 0"

    examples = [Example(question="What is 6 x 7?", rationale="GOLD: six times seven is 42", answer="42",
                        inputs=("question",))]
    lm, result, rows = finetune(tmp_path, extended=True, respond=respond, program=Explain(), examples=examples,
                                score=lambda e, p: float(p.answer == e.answer), samples=0, rationalize=True,
                                balance=False)
    (hinted,) = [r for r in lm.requests if "Hint:" in r.messages[-1]["content"]]
    seen = "\n".join(m["content"] for m in hinted.messages)
    assert "Hint: the correct answer is Answer: 42." in seen and "GOLD" not in seen
    assert result.sources == {"rationalized": 1}


def test_the_final_answers_are_what_the_metric_reads_whatever_the_fields_are_called():
    gsm8k = Example(question="q", reasoning="48 / 2 = 24", answer="24", inputs=("question",))
    both = Example(question="q", explanation="because", answer="Paris", answer_type="city", inputs=("question",))
    reads_answer = lambda e, p: float(p.answer == e.answer)  # noqa: E731
    reads_both = lambda e, p: float(p["answer"] == e.answer and p.get("answer_type") == e.answer_type)  # noqa: E731
    reads_all = lambda e, p: float(all(p[k] == e[k] for k in p))  # noqa: E731
    assert hint_of(gsm8k, Typed(), reads_answer) == {"answer": "24"}
    assert hint_of(both, Typed(), reads_both) == {"answer": "Paris", "answer_type": "city"}
    assert hint_of(both, Typed(), reads_answer) == {"answer": "Paris"}
    # a metric that reads every field still sees only what a module writes: not `explanation`
    assert hint_of(both, Typed(), reads_all) == {"answer": "Paris", "answer_type": "city"}
    assert hint_of(both, Classify(), reads_all) == {}  # no module writes any of them


def test_balance_caps_the_dominant_class_and_says_so(tmp_path):
    lm, result, rows = finetune(tmp_path, extended=True, samples=2, rationalize=True, balance=True)
    # before: 4 runs (a) + 5 sampled (4 a, 1 b) + 1 rationalized (c) = 10; b and c have 1: a keeps 2, its runs
    assert result.balance_dropped == 6
    assert result.sources == {"runs": 2, "sampled": 1, "rationalized": 1}
    labels = [r["messages"][-1]["content"][-1] for r in rows]
    assert sorted(labels) == ["a"] * 2 + ["b", "c"]
    assert "2 runs, 1 sampled, 1 rationalized" in result.notes[0] and "balance left out 6" in result.notes[0]
    assert result.summary()["calls_by_source"] == {"runs": 2, "sampled": 1, "rationalized": 1}


def test_balance_keeps_at_most_twice_the_smallest_class_counting_canonical_choices():
    # 60 runs of class a (half of them labeled "A"), 5 of b, 5 of c: a keeps 10, from the earliest source
    golds = ["a", "A"] * 30 + ["b"] * 5 + [" C "] * 5
    train = [Example(x=str(i), label=g, inputs=("x",)) for i, g in enumerate(golds)]
    kept = ([_Kept(i, "runs", []) for i in range(1, 60, 2)] + [_Kept(i, "sampled", []) for i in range(0, 60, 2)]
            + [_Kept(i, "rationalized", []) for i in range(60, 70)])
    out, note = balance(kept, train, Classify())
    check = Classify().classify.signature.outputs[-1].check
    assert note is None and sorted(check(train[k.example].label) for k in out) == ["a"] * 10 + ["b"] * 5 + ["c"] * 5
    assert [k.source for k in out] == ["runs"] * 10 + ["rationalized"] * 10


def test_w_plus_is_a_strategy_step_beside_the_papers(tmp_path):
    assert parse_strategy("p -> w+ -> p") == ("p", "w+", "p")
    assert list(parse_strategies("vanilla, extended")) == ["vanilla", "Θ+", "Π→Θ+", "Π→Θ+→Π"]
    assert parse_strategies("p -> w +")["Π→Θ+"] == "p -> w+"
    lm = ScriptedLM(reply, trainable=True)
    settings = OptimizeSettings(weights=WeightSettings(extended=ExtendedWeightSettings(samples=1), min_calls=1))
    result = better_together(Classify(), lm, "w -> w+", data(), data(), data(), metric, settings,
                             run_dir=tmp_path, progress=False)
    assert [s.prefix for s in result.steps] == ["zero-shot", "w", "w-w+"]
    assert result.steps[1].details["sources"] == {"runs": 4}
    assert "rationalized" in result.steps[2].details["sources"]
    assert (tmp_path / "w-w+" / "adapter" / "adapter_config.json").exists()


def test_a_metric_bug_stops_the_weight_step_and_no_step_record_is_written(tmp_path):
    def typo(example, prediction):
        if example.x.startswith("item 3 "):  # only a training example: zero-shot scores val and test first
            return float(prediction.label == example["lable"])
        return metric(example, prediction)

    lm = ScriptedLM(reply, trainable=True)
    others = [Example(x="item 9 is a", label="a", inputs=("x",))]
    with pytest.raises(MetricError, match=r"KeyError on example 3 \(x='item 3 is a'\)") as caught:
        better_together(Classify(), lm, "w", data(), others, others, typo, run_dir=tmp_path, progress=False)
    assert isinstance(caught.value.__cause__, KeyError)
    assert (tmp_path / "zero-shot" / "step.json").exists() and not (tmp_path / "w" / "step.json").exists()
    assert lm.finetuned == []


def right(request, say=None):
    """Always the gold label; the reasoning names `say(gold)` where given."""
    gold = request.messages[-1]["content"].split(" is ")[1][0]
    return f"Reasoning: it looks like {say(gold) if say else gold} from its first letter\nLabel: {gold}"


def weight_step(tmp_path, respond, **settings):
    lm = ScriptedLM(respond, trainable=True)
    result = bootstrap_finetune(Classify(), lm, data(), data(), metric, WeightSettings(keep_checkpoint="last", **settings),
                                out_dir=tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    return lm, result, rows


def test_too_few_training_calls_are_one_line_and_nothing_is_learned(tmp_path):
    lm, result, rows = weight_step(tmp_path, right)  # 6 passing runs of 3 classes, fewer than min_calls (8)
    assert not result.trained and result.program.adapter is None and lm.finetuned == []
    assert result.notes[0] == ("too little to learn from: 6 training calls, fewer than --min-calls 8; a w+ step "
                               "(sampled and rationalized runs) or --train-size gives more")
    assert len(rows) == 6  # what was gathered is still there to read
    lm, result, _ = weight_step(tmp_path / "enough", right, min_calls=6)
    assert result.trained and len(lm.finetuned) == 1


def test_training_calls_name_their_class_and_where_the_answer_starts(tmp_path):
    lm, result, rows = weight_step(tmp_path, right, min_calls=1)
    assert [r["group"] for r in rows] == GOLDS
    for row in rows:  # reasoning="answer", the default: the loss starts at the answer's label
        reply = row["messages"][-1]["content"]
        assert reply[row["loss_from"]:] == f"Label: {row['group']}"
    (calls,) = lm.finetuned
    assert calls == [r["messages"] for r in rows]
    _, _, rows = weight_step(tmp_path / "all", right, min_calls=1, reasoning="all")
    assert not any("loss_from" in r for r in rows)


def test_reasoning_that_argues_for_another_class(tmp_path):
    def other(gold):
        return "b" if gold == "a" else "a"

    def half(request):  # items 0-2 reason toward another class than they answer
        item = int(request.messages[-1]["content"].split("item ")[1][0])
        return right(request, other if item < 3 else None)

    # the whole reply taught (the paper) and every run argues against its answer: nothing to learn
    lm, result, _ = weight_step(tmp_path / "all", lambda r: right(r, other), min_calls=2, reasoning="all")
    assert not result.trained and lm.finetuned == []
    assert result.notes[0] == ("too little to learn from: the reasoning of all 6 runs names another class than "
                               "their answer; --reasoning answer teaches the answers alone")
    # the check leaves those runs out and says so
    lm, result, rows = weight_step(tmp_path / "check", half, min_calls=1, reasoning="consistent")
    assert result.trained and [r["group"] for r in rows] == GOLDS[3:]
    assert "reasoning: left out 3 runs whose reasoning names another class than their answer" in result.notes
    # the answer alone: every run kept, its reasoning untaught
    lm, result, rows = weight_step(tmp_path / "answer", half, min_calls=1)
    assert result.trained and len(rows) == 6 and all(r["loss_from"] > 0 for r in rows)
