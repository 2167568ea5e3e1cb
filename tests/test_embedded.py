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


@pytest.mark.slow
def test_a_weight_step_on_gold_labels_learns_its_training_flowers(tmp_path):
    """The embedded model, one flower of each species, a w+ step that rationalizes the two it gets wrong with
    their gold species: the adapter answers all three right, where the model alone answers one species."""
    from tandem import Predict, Program, load_lm
    from tandem.optimizers import WeightSettings, bootstrap_finetune
    from tandem.settings import ExtendedWeightSettings, LoraSettings
    from tandem.tasks import load_task
    from tandem.tasks.iris import FEATURES, INSTRUCTIONS, SPECIES

    class Flowers(Program):
        def __init__(self):
            self.classify = Predict(f"{', '.join(FEATURES)} -> species: {'|'.join(SPECIES)}", INSTRUCTIONS)

        def forward(self, run, **measurements):
            return self.classify(run, **measurements)

    task = load_task("iris")
    train = [next(r for r in task.train if r.species == s) for s in SPECIES]
    lm = load_lm("smollm2-135m", dtype="float32")
    settings = WeightSettings(lora=LoraSettings(learning_rate=3e-3, batch_size=3, epochs=1, min_steps=60,
                                                checkpoint_every=20), extended=ExtendedWeightSettings(samples=0),
                              min_calls=3, train_curve=3)
    result = bootstrap_finetune(Flowers(), lm, train, train, task.metric, settings, out_dir=tmp_path, progress=False,
                                extended=True)
    start, *trained = result.checkpoints
    assert result.conversations == 3 and start.train < 50  # the model alone answers one species
    assert max(c.train for c in trained) == 100.0  # a checkpoint answers all three right
    kept = next(c for c in result.checkpoints if c.step == result.kept_step)
    assert kept.train == 100.0 and kept.val == 100.0  # val is the training flowers here: it keeps one
    lm.close()
