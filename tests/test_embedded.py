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
    assert "iris test: score" in out.stdout and "on 6 examples" in out.stdout
