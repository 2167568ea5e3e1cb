"""LoRA fine-tuning through the real peft path on the tiny local model."""

import json
from dataclasses import replace

import pytest

from tandem.lm import Request
from tandem.lm.local import LocalLM
from tandem.errors import ConfigError
from tandem.settings import LoraSettings
from tandem.training.lora import finetune, lr_factor, stratified, tokenize_chat


def conversations():
    return [
        [{"role": "system", "content": "Name the color."}, {"role": "user", "content": f"Thing: {thing}"},
         {"role": "assistant", "content": f"Color: {color}"}]
        for thing, color in [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
                             ("blood", "red"), ("sun", "yellow"), ("night", "black"), ("sea", "blue")]
    ]


def prompts():
    return [Request(tuple(c[:-1]), max_new_tokens=6) for c in conversations()]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    lm = LocalLM(tiny_model_dir, dtype="float32")
    before = [c.text for c in lm.generate(prompts())]
    out = tmp_path_factory.mktemp("run") / "adapter"
    settings = LoraSettings(rank=8, alpha=16, learning_rate=1e-2, epochs=8, batch_size=4, micro_batch_size=4)
    report = finetune(lm, conversations(), out, settings, progress=False)
    after = [c.text for c in lm.generate([Request(r.messages, r.max_new_tokens, adapter=str(out)) for r in prompts()])]
    yield lm, out, report, before, after
    lm.close()


def test_loss_is_only_on_the_assistant_reply(tiny_model_dir):
    lm = LocalLM(tiny_model_dir, dtype="float32")
    ids, labels, _ = tokenize_chat(lm.tokenizer, lm.prompt_text, conversations()[0])
    target = [t for t in labels if t != -100]
    assert len(ids) == len(labels) and 0 < len(target) < len(ids)
    assert lm.tokenizer.decode(target).startswith("Color: blue")
    assert labels[: len(ids) - len(target)] == [-100] * (len(ids) - len(target))
    lm.close()


def test_loss_from_leaves_the_reasoning_in_the_sequence_untaught(tiny_model_dir):
    lm = LocalLM(tiny_model_dir, dtype="float32")
    reply = "Reasoning: the sky is up there, so blue\nColor: blue"
    conversation = conversations()[0][:-1] + [{"role": "assistant", "content": reply}]
    whole_ids, whole, _ = tokenize_chat(lm.tokenizer, lm.prompt_text, conversation)
    ids, labels, _ = tokenize_chat(lm.tokenizer, lm.prompt_text, conversation, loss_from=reply.index("Color:"))
    assert ids == whole_ids  # the same sequence: only what is taught differs
    taught = [t for t in labels if t != -100]
    assert lm.tokenizer.decode(taught).startswith("Color: blue") and "sky" not in lm.tokenizer.decode(taught)
    assert taught == [t for t in whole if t != -100][-len(taught):]
    lm.close()


def test_the_loss_from_the_taught_positions_alone_equals_the_loss_from_all_logits(tiny_model_dir):
    """reply_loss asks the model for logits only from the first taught token on (`logits_to_keep`): the
    same per-call losses as from the whole sequence's logits, rows of unequal length padded on the right."""
    import contextlib

    from tandem.training import lora

    lm = LocalLM(tiny_model_dir, dtype="float32")
    reply = "Reasoning: the sky is up there, so blue\nColor: blue"
    long = conversations()[0][:-1] + [{"role": "assistant", "content": reply}]
    rows = [tokenize_chat(lm.tokenizer, lm.prompt_text, long, loss_from=reply.index("Color:")),
            tokenize_chat(lm.tokenizer, lm.prompt_text, conversations()[1])]
    assert len(rows[0][0]) != len(rows[1][0])
    pad = lm.tokenizer.pad_token_id
    widths = []

    def spy(input_ids, attention_mask, logits_to_keep):
        out = lm.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
        widths.append((out.logits.shape[1], input_ids.shape[1]))
        return out

    kept = lora.reply_loss(spy, rows, pad, "cpu", contextlib.nullcontext())
    assert widths[0][0] < widths[0][1]  # fewer positions than the sequence's

    def whole(input_ids, attention_mask, **ignored):
        return lm.model(input_ids=input_ids, attention_mask=attention_mask)

    assert lora.reply_loss(whole, rows, pad, "cpu", contextlib.nullcontext()).tolist() == pytest.approx(kept.tolist(),
                                                                                                        rel=1e-5)
    lm.close()


def test_the_untaught_kl_term_is_the_divergence_at_the_reasoning_tokens_alone(tiny_model_dir):
    """With `hold`, each call's loss adds hold times its mean KL(base || model) over the reply's untaught
    tokens: none from the prompt, none from the taught answer, nothing from a call without reasoning, and
    nothing at all while the model is its base."""
    import contextlib

    import torch

    from tandem.training import lora

    lm = LocalLM(tiny_model_dir, dtype="float32")
    reply = "Reasoning: the sky is up there, so blue\nColor: blue"
    long = conversations()[0][:-1] + [{"role": "assistant", "content": reply}]
    rows = [tokenize_chat(lm.tokenizer, lm.prompt_text, long, loss_from=reply.index("Color:")),
            tokenize_chat(lm.tokenizer, lm.prompt_text, conversations()[1])]
    pad, cpu = lm.tokenizer.pad_token_id, contextlib.nullcontext()
    plain = lora.reply_loss(lm.model, rows, pad, "cpu", cpu)
    assert lora.reply_loss(lm.model, rows, pad, "cpu", cpu, 2.0, lm.model).tolist() == pytest.approx(plain.tolist())

    def shifted(input_ids, attention_mask, logits_to_keep):  # a "base" whose every distribution differs
        out = lm.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
        out.logits = out.logits * 0.5 + torch.linspace(0, 1, out.logits.shape[-1])
        return out

    held = lora.reply_loss(lm.model, rows, pad, "cpu", cpu, 2.0, shifted)
    assert float(held[1]) == pytest.approx(float(plain[1]))  # no untaught reply tokens: no term
    ids, labels, start = rows[0]
    taught = next(i for i, t in enumerate(labels) if t != -100)
    assert start < taught
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0]
    ref = torch.log_softmax(logits * 0.5 + torch.linspace(0, 1, logits.shape[-1]), -1)[start - 1 : taught - 1]
    mine = torch.log_softmax(logits, -1)[start - 1 : taught - 1]
    expected = (ref.exp() * (ref - mine)).sum(-1).mean()
    assert float(held[0] - plain[0]) == pytest.approx(2.0 * float(expected), rel=1e-4)
    assert float(expected) > 0.01
    lm.close()


def test_stratified_steps_hold_the_classes_in_their_shares():
    import random

    labels = ["a"] * 30 + ["b"] * 20 + ["c"] * 10
    order = [i for batch in stratified(labels, 1, random.Random(0)) for i in batch]
    assert sorted(order) == list(range(60))
    for start in range(0, 60, 6):  # any step of 6 consecutive calls: 3 a, 2 b, 1 c, give or take one
        step = [labels[i] for i in order[start:start + 6]]
        assert abs(step.count("a") - 3) <= 1 and abs(step.count("b") - 2) <= 1 and abs(step.count("c") - 1) <= 1
    assert stratified(labels, 4, random.Random(0))[0] == order[:4]


def test_training_lowers_the_loss_and_writes_a_peft_adapter(trained):
    _, out, report, _, _ = trained
    assert report.last_loss < 0.7 * report.first_loss
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert json.loads((out / "training.json").read_text())["examples"] == 8
    assert not any(out.parent.glob("*.tmp"))


def test_trained_adapter_changes_greedy_outputs_and_base_is_untouched(trained):
    lm, _, _, before, after = trained
    assert after != before
    assert [c.text for c in lm.generate(prompts())] == before  # base weights still serve adapter-less requests


def test_saved_adapter_reloads_to_the_same_outputs(trained, tiny_model_dir):
    _, out, _, _, after = trained
    fresh = LocalLM(tiny_model_dir, dtype="float32")
    again = [c.text for c in fresh.generate([Request(r.messages, r.max_new_tokens, adapter=str(out)) for r in prompts()])]
    assert again == after
    fresh.close()


def test_lora_settings_name_the_bad_field():
    with pytest.raises(ConfigError, match="rank must be >= 1") as info:
        LoraSettings(rank=0)
    assert info.value.field == "rank"
    with pytest.raises(ConfigError, match="learning_rate must be < 1"):
        LoraSettings(learning_rate=2.0)


def test_a_handful_of_examples_still_gets_several_optimizer_steps(tiny_model_dir, tmp_path):
    lm = LocalLM(tiny_model_dir, dtype="float32")
    settings = LoraSettings(epochs=2, batch_size=8, micro_batch_size=1, min_steps=1)
    report = finetune(lm, conversations()[:3], tmp_path / "adapter", settings, progress=False)
    assert report.steps == 6  # batch shrinks to 1 for 3 examples: 3 steps an epoch, not one step in all
    # 4 calls make 2 steps an epoch (batch 2): min_steps repeats the data, whole epochs, until 7 steps are made
    report = finetune(lm, conversations()[:4], tmp_path / "more", replace(settings, min_steps=7), progress=False)
    assert (report.epochs, report.steps) == (4, 8)
    lm.close()


def test_training_again_after_serving_an_adapter(trained, tmp_path):
    lm, first, _, _, after = trained  # the fixture generated with `first`, loading it during inference
    settings = LoraSettings(rank=4, alpha=8, learning_rate=1e-2, epochs=2, batch_size=4, micro_batch_size=4, seed=1)
    report = finetune(lm, conversations(), tmp_path / "second", settings, progress=False)
    assert report.steps > 0 and (tmp_path / "second" / "adapter_model.safetensors").exists()
    again = [c.text for c in lm.generate([Request(r.messages, r.max_new_tokens, adapter=str(first)) for r in prompts()])]
    assert again == after  # the first adapter still serves the same replies


def test_learning_rate_warms_up_and_never_reaches_zero_before_the_end():
    # The old schedule on a 6-step run: 1.0, .905, .655, .345, .095, 0.0 (no warm-up, last step wasted).
    factors = [lr_factor(step, 6, warmup_ratio=0.1, floor=0.1) for step in range(6)]
    assert factors[0] < factors[1] == 1.0  # warm-up first
    assert all(a > b for a, b in zip(factors[1:], factors[2:]))  # then a steady decay
    assert factors[-1] == pytest.approx(0.1) and min(factors) > 0
    assert lr_factor(0, 1, 0.1, 0.1) == 1.0  # a single step trains at the full rate


def test_the_loop_makes_exactly_the_optimizer_steps_it_reports(tiny_model_dir, tmp_path):
    import torch

    stepped = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: stepped.append(1))
    lm = LocalLM(tiny_model_dir, dtype="float32")
    rng_before = torch.get_rng_state()
    try:
        settings = LoraSettings(epochs=3, batch_size=4, micro_batch_size=2, min_steps=1)  # 8 calls: 2 steps an epoch
        report = finetune(lm, conversations(), tmp_path / "adapter", settings, progress=False)
    finally:
        handle.remove()
        lm.close()
    assert report.steps == len(stepped) == len(report.learning_rates) == 6  # 8 calls, micro-batches of 2, 2 of them a step
    assert min(report.learning_rates) > 0
    assert torch.equal(torch.get_rng_state(), rng_before)  # LoRA init was seeded in a fork: no global seed left behind


def test_over_long_calls_are_left_out_and_counted_never_cut(tiny_model_dir, tmp_path):
    lm = LocalLM(tiny_model_dir, dtype="float32")
    long = [[*c[:-2], {"role": "user", "content": "Thing: " + "very " * 200 + "long"}, c[-1]] for c in conversations()[:2]]
    try:
        report = finetune(lm, conversations()[:4] + long, tmp_path / "adapter", LoraSettings(epochs=1, max_length=128),
                             progress=False)
        assert report.examples == 4 and report.dropped_too_long == 2
        with pytest.raises(ConfigError, match="max_length"):
            finetune(lm, long, tmp_path / "none", LoraSettings(epochs=1, max_length=128), progress=False)
    finally:
        lm.close()


def test_training_under_a_launcher_runs_data_parallel_and_the_engine_serves_it(tiny_model_dir, tmp_path):
    """torchrun with 2 processes on the CPU (gloo): each takes half the micro-batches, one adapter comes out."""
    import json
    import sys

    from tandem.lm import Request
    from tandem.lm.local import LocalLM
    from tandem.training.launch import launch
    from tandem.settings import LoraSettings

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"Answer: {i}"}]}
            for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    settings = LoraSettings(rank=4, alpha=8, epochs=2, batch_size=4, min_steps=1)
    report = launch(f"{sys.executable} -m torch.distributed.run --nproc-per-node 2", tiny_model_dir, "float32",
                    tmp_path / "train.jsonl", tmp_path / "adapter", settings)
    # 8 calls, 2 processes: 4 micro-batches each per epoch, 2 per optimizer step -> 2 steps an epoch
    assert report.steps == 4 and report.examples == 8
    assert json.loads((tmp_path / "adapter" / "training.json").read_text())["processes"] == 2
    lm = LocalLM(tiny_model_dir, dtype="float32")
    request = Request(({"role": "user", "content": "q1"},), max_new_tokens=4)
    _, tuned = lm.generate([request, Request(request.messages, max_new_tokens=4, adapter=str(tmp_path / "adapter"))])
    assert tuned.completion_tokens >= 1 and lm._adapters  # served by path like any adapter
    lm.close()
