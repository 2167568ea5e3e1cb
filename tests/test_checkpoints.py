"""Weight steps do no harm, by validation: w and w+ keep the best of their checkpoints and their start
on val (never test), `keep_checkpoint="last"` keeps the last as the paper did. Selection logic with a
scripted LM whose replies depend on the checkpoint; the checkpoints themselves on the tiny model with
real peft."""

import json
from pathlib import Path

import pytest

from test_policy import SPECIES, Classify, flowers, metric  # the same flowers program as the r step's tests

from tandem import ScriptedLM
from tandem.optimizers import OptimizeSettings, WeightSettings, better_together, bootstrap_finetune
from tandem.settings import LoraSettings, resolve_budget
from tandem.training.lora import checkpoint_steps

def step_of(adapter):
    """The optimizer step a scripted adapter folder was written at (checkpoints/step-0002 -> 2; the last
    one, `adapter`, says it in its config); 0 for none."""
    return json.loads((Path(adapter) / "adapter_config.json").read_text())["step"] if adapter else 0


def replies(right_on):
    """Replies right on the flowers `right_on(split, step)` says, else 'setosa'; the start (step 0) is right
    on the training flowers, so that the weight step has runs to train on."""
    def respond(request):
        flower = request.messages[-1]["content"].split("Flower: ")[1].split("\n")[0]
        split, _, i = flower.split()
        step = step_of(request.adapter)
        gold = SPECIES[int(i) % 3]
        right = split == "train" if step == 0 else right_on(split, step)
        return f"Reasoning: the petals of this flower say it\nSpecies: {gold if right else 'setosa'}"
    return respond


def weight_step(tmp_path, respond, epochs=3, **settings):
    lm = ScriptedLM(respond, trainable=True)
    weights = WeightSettings(lora=LoraSettings(epochs=epochs), min_calls=1, **settings)
    result = better_together(Classify(), lm, "w", flowers("train", 6), flowers("val", 6), flowers("test", 6), metric,
                             OptimizeSettings(weights=weights), run_dir=tmp_path, progress=False)
    return lm, result


def test_the_kept_checkpoint_is_the_best_by_val_while_test_prefers_another(tmp_path):
    # step 1: right on val only; step 2: right on test only; step 3 (the last): right on neither
    lm, result = weight_step(tmp_path, replies(lambda split, step: (split, step) in {("val", 1), ("test", 2)}))
    zero, w = result.steps
    assert w.details["kept_step"] == 1 and step_of(result.program.adapter) == 1
    assert Path(result.program.adapter) == (tmp_path / "w" / "checkpoints" / "step-0001").resolve()
    assert [c["step"] for c in w.details["checkpoints"]] == [0, 1, 2, 3]
    assert [c["val"] for c in w.details["checkpoints"]] == [zero.val, 100.0, pytest.approx(100 / 3), pytest.approx(100 / 3)]
    assert w.val == 100.0 and w.test == pytest.approx(100 / 3)  # test scored the kept one, never chose it
    assert w.details["notes"][-1].startswith("kept step 1 (epoch 1): val 100.0, the best on val (the start: val 33.3")
    # Test was never run with any checkpoint but the kept one: choosing read val only.
    tested = {step_of(r.adapter) for r in lm.requests if "test flower" in r.messages[-1]["content"]}
    assert tested == {0, 1}  # the zero-shot row's test, and the kept step's
    report = (tmp_path / "report-w.md").read_text()
    assert "| step 1 ← kept | 1 | 100.0 |" in report and (tmp_path / "w" / "checkpoints.png").exists()


def test_a_weight_step_worse_than_its_start_at_every_checkpoint_returns_the_start(tmp_path):
    lm = ScriptedLM(replies(lambda split, step: False), trainable=True)
    program = Classify()
    program.classify.demos = [{"flower": "train flower 0", "species": "setosa"}]
    start = program.get_state()
    result = bootstrap_finetune(program, lm, flowers("train", 6), flowers("val", 6), metric,
                                WeightSettings(lora=LoraSettings(epochs=2), min_calls=1), out_dir=tmp_path, progress=False)
    assert result.trained and result.kept_step == 0
    assert result.program.get_state() == start and result.program.adapter is None  # demos kept, no adapter
    assert [c.step for c in result.checkpoints] == [0, 1, 2]
    assert result.notes[-1].startswith("kept the start: no checkpoint beat its val ")
    assert "collapsed: 'setosa' for 6/6" in result.notes[-1]


def test_a_tie_keeps_the_start_and_keep_last_keeps_the_last_checkpoint(tmp_path):
    alike = replies(lambda split, step: split == "train")  # every checkpoint scores as the start does on val
    _, tie = weight_step(tmp_path / "tie", alike)
    assert tie.steps[1].details["kept_step"] == 0 and tie.program.adapter is None
    lm, last = weight_step(tmp_path / "last", replies(lambda split, step: False), keep_checkpoint="last")
    assert step_of(last.steps[1].details["adapter"]) == 3 and "checkpoints" not in last.steps[1].details
    assert not (tmp_path / "last" / "w" / "checkpoints").exists()
    # keep last runs no val but the step's own score: one val pass for zero-shot, one for w
    assert sum("val flower" in r.messages[-1]["content"] for r in lm.requests) == 2 * 6


def test_the_paper_budget_keeps_the_last_checkpoint_and_tiny_scores_every_fourth_step():
    assert resolve_budget("paper", "iris").optimize.weights.keep_checkpoint == "last"
    tiny = resolve_budget("tiny", "iris").optimize.weights
    assert tiny.keep_checkpoint == "best" and tiny.lora.checkpoint_every == 4


def test_checkpoint_steps_fall_at_epoch_ends_or_every_n_steps_and_always_at_the_last():
    # 7 calls a process per epoch, 3 micro-batches a step, 5 epochs: 35 micro-batches, 12 steps
    assert checkpoint_steps(12, 7, 3, 5, 0) == [3, 5, 7, 10, 12]  # the first step at or after 7, 14, 21, 28, 35
    assert checkpoint_steps(12, 7, 3, 5, 4) == [4, 8, 12]
    assert checkpoint_steps(12, 7, 3, 5, 5) == [5, 10, 12]
    assert checkpoint_steps(1, 1, 1, 1, 0) == [1]


def test_train_lora_saves_each_checkpoint_as_a_loadable_adapter(tiny_model_dir, tmp_path):
    """Real peft on the tiny model: every checkpoint is a PEFT folder the engine serves, and they differ."""
    from tandem.lm import Request
    from tandem.lm.local import LocalLM
    from tandem.training.lora import finetune

    lm = LocalLM(tiny_model_dir, dtype="float32")
    calls = [[{"role": "user", "content": f"Thing {i}"}, {"role": "assistant", "content": f"Color: {c}"}]
             for i, c in enumerate(["blue", "green", "red", "white"])]
    settings = LoraSettings(rank=4, alpha=8, learning_rate=5e-3, epochs=3, batch_size=2, min_steps=1)
    report = finetune(lm, calls, tmp_path / "adapter", settings, progress=False, checkpoint_dir=tmp_path / "checkpoints")
    # 4 calls, batch 2: 2 steps an epoch, 3 epochs: checkpoints after steps 2, 4 and 6 (the adapter itself)
    assert [c["step"] for c in report.checkpoints] == [2, 4, 6] and report.steps == 6
    assert [c["epoch"] for c in report.checkpoints] == [1.0, 2.0, 3.0]
    paths = [Path(c["path"]) for c in report.checkpoints]
    assert paths == [tmp_path / "checkpoints" / "step-0002", tmp_path / "checkpoints" / "step-0004", tmp_path / "adapter"]
    assert all((p / "adapter_model.safetensors").exists() for p in paths)
    prompt = (tuple(calls[0][:1]),)
    logits = []
    for p in paths:
        with lm.using_adapter(str(p)) as model:
            import torch

            ids = lm.tokenizer(lm.prompt_text(list(prompt[0])), return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])
    assert lm.generate([Request(prompt[0], max_new_tokens=4, adapter=str(paths[0]))])[0].text is not None
    report_file = json.loads((tmp_path / "adapter" / "training.json").read_text())
    assert [c["step"] for c in report_file["checkpoints"]] == [2, 4, 6]
    lm.close()


def test_an_r_step_with_keep_last_returns_its_last_round_whatever_val_says(tmp_path):
    from dataclasses import replace

    from test_policy import SETTINGS, Trainer, round_of, sampled_reply

    lm = Trainer(sampled_reply)
    settings = OptimizeSettings(policy=replace(SETTINGS, rounds=2), weights=WeightSettings(keep_checkpoint="last"))
    result = better_together(Classify(), lm, "r", flowers("train", 6), flowers("val", 3), flowers("test", 3), metric,
                             settings, run_dir=tmp_path, progress=False)
    step = result.steps[-1]
    # by val it would be round 1 (tests/test_policy.py); the paper's setting keeps the last
    assert step.details["best_round"] == 2 and round_of(step.details["adapter"]) == 2
    assert "(the last: keep_checkpoint=last)" in step.details["notes"][0]


def test_a_prompt_step_keeps_its_start_where_no_candidate_beats_it_on_val():
    """`start` is a candidate of its own where the program comes with demos (Π→Π, Π→Θ→Π after a weight
    step that kept its start): first, so a tie keeps it; its val score is taken from the step before."""
    from tandem.answers import ValScore
    from tandem.optimizers import PromptSettings, bootstrap_fewshot_rs

    def respond(request):  # right only with the start's own demo in the prompt
        text = " ".join(m["content"] for m in request.messages)
        flower = request.messages[-1]["content"].split("Flower: ")[1].split("\n")[0]
        gold = SPECIES[int(flower.split()[-1]) % 3]
        return f"Reasoning: the petals of this flower say it\nSpecies: {gold if 'magic' in text else 'setosa'}"

    lm = ScriptedLM(respond)
    program = Classify()
    program.classify.demos = [{"flower": "magic flower 0", "species": "setosa"}]
    val = flowers("val", 6)
    result = bootstrap_fewshot_rs(program, lm, flowers("train", 6), val, metric, PromptSettings(num_candidates=2),
                                  progress=False, start=ValScore(100.0))
    assert result.best == "start" and result.program.get_state() == program.get_state()
    assert [c.name for c in result.candidates][:2] == ["start", "zero-shot"]
    assert all(c.val_score < 100.0 for c in result.candidates[1:])
    assert not any("magic" in str(r.messages) and "val flower" in r.messages[-1]["content"] for r in lm.requests)
    fresh = bootstrap_fewshot_rs(Classify(), ScriptedLM(respond), flowers("train", 6), val, metric,
                                 PromptSettings(num_candidates=2), progress=False)
    assert "start" not in [c.name for c in fresh.candidates]  # without demos the start is the zero-shot candidate
