import pytest

from tandem.program import Prediction
from tandem.tasks import DataNotFoundError, load_task
from tandem.tasks.gsm8k import metric as gsm8k_metric, parse_number
from tandem.tasks.hotpotqa import f1, metric as hotpot_metric, normalize_answer
from tandem.tasks.iris import metric as iris_metric


def test_gsm8k_metric_reads_the_last_number():
    ex = load_task("gsm8k").test[0]
    assert ex.answer == "18"
    assert gsm8k_metric(ex, Prediction(answer="She makes $18 every day."))
    assert gsm8k_metric(ex, Prediction(answer="18.0"))
    assert not gsm8k_metric(ex, Prediction(answer="18 eggs, so 36"))
    assert not gsm8k_metric(ex, Prediction(answer="no idea"))
    assert parse_number("1,234.5 dollars") == 1234.5
    assert parse_number("-3") == -3


def test_gsm8k_examples_keep_the_worked_solution_without_calculator_notes():
    ex = load_task("gsm8k").train[0]
    assert "<<" not in ex.reasoning and "####" not in ex.reasoning
    assert ex.inputs() == {"question": ex.question}


def test_hotpotqa_normalization_and_metrics():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    ex = load_task("hotpotqa").val[0]
    assert hotpot_metric(ex, Prediction(answer=f"  {ex.answer.upper()}. "))
    assert not hotpot_metric(ex, Prediction(answer=f"{ex.answer} and more"))
    assert 0 < f1(ex, Prediction(answer=f"{ex.answer} and more")) < 1


def test_iris_metric_accepts_the_species_in_any_dress():
    ex = load_task("iris").test[0]
    assert iris_metric(ex, Prediction(species=f"Iris-{ex.species.capitalize()}"))
    assert not iris_metric(ex, Prediction(species="a flower"))


def test_iris_metric_rejects_a_reply_that_merely_contains_the_species():
    ex = load_task("iris").test[0]
    for reply in (f"It is {ex.species}", f"{ex.species} or versicolor", f"{ex.species}, setosa, virginica",
                  "setosa versicolor virginica"):
        assert not iris_metric(ex, Prediction(species=reply)), reply


@pytest.mark.parametrize("name,sizes", [("gsm8k", (6973, 500, 1319)), ("hotpotqa", (200, 200, 341)), ("iris", (50, 50, 50))])
def test_splits_are_deterministic_disjoint_and_sized(name, sizes):
    a, b = load_task(name), load_task(name)
    assert (len(a.train), len(a.val), len(a.test)) == sizes
    for split in ("train", "val", "test"):
        assert a.split(split) == b.split(split)
    key = (lambda e: e["question"]) if name != "iris" else (lambda e: tuple(sorted(e.items())))
    train, val = {key(e) for e in a.train}, {key(e) for e in a.val}
    assert not train & val


def test_iris_splits_are_stratified():
    task = load_task("iris")
    for split in (task.train, task.val, task.test):
        counts = {s: sum(e.species == s for e in split) for s in ("setosa", "versicolor", "virginica")}
        assert max(counts.values()) - min(counts.values()) <= 1


def test_missing_data_names_where_it_looked(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "gsm8k" / "train.jsonl")):
        load_task("gsm8k", str(tmp_path))
    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_task("hotpotqa")


def test_unknown_task_lists_the_choices():
    with pytest.raises(ValueError, match="gsm8k, hotpotqa, iris"):
        load_task("mnist")


def test_retriever_finds_the_gold_paragraph():
    from tandem.tasks.hotpotqa import MultiHopQA

    task = load_task("hotpotqa")
    program = task.make_program()
    assert isinstance(program, MultiHopQA)
    hits = program.retriever("Scott Derrickson American director", 3)
    assert hits[0].startswith("Scott Derrickson |")
    assert program.retriever("zzqx qqzv", 3) == []


def test_hotpotqa_labels_every_module_from_the_gold_paragraphs():
    task = load_task("hotpotqa")
    labeled = [e for e in task.train if "module_labels" in e]
    assert len(labeled) > 100  # rows without gold titles have none
    program = task.make_program()
    retriever = program.retriever
    for example in labeled[:20]:
        assert set(example.module_labels) == {name for name, _ in program.named_predictors()}
        hop1, hop2, answer = (example.module_labels[k] for k in ("generate_query[0]", "generate_query[1]", "generate_answer"))
        assert sorted([hop1["search_query"], hop2["search_query"]]) == sorted(example.gold_titles)
        assert hop1["context"] == [] and hop2["context"] == answer["context"][:1]
        assert answer["answer"] == example.answer and answer["context"][1].startswith(hop2["search_query"] + " | ")
        ranked = retriever(example.question, 20)
        rank = {p: ranked.index(p) if p in ranked else 20 for p in answer["context"]}
        assert rank[answer["context"][0]] <= rank[answer["context"][1]]  # hop 1: what the question finds better


def test_hotpotqa_program_returns_its_context_and_reports_the_gold_paragraphs_found():
    from tandem import Example, ScriptedLM, evaluate

    task = load_task("hotpotqa")
    example = next(e for e in task.test if len(e.gold_titles) == 2)
    first = example.module_labels["generate_query[0]"]["search_query"]

    def reply(request):  # hop queries name the first gold title; the answer is the gold answer
        if "- Search Query" in request.messages[0]["content"]:
            return f"Reasoning: the question names this title first\nSearch Query: {first}"
        return f"Reasoning: the context says so in its passages\nAnswer: {example.answer}"

    result = evaluate(task.make_program(), ScriptedLM(reply), [example], task.metric, progress=False)
    prediction = result.results[0].prediction
    assert any(p.startswith(first + " | ") for p in prediction.context)
    found = task.report_metrics["gold paragraphs retrieved"]
    assert found(example, prediction) in (0.5, 1.0) and result.mean(found) >= 50.0
    assert result.score == 100.0 and result.mean(task.report_metrics["answer F1"]) == 100.0
    assert found(Example(question="q", answer="a", gold_titles=[], inputs=("question",)), prediction) is None
