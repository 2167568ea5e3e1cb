"""The extended weight step (w+): sampled runs, rationalization and class balance, with a scripted LM."""

import json

from tandem import ChainOfThought, Example, Program, ScriptedLM
from tandem.experiments import parse_strategies
from tandem.optimizers import WeightSettings, better_together, bootstrap_finetune, parse_strategy
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
        return f"Reasoning: because of the hint\nLabel: {prompt.split('Label: ')[-1][0]}"
    gold = prompt.split(" is ")[1][0]
    if request.temperature > 0 and request.seed % 2 == 0 and "item 5" not in prompt:
        return f"Reasoning: sampled with seed {request.seed}\nLabel: {gold}"
    return "Reasoning: guess\nLabel: a"


def finetune(tmp_path, extended, **options):
    lm = ScriptedLM(reply, trainable=True)
    settings = WeightSettings(extended=ExtendedWeightSettings(**options))
    result = bootstrap_finetune(Classify(), lm, data(), data(), metric, settings, out_dir=tmp_path, progress=False,
                                extended=extended)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    return lm, result, rows


def test_the_paper_step_trains_on_exactly_the_passing_greedy_runs(tmp_path):
    lm, result, rows = finetune(tmp_path, extended=False)
    assert len(lm.requests) == len(GOLDS)  # one greedy run per example, nothing else
    assert all(r.temperature == 0 and "Hint" not in r.messages[-1]["content"] for r in lm.requests)
    assert result.sources == {"runs": 4} and result.conversations == 4
    assert [r["messages"][-1]["content"] for r in rows] == ["Reasoning: guess\nLabel: a"] * 4
    assert "from 4 passing runs" in result.notes[0]


def test_sampled_runs_keep_only_passing_distinct_replies(tmp_path):
    lm, result, rows = finetune(tmp_path, extended=True, samples=2, rationalize=False, balance=False)
    sampled = [r for r in lm.requests if r.temperature > 0]
    assert len(sampled) == 2 * len(GOLDS) and all(r.temperature == 0.7 for r in sampled)
    assert len({r.seed for r in sampled}) == 2
    # seed 1 repeats the greedy reply (kept once), seed 2 is right on items 0-4, never on item 5
    assert result.sources == {"runs": 4, "sampled": 5}
    replies = [r["messages"][-1]["content"] for r in rows]
    assert replies.count("Reasoning: guess\nLabel: a") == 4  # the odd seed's repeats were not kept again
    assert replies[4:] == ["Reasoning: sampled with seed 2\nLabel: a"] * 4 + ["Reasoning: sampled with seed 2\nLabel: b"]
    assert [r["source"] for r in rows] == ["runs"] * 4 + ["sampled"] * 5


def test_rationalization_keeps_passing_hinted_calls_without_the_hint(tmp_path):
    lm, result, rows = finetune(tmp_path, extended=True, samples=0, rationalize=True, balance=False)
    hinted = [r for r in lm.requests if "Hint" in r.messages[-1]["content"]]
    assert len(hinted) == 2  # items 4 and 5 had no passing run
    assert "Label: b" in hinted[0].messages[-1]["content"] or "Label: b" in hinted[1].messages[-1]["content"]
    assert result.sources == {"runs": 4, "rationalized": 2}
    rationalized = [r for r in rows if r["source"] == "rationalized"]
    assert [r["messages"][-1]["content"] for r in rationalized] == [
        "Reasoning: because of the hint\nLabel: b", "Reasoning: because of the hint\nLabel: c"]
    assert not any("Hint" in m["content"] for r in rows for m in r["messages"])  # the training prompt has no hint


def test_balance_caps_the_dominant_class_and_says_so(tmp_path):
    lm, result, rows = finetune(tmp_path, extended=True, samples=2, rationalize=True, balance=True)
    # before: 4 runs (a) + 5 sampled (4 a, 1 b) + 1 rationalized (c) = 10; cap ceil(10 / 3) = 4 a class
    assert result.balance_dropped == 4
    assert result.sources == {"runs": 4, "sampled": 1, "rationalized": 1}
    labels = [r["messages"][-1]["content"][-1] for r in rows]
    assert sorted(labels) == ["a"] * 4 + ["b", "c"]
    assert "4 runs, 1 sampled, 1 rationalized" in result.notes[0] and "balance left out 4" in result.notes[0]
    assert result.summary()["calls_by_source"] == {"runs": 4, "sampled": 1, "rationalized": 1}


def test_w_plus_is_a_strategy_step_beside_the_papers(tmp_path):
    assert parse_strategy("p -> w+ -> p") == ("p", "w+", "p")
    assert list(parse_strategies("vanilla, extended")) == ["vanilla", "Θ+", "Π→Θ+", "Π→Θ+→Π"]
    assert parse_strategies("p -> w +")["Π→Θ+"] == "p -> w+"
    lm = ScriptedLM(reply, trainable=True)
    settings = OptimizeSettings(weights=WeightSettings(extended=ExtendedWeightSettings(samples=1)))
    result = better_together(Classify(), lm, "w -> w+", data(), data(), data(), metric, settings,
                             run_dir=tmp_path, progress=False)
    assert [s.prefix for s in result.steps] == ["zero-shot", "w", "w-w+"]
    assert result.steps[1].details["sources"] == {"runs": 4}
    assert "rationalized" in result.steps[2].details["sources"]
    assert (tmp_path / "w-w+" / "adapter" / "adapter_config.json").exists()
