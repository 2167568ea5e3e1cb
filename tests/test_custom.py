"""Tasks of your own (Python or data files), export, and `tandem run`: scripted LM and the real CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tandem import Prediction, ScriptedLM, evaluate
from tandem.errors import UsageError
from tandem.export import export, load_program
from tandem.optimizers import OptimizeSettings, PromptSettings, WeightSettings, better_together
from tandem.tasks import data_task, load_task
from tandem.training.lora import finetune

REPO = Path(__file__).resolve().parents[1]
SIGNATURE = "text -> label"


def write_rows(path: Path, rows, kind="jsonl"):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    return path


def rows(n=16):
    return [{"text": f"item {i} is {'hot' if i % 2 else 'cold'}", "label": "warm" if i % 2 else "chilly"} for i in range(n)]


def labeler(request):
    """Answers right once the prompt shows a demo (it has learned the format), else a wrong label."""
    text = request.messages[-1]["content"]
    demos = any(m["role"] == "assistant" for m in request.messages) or "\nExamples:" in request.messages[0]["content"]
    right = "warm" if "hot" in text else "chilly"
    return f"Reasoning: I work it out step by step.\nLabel: {right if demos else 'unknown'}"


def test_example_task_file_and_a_module_path_both_load(tmp_path, monkeypatch):
    wine = load_task(f"{REPO}/examples/wine_task.py:wine")
    assert wine.name == "wine" and len(wine.train) == 60 and wine.source["sha256"]
    program = wine.make_program()
    assert [name for name, _ in program.named_predictors()] == ["classify"]
    assert wine.metric(wine.test[0], Prediction(cultivar=wine.test[0]["cultivar"].upper())) == 1.0

    (tmp_path / "mytasks.py").write_text(
        "from tandem.tasks import data_task\n"
        f"def make():\n    return data_task({str(write_rows(tmp_path / 'd.jsonl', rows()))!r}, {SIGNATURE!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("mytasks:make")
    assert task.source["spec"] == "mytasks:make" and len(task.train) + len(task.val) + len(task.test) == 16
    with pytest.raises(UsageError, match="defines no nothing"):
        load_task("mytasks:nothing")


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_data_file_task_splits_and_scores(tmp_path, kind):
    task = data_task(write_rows(tmp_path / f"d.{kind}", rows(), kind), SIGNATURE, metric="exact", program="predict")
    assert (len(task.train), len(task.val), len(task.test)) == (8, 4, 4)
    assert task.train[0].input_keys == ("text",) and set(task.train[0]) == {"text", "label"}
    ex = task.test[0]
    assert task.metric(ex, {"label": ex["label"].upper() + "."}) == 1.0 and task.metric(ex, {"label": "no"}) == 0.0
    assert task.source["data"]["train"]["sha256"] and task.source["signature"] == SIGNATURE


def test_number_contains_and_f1_metrics(tmp_path):
    path = write_rows(tmp_path / "n.jsonl", [{"q": f"q{i}", "a": f"{i},000"} for i in range(8)])
    number = data_task(path, "q -> a", metric="number")
    assert number.metric({"a": "3,000"}, {"a": "it is 3000"}) == 1.0
    assert data_task(path, "q -> a", metric="contains").metric({"a": "Paris"}, {"a": "It is Paris."}) == 1.0
    assert data_task(path, "q -> a", metric="f1").metric({"a": "new york"}, {"a": "york"}) == pytest.approx(2 / 3)


@pytest.mark.parametrize("content,needle", [
    ("", "d.jsonl: no rows"),
    ('{"text": "a", "label": "b"}\n{"text": "a"}\n', "d.jsonl:2: missing field 'label'"),
    ('{"text": "a", "lbl": "b"}\n', "no row has the field 'label'"),
    ('{"text": "a", "label": "b"}\nnot json\n', "d.jsonl:2: not valid JSON"),
])
def test_bad_data_files_are_one_line_naming_file_row_and_field(tmp_path, content, needle):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
        data_task(tmp_path / "d.jsonl", SIGNATURE)
    (tmp_path / "d.csv").write_text("text,lbl\na,b\n")
    with pytest.raises(UsageError, match=r"d\.csv: no column 'label' \(columns: text, lbl\)"):
        data_task(tmp_path / "d.csv", SIGNATURE)


def test_export_writes_every_file_and_reproduces_the_test_score(tmp_path):
    task = data_task(write_rows(tmp_path / "d.jsonl", rows()), SIGNATURE)
    run_dir = tmp_path / "run"
    result = better_together(task.make_program(), ScriptedLM(labeler), "p", task.train, task.val, task.test,
                             task.metric, OptimizeSettings(prompts=PromptSettings(2, 2, 1)), run_dir=run_dir,
                             progress=False, config={"task": task.name, "task_source": task.source, "model": "m"})
    assert result.best == "p"
    out = export(run_dir, tmp_path / "shipped")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "program.json", "task.json"]
    card = (out / "README.md").read_text()
    assert "| p **(exported)** |" in card and "tandem run" in card and "module `predict`" in card
    again = evaluate(load_program(out), ScriptedLM(labeler), task.test, task.metric, progress=False)
    assert again.score == result.steps[-1].test == 100.0
    with pytest.raises(UsageError, match="not empty"):
        export(run_dir, out)
    with pytest.raises(UsageError, match="no finished step 'p-w'"):
        export(run_dir, tmp_path / "other", step="p-w")


def test_the_exported_adapter_loads_with_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tandem.lm.local import LocalLM

    local = LocalLM(tiny_model_dir, dtype="float32")

    class Trains(ScriptedLM):  # scripted replies, real peft training on the tiny model
        def finetune(self, *args, **kwargs):
            return finetune(local, *args, **kwargs)

    task = data_task(write_rows(tmp_path / "d.jsonl", rows()), SIGNATURE)
    # The adapter is exported whatever val says of it (scripted replies cannot tell it from the start).
    settings = OptimizeSettings(prompts=PromptSettings(2, 2, 1), weights=WeightSettings(keep_checkpoint="last"))
    lm = Trains(labeler, trainable=True)
    better_together(task.make_program(), lm, "p -> w", task.train, task.val, task.test, task.metric, settings,
                    run_dir=tmp_path / "run", progress=False, config={"task_source": task.source})
    out = export(tmp_path / "run", tmp_path / "shipped", step="p-w")
    assert json.loads((out / "program.json").read_text())["adapter"] == "adapter"
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert any("lora_A" in name for name, _ in peft.named_parameters())
    assert load_program(out).adapter == str((out / "adapter").resolve())
    local.close()


def tandem(*args, stdin=None, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "tandem", *args], input=stdin, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=600)


def test_cli_data_task_bad_input_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    out = tandem("optimize", "--data", str(tmp_path / "d.jsonl"), "--signature", SIGNATURE, "--model", "m",
                 "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "no row has the field 'label'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
    out = tandem("optimize", "--data", str(tmp_path / "d.jsonl"), "--model", "m", "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "--data needs --signature" in out.stderr


def test_cli_optimize_export_and_run_a_data_file_task(tiny_model_dir, cache_dir, tmp_path):
    data = write_rows(tmp_path / "d.csv", rows(), "csv")
    env = {"TANDEM_CACHE_DIR": str(cache_dir)}
    out = tandem("optimize", "--data", str(data), "--signature", SIGNATURE, "--program", "predict", "--model",
                 tiny_model_dir, "--strategy", "p", "--run-dir", str(tmp_path / "run"), "--num-candidates", "1",
                 "--max-new-tokens", "4", "--threads", "4", env=env)
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task_source"]["data"]["train"]["sha256"] and config["task"] == "d"
    exported = tandem("export", str(tmp_path / "run"), "--out", str(tmp_path / "shipped"))
    assert exported.returncode == 0, exported.stderr
    stdin = '{"text": "item 3 is hot"}\nnot json\n{"txt": "x"}\n{"text": "item 4 is cold"}\n'
    ran = tandem("run", str(tmp_path / "shipped"), "--model", tiny_model_dir, "--max-new-tokens", "4", stdin=stdin,
                 env=env)
    assert ran.returncode == 0, ran.stderr
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [line["line"] for line in lines] == [1, 2, 3, 4]
    assert "not a JSON object" in lines[1]["error"] and "missing input 'text'" in lines[2]["error"]
    assert all("prediction" in line or "failure" in line for line in (lines[0], lines[3]))  # answered or counted
    one = tandem("run", str(tmp_path / "shipped"), '{"text": "item 5 is hot"}', "--model", tiny_model_dir,
                 "--max-new-tokens", "4", env=env)
    assert one.returncode in (0, 1) and json.loads(one.stdout)["line"] == 1


def test_typed_outputs_are_scored_as_values_and_a_gold_outside_the_type_is_refused(tmp_path):
    """`--metric exact` normalizes punctuation away: "A+" and "A-" would both read "a". Choices are compared
    as the canonical values the parser gives; a gold label that is no choice is a data error, said up front."""
    rows_ = [{"essay": f"essay {i}", "grade": g} for i, g in enumerate(["A+", "A", "A-", "B"] * 2)]
    task = data_task(write_rows(tmp_path / "grades.jsonl", rows_), "essay -> grade: A+|A|A-|B", metric="exact")
    example = next(e for e in task.train if e["grade"] == "A+")
    assert task.metric(example, Prediction(reasoning="x", grade="A+")) == 1.0
    assert task.metric(example, Prediction(reasoning="x", grade="A-")) == 0.0
    bad = write_rows(tmp_path / "bad.jsonl", rows_ + [{"essay": "essay 9", "grade": "C"}])
    with pytest.raises(UsageError, match=r"bad.jsonl:9: Grade 'C' is not one of A\+\|A\|A-\|B"):
        data_task(bad, "essay -> grade: A+|A|A-|B")
