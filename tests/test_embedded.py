"""The embedded SmolLM2-135M end to end (slow: deselect with -m 'not slow')."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_eval_iris_on_the_embedded_model(cache_dir):
    import os

    env = dict(os.environ, TANDEM_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "tandem", "eval", "--task", "iris", "--model", "smollm2-135m", "--split", "test",
         "--limit", "6", "--max-new-tokens", "48"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert out.returncode == 0, out.stderr
    assert "iris test (constrained): score" in out.stdout and "on 6 examples, 0 failed" in out.stdout


@pytest.mark.slow
def test_better_together_on_iris_with_the_embedded_model(cache_dir, tmp_path):
    import json
    import os

    env = dict(os.environ, TANDEM_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1")
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "tandem", "optimize", "--task", "iris", "--model", "smollm2-135m", "--strategy", "p -> w -> p",
         "--run-dir", str(run_dir), "--train-size", "8", "--val-size", "6", "--test-size", "6", "--num-candidates", "1",
         "--epochs", "1", "--max-new-tokens", "40"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads((run_dir / "results-p-w-p.json").read_text())
    assert [s["prefix"] for s in results["steps"]] == ["zero-shot", "p", "p-w", "p-w-p"]
    weight_step = results["steps"][2]["details"]
    assert weight_step["trained"] is False or (run_dir / "p-w" / "adapter" / "adapter_model.safetensors").exists()
