"""Experiment tracking against a real local MLflow store (SQLite under tmp_path): the real CLI on the tiny
model, and the orchestrator with a scripted LM where a run must stop half-way and resume."""

import json
import socket
import subprocess
import sys

import pytest

from tandem import ChainOfThought, Example, GenerationSettings, Program, ScriptedLM
from tandem.errors import EngineError, UsageError
from tandem.optimizers import OptimizeSettings, PromptSettings, better_together
from tandem.settings import TrackingSettings
from tandem.tracking import open_tracker

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed: pip install -e '.[mlflow]'")
from mlflow import MlflowClient  # noqa: E402

# A task whose metric passes, fails or cannot score an example by its grade, so a run on the tiny model has
# all three, and a weight step has passing calls to train on.
TASK = '''
from tandem import Example, Predict, Program
from tandem.tasks import Task

class Label(Program):
    def __init__(self):
        self.label = Predict("text -> label", "Label the text.")

    def forward(self, run, text):
        return self.label(run, text=text)

def metric(example, prediction):
    if example["grade"] == "unscorable":
        raise ValueError("no grade for this one")
    return float(example["grade"] == "pass")

def graded():
    grades = ("pass", "pass", "fail", "unscorable")
    rows = [Example(text=f"item {i}", label="x", grade=grades[i % 4], inputs=("text",)) for i in range(30)]
    return Task("graded", rows[:10], rows[10:20], rows[20:30], Label, metric)
'''

SMALL = ["--train-size", "8", "--val-size", "6", "--test-size", "6", "--num-candidates", "1", "--epochs", "1",
         "--min-calls", "1", "--max-new-tokens", "6", "--threads", "4", "--batch-size", "2", "--min-steps", "3"]


def tandem(*args, env=None, cwd=None):
    """The CLI; `env` values of None are removed from the environment."""
    import os

    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


@pytest.fixture()
def task_file(tmp_path):
    path = tmp_path / "graded.py"
    path.write_text(TASK)
    return f"{path}:graded"


def runs_of(client, experiment_id):
    return client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])


def children(client, experiment_id, parent_id):
    return [r for r in runs_of(client, experiment_id) if r.data.tags.get("mlflow.parentRunId") == parent_id]


def test_optimize_reports_its_steps_losses_report_and_traces(tiny_model_dir, cache_dir, task_file, tmp_path):
    run_dir = tmp_path / "run"
    out = tandem("optimize", "--task", task_file, "--model", tiny_model_dir, "--strategy", "p -> w", "--run-dir",
                 str(run_dir), *SMALL, "--track", "mlflow", "--track-traces", "all", env={"MLFLOW_TRACKING_URI": None})
    assert out.returncode == 0, out.stderr
    assert "MLflow failed" not in out.stderr  # no warning: tracking worked

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")  # the default store, in the run folder
    experiment = client.get_experiment_by_name("tandem-graded")
    (parent,) = [r for r in runs_of(client, experiment.experiment_id) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name == "run p -> w" and parent.info.status == "FINISHED"
    assert parent.data.params["strategy"] == "p -> w" and parent.data.params["settings.weights.lora.rank"] == "16"
    assert parent.data.params["data.val.size"] == "6" and "lm.model" in parent.data.params
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report-p-w.md", "results-p-w.json",
                                                                          "config.json"}
    report = client.download_artifacts(parent.info.run_id, "report-p-w.md", str(tmp_path / "down"))
    assert open(report).read() == (run_dir / "report-p-w.md").read_text()

    steps = {r.data.tags["tandem.step"]: r for r in children(client, experiment.experiment_id, parent.info.run_id)}
    assert list(steps) == ["zero-shot", "p", "p-w"]  # one nested run per step, in order
    history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "test")}
    for depth, (prefix, run) in enumerate(steps.items()):
        record = json.loads((run_dir / prefix / "step.json").read_text())
        assert run.data.metrics["val"] == pytest.approx(record["val"])
        assert run.data.metrics["test"] == pytest.approx(record["test"])
        for kind, n in record["val_failures"].items():
            assert run.data.metrics[f"val_failed/{kind}"] == n
        assert history[depth] == pytest.approx(record["test"])  # the strategy's curve on its parent run
        # Every example was traced: the traces' scores and failures are the step's own.
        for split in ("val", "test"):
            traces = client.search_traces(locations=[experiment.experiment_id], run_id=run.info.run_id,
                                          filter_string=f"tags.`tandem.split` = '{split}'", max_results=100)
            assert len(traces) == 6
            scores = [float(t.info.tags["tandem.score"]) for t in traces]
            assert 100 * sum(scores) / len(scores) == pytest.approx(record[split])
            failed = [t.info.tags["tandem.failure"] for t in traces if t.info.tags["tandem.failure"]]
            assert {k: failed.count(k) for k in failed} == record[f"{split}_failures"]
            assert all((t.info.status.name == "ERROR") == bool(t.info.tags["tandem.failure"]) for t in traces)

    # The weight step trained: its LoRA loss, one point per optimizer step, is the adapter's own record.
    training = json.loads((run_dir / "p-w" / "adapter" / "training.json").read_text())
    losses = client.get_metric_history(steps["p-w"].info.run_id, "lora_loss")
    assert len(training["step_losses"]) == training["steps"] >= 3
    assert len(training["losses"]) == 2 * training["steps"]  # two micro-batches a step: a step's loss is their mean
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(training["step_losses"])
    assert {a.path for a in client.list_artifacts(steps["p-w"].info.run_id)} >= {"step.json", "program.json",
                                                                                  "training.json"}


def test_eval_traces_are_the_module_calls_it_wrote(tiny_model_dir, cache_dir, tmp_path):
    output, store = tmp_path / "results.jsonl", tmp_path / "store.db"
    out = tandem("eval", "--task", "iris", "--model", tiny_model_dir, "--split", "test", "--limit", "5",
                 "--max-new-tokens", "8", "--output", str(output), "--track", "mlflow", "--track-traces", "3",
                 "--track-experiment", "evals", env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"},
                 cwd=tmp_path)  # a store without a server keeps artifacts in ./mlruns, MLflow's default
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("evals")
    (run,) = runs_of(client, experiment.experiment_id)
    assert run.info.run_name == "eval iris test" and run.data.params["split"] == "test"
    assert run.data.metrics["score"] == pytest.approx(100 * sum(r["score"] for r in rows) / len(rows))
    traces = client.search_traces(locations=[experiment.experiment_id], run_id=run.info.run_id)
    assert sorted(int(t.info.tags["tandem.example"]) for t in traces) == [0, 1, 2]  # the first three: a sample
    for trace in traces:
        row = rows[int(trace.info.tags["tandem.example"])]
        root, *calls = sorted(trace.data.spans, key=lambda s: s.parent_id is not None)
        assert root.inputs == {k: row["example"][k] for k in root.inputs} and root.attributes["score"] == row["score"]
        assert len(calls) == len(row["trace"])
        for span, call in zip(calls, row["trace"]):
            assert span.name == call["module"] and span.inputs == {"messages": call["messages"]}
            assert span.outputs == {"reply": call["reply"], "fields": call["outputs"]}
            assert span.attributes["failure"] == (call["failure"] or "")
            assert span.attributes["mlflow.chat.tokenUsage"]["output_tokens"] == call["completion_tokens"] > 0
            assert span.end_time_ns - span.start_time_ns == pytest.approx(call["seconds"] * 1e9, abs=1e4)


class Double(Program):
    def __init__(self):
        self.rewrite = ChainOfThought("number -> rewritten")
        self.answer = ChainOfThought("rewritten -> double")

    def forward(self, run, number):
        return self.answer(run, rewritten=self.rewrite(run, number=number).rewritten)


def doubles(request):
    n = int(request.messages[-1]["content"].split(":")[-1])
    if "Rewritten" in request.messages[-1]["content"]:
        return f"Reasoning: twice the number, step by step\nDouble: {2 * n}"
    return f"Reasoning: the same number, written again\nRewritten: {n}"


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = [Example(number=n, inputs=("number",)) for n in (1, 2, 3, 4)]
    metric = lambda e, p: float(int(p.double) == 2 * e.number)  # noqa: E731
    settings = OptimizeSettings(prompts=PromptSettings(1, 0, 1), generation=GenerationSettings(threads=2))
    tracking = TrackingSettings(track="mlflow", track_traces="all")

    def optimize(lm):
        with open_tracker(tracking, tmp_path, "resumed").child("p-w", "run p -> w") as run:
            better_together(Double(), lm, "p -> w", data, data[:2], data[2:], metric, settings, run_dir=tmp_path,
                            progress=False, tracker=run)

    dying = ScriptedLM(doubles, trainable=True)
    dying.finetune = lambda *a, **k: (_ for _ in ()).throw(EngineError("the engine died"))
    with pytest.raises(EngineError):
        optimize(dying)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("resumed").experiment_id
    (first,) = runs_of(client, experiment_id)[:1]
    assert first.info.status == "FAILED"
    steps = children(client, experiment_id, first.info.run_id)
    assert [r.data.tags["tandem.step"] for r in steps] == ["zero-shot", "p"]

    lm = ScriptedLM(doubles, trainable=True)
    optimize(lm)
    top = [r for r in runs_of(client, experiment_id) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in top] == [first.info.run_id]  # the same MLflow run, continued
    assert top[0].info.status == "FINISHED"
    steps = children(client, experiment_id, first.info.run_id)
    assert [r.data.tags["tandem.step"] for r in steps] == ["zero-shot", "p", "p-w"]  # none twice
    assert len(client.get_metric_history(steps[0].info.run_id, "val")) == 1  # a step reported before is left alone
    assert [m.step for m in client.get_metric_history(first.info.run_id, "val")] == [0, 1, 2]
    # The resumed step's traces are its own calls: one span per module call, in the order the LM saw them.
    traces = client.search_traces(locations=[experiment_id], run_id=steps[2].info.run_id)
    seen = [r.messages for r in lm.requests]
    for trace in traces:
        spans = sorted(trace.data.spans, key=lambda s: s.start_time_ns)[1:]
        assert [s.name for s in spans] == ["rewrite", "answer"]
        assert all(tuple(s.inputs["messages"]) in seen for s in spans)


def test_an_unreachable_tracking_server_is_a_warning_and_changes_no_result(tiny_model_dir, cache_dir, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["optimize", "--task", "iris", "--model", tiny_model_dir, "--strategy", "p", *SMALL, "--no-cache"]
    plain = tandem(*args, "--run-dir", str(tmp_path / "plain"))
    tracked = tandem(*args, "--run-dir", str(tmp_path / "tracked"), "--track", "mlflow",
                     env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert plain.returncode == 0 and tracked.returncode == 0, tracked.stderr
    assert f"tandem.tracking: MLflow failed opening the store http://127.0.0.1:{port}" in tracked.stderr
    assert "the run goes on untracked" in tracked.stderr and "Traceback" not in tracked.stderr

    def results(folder):
        steps = json.loads((tmp_path / folder / "results-p.json").read_text())["steps"]
        return [{k: v for k, v in s.items() if k != "seconds"} for s in steps]

    assert results("tracked") == results("plain")


def test_an_experiment_grid_has_a_run_per_seed_and_strategy(tiny_model_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "grid"
    out = tandem("experiment", "--task", "iris", "--model", tiny_model_dir, "--strategies", "vanilla, p", "--seeds",
                 "2", "--run-dir", str(run_dir), *SMALL, "--track", "mlflow", "--track-traces", "1",
                 env={"MLFLOW_TRACKING_URI": None})
    assert out.returncode == 0, out.stderr
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("tandem-iris").experiment_id
    (grid,) = [r for r in runs_of(client, experiment_id) if "mlflow.parentRunId" not in r.data.tags]
    assert grid.info.run_name == "grid (experiment)" and {"report.md", "cells.json"} <= {
        a.path for a in client.list_artifacts(grid.info.run_id)}
    cells = {(c["strategy"], c["seed"]): c for c in json.loads((run_dir / "cells.json").read_text())}
    runs = children(client, experiment_id, grid.info.run_id)
    assert sorted((r.data.tags["tandem.strategy"], int(r.data.tags["tandem.seed"])) for r in runs) == sorted(cells)
    for run in runs:
        cell = cells[(run.data.tags["tandem.strategy"], int(run.data.tags["tandem.seed"]))]
        assert run.data.metrics["test"] == pytest.approx(cell["test"])  # the cell: its strategy's last step
        assert run.data.params["settings.seed"] == str(cell["seed"])
        assert len(children(client, experiment_id, run.info.run_id)) == (2 if cell["strategy"] == "Π" else 1)


def test_without_mlflow_the_flag_is_one_line_saying_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    with pytest.raises(UsageError, match=r"--track mlflow needs MLflow: pip install 'tandem\[mlflow\]'"):
        open_tracker(TrackingSettings(track="mlflow"), tmp_path, "x")
    from tandem.cli import main

    assert main(["eval", "--task", "iris", "--model", "m", "--track", "mlflow"]) == 2
    assert capsys.readouterr().err.strip() == "tandem: error: --track mlflow needs MLflow: pip install 'tandem[mlflow]'"
    assert not (tmp_path / "mlflow").exists()
