"""The real command line, run as a user runs it."""

import json
import subprocess
import sys

import pytest


def tandem(*args, env_extra=None, cwd=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.parametrize("task,needle", [("gsm8k", "Question:"), ("iris", "Petal Width:"), ("hotpotqa", "module: generate_answer")])
def test_show_prompt_prints_every_module_without_a_model(task, needle):
    out = tandem("show-prompt", "--task", task)
    assert out.returncode == 0, out.stderr
    assert "--- system ---" in out.stdout and needle in out.stdout


def test_wrong_task_is_one_clear_line():
    out = tandem("eval", "--task", "mnist", "--model", "smollm2-135m")
    assert out.returncode != 0
    assert "unknown task 'mnist'" in out.stderr and "Traceback" not in out.stderr


def test_missing_data_folder_is_one_clear_line(tmp_path):
    out = tandem("eval", "--task", "gsm8k", "--model", "smollm2-135m", "--data-dir", str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert "data file not found" in out.stderr and "--data-dir" in out.stderr and "Traceback" not in out.stderr


def test_unknown_model_is_one_clear_line():
    out = tandem("eval", "--task", "iris", "--model", "no-such-model", "--limit", "2")
    assert out.returncode == 1  # the model cannot be reached: a runtime error, not a usage error
    assert "unknown model 'no-such-model'" in out.stderr and "Traceback" not in out.stderr


def test_bad_number_names_the_flag():
    out = tandem("eval", "--task", "iris", "--model", "smollm2-135m", "--limit", "0")
    assert out.returncode == 2 and "--limit must be >= 1" in out.stderr


def test_eval_on_a_local_model_folder_prints_score_and_writes_traces(tiny_model_dir, cache_dir, tmp_path):
    output = tmp_path / "results.jsonl"
    args = ["eval", "--task", "iris", "--model", tiny_model_dir, "--split", "test", "--limit", "4",
            "--max-new-tokens", "8", "--output", str(output)]
    out = tandem(*args, env_extra={"TANDEM_CACHE_DIR": str(cache_dir)})
    assert out.returncode == 0, out.stderr
    assert "iris test (constrained): score" in out.stdout and "on 4 examples" in out.stdout
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 4 and all(row["trace"][0]["messages"] for row in rows)
    again = tandem(*args, env_extra={"TANDEM_CACHE_DIR": str(cache_dir)})
    assert "(4 from cache)" in again.stdout


def test_optimize_writes_the_run_folder_and_refuses_a_changed_config(tiny_model_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["optimize", "--task", "iris", "--model", tiny_model_dir, "--strategy", "p -> w", "--run-dir", str(run_dir),
            "--train-size", "3", "--val-size", "3", "--test-size", "3", "--num-candidates", "1", "--epochs", "1",
            "--min-calls", "1", "--max-new-tokens", "6", "--threads", "4"]
    env = {"TANDEM_CACHE_DIR": str(cache_dir)}
    out = tandem(*args, env_extra=env)
    assert out.returncode == 0, out.stderr
    assert "zero-shot" in out.stdout and "p -> w" in out.stdout and "best program:" in out.stdout
    for step in ("zero-shot", "p", "p-w"):
        assert (run_dir / step / "step.json").exists() and (run_dir / step / "program.json").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["settings"]["weights"]["lora"]["rank"] == 16
    assert {name: split["size"] for name, split in config["data"].items()} == {"train": 3, "val": 3, "test": 3}
    assert config["lm"]["dtype"] in ("float32", "bfloat16") and set(config["versions"]) >= {"torch", "transformers", "peft"}
    results = json.loads((run_dir / "results-p-w.json").read_text())
    assert [s["prefix"] for s in results["steps"]] == ["zero-shot", "p", "p-w"]

    changed = tandem(*[a if a != "16" else "8" for a in args], "--seed", "1", env_extra=env)
    assert changed.returncode == 2 and "another configuration" in changed.stderr
    assert "(settings.seed: 0 -> 1)" in changed.stderr  # the field itself, not the whole settings block


def test_a_resume_with_dtype_auto_loads_the_dtype_its_folder_recorded(tiny_model_dir, cache_dir, tmp_path):
    run_dir, config_path = tmp_path / "run", tmp_path / "run" / "config.json"
    args = ["optimize", "--task", "iris", "--model", tiny_model_dir, "--strategy", "p", "--run-dir", str(run_dir),
            "--train-size", "2", "--val-size", "2", "--test-size", "2", "--num-candidates", "1",
            "--max-new-tokens", "4", "--threads", "2"]
    env = {"TANDEM_CACHE_DIR": str(cache_dir)}
    first = tandem(*args, env_extra=env)
    assert first.returncode == 0, first.stderr
    config = json.loads(config_path.read_text())
    probed = config["lm"]["dtype"]
    recorded = config["lm"]["dtype"] = {"float32": "bfloat16", "bfloat16": "float32"}[probed]  # as if the probe flipped
    config_path.write_text(json.dumps(config))
    again = tandem(*args, env_extra=env)
    assert again.returncode == 0, again.stderr
    assert f"recorded {recorded}; resuming in it" in again.stderr
    named = tandem(*args, "--dtype", probed, env_extra=env)  # a dtype the user names is still checked
    assert named.returncode == 2 and f"lm.dtype: '{recorded}' -> '{probed}'" in named.stderr


def test_bad_strategy_shows_the_valid_form(tmp_path):
    out = tandem("optimize", "--task", "iris", "--model", "smollm2-135m", "--strategy", "p -> q", "--run-dir", str(tmp_path))
    assert out.returncode == 2 and "joined by '->'" in out.stderr


def test_experiment_writes_table_report_and_chart_and_report_rebuilds(tiny_model_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "grid"
    env = {"TANDEM_CACHE_DIR": str(cache_dir)}
    out = tandem("experiment", "--task", "iris", "--model", tiny_model_dir, "--strategies", "vanilla, p", "--seeds", "2",
                 "--run-dir", str(run_dir), "--budget", "tiny", "--train-size", "3", "--val-size", "3",
                 "--test-size", "3", "--num-candidates", "1", "--max-new-tokens", "6", "--threads", "4", env_extra=env)
    assert out.returncode == 0, out.stderr
    assert "vanilla" in out.stdout and "Π" in out.stdout and "report:" in out.stdout
    config = json.loads((run_dir / "config.json").read_text())
    settings = config["settings"]
    assert settings["data"]["train_size"] == 3 and settings["optimize"]["weights"]["lora"]["epochs"] == 2  # override, preset
    assert (run_dir / "iris.png").read_bytes()[:4] == b"\x89PNG"
    (run_dir / "report.md").unlink()
    again = tandem("report", str(run_dir))
    assert again.returncode == 0 and (run_dir / "report.md").exists()
    assert len(json.loads((run_dir / "cells.json").read_text())) == 4
    more = tandem("experiment", "--task", "iris", "--model", tiny_model_dir, "--strategies", "vanilla, p", "--seeds", "3",
                  "--run-dir", str(run_dir), "--budget", "tiny", "--train-size", "3", "--val-size", "3",
                  "--test-size", "3", "--num-candidates", "1", "--max-new-tokens", "6", "--threads", "4", env_extra=env)
    assert more.returncode == 0, more.stderr  # a third seed extends the grid; seeds 0 and 1 are read back
    assert more.stderr.count("step zero-shot finished") == 1  # seed 2's, which its Π then reuses
    assert more.stderr.count("reusing finished steps") == 5
    assert len(json.loads((run_dir / "cells.json").read_text())) == 6


def test_a_bad_setting_exits_2_naming_the_flag_before_any_work():
    out = tandem("eval", "--task", "iris", "--model", "smollm2-135m", "--temperature", "-1")
    assert out.returncode == 2 and out.stderr.strip() == "tandem: error: --temperature must be >= 0, got -1.0"


def test_the_error_budget_is_one_line_and_exit_1_and_truncation_is_named(tiny_model_dir, cache_dir):
    args = ["eval", "--task", "iris", "--model", tiny_model_dir, "--limit", "6", "--max-new-tokens", "2", "--threads", "2"]
    env = {"TANDEM_CACHE_DIR": str(cache_dir)}
    out = tandem(*args, "--max-errors", "1", env_extra=env)
    assert out.returncode == 1 and "more than max_errors=1" in out.stderr and "Traceback" not in out.stderr
    ok = tandem(*args, env_extra=env)
    assert ok.returncode == 0 and "6 truncated at 2 tokens before Reasoning" in ok.stdout  # 2 tokens hold no "Reasoning:" label


def test_optimize_and_experiment_share_every_settings_flag():
    import re

    def flags(command):
        out = tandem(command, "--help")
        assert out.returncode == 0
        return set(re.findall(r"(--[a-z][a-z-]+)", out.stdout))

    optimize, experiment = flags("optimize"), flags("experiment")
    assert optimize - {"--strategy"} == experiment - {"--strategies", "--seeds"}
    assert {"--learning-rate", "--num-candidates", "--with-demos", "--temperature", "--budget"} <= optimize
    assert flags("eval") >= {"--temperature", "--max-new-tokens", "--threads", "--dtype", "--max-batch"}


def test_an_r_step_killed_mid_step_resumes_after_its_last_finished_round(tiny_model_dir, cache_dir, tmp_path):
    """kill -9 while `r` runs, rerun the same command: finished rounds are read back, never redone."""
    import os
    import signal
    import time

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "tandem", "optimize", "--task", "iris", "--model", tiny_model_dir, "--strategy", "r",
            "--run-dir", str(run_dir), "--train-size", "4", "--val-size", "2", "--test-size", "2", "--rounds", "4",
            "--round-examples", "2", "--group-size", "2", "--max-new-tokens", "24", "--threads", "4", "--rank", "4",
            "--alpha", "8"]
    env = dict(os.environ, TANDEM_CACHE_DIR=str(cache_dir))
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds = run_dir / "r" / "rounds"
    deadline = time.time() + 300
    while not (rounds / "001" / "round.json").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = sorted(p.parent.name for p in rounds.glob("*/round.json"))
    assert done and len(done) < 4, f"the kill should land mid-step, not after round 4: {done}"
    stamps = {name: (rounds / name / "round.json").stat().st_mtime_ns for name in done}

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"reusing {len(done)} finished rounds" in again.stderr
    assert sorted(p.parent.name for p in rounds.glob("*/round.json")) == ["001", "002", "003", "004"]
    assert {name: (rounds / name / "round.json").stat().st_mtime_ns for name in done} == stamps
    assert "report-r.md" in again.stdout and (run_dir / "report-r.md").exists()
