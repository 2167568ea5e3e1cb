"""Learning is a tested property: a tiny real model, trained through the real peft path, learns a mapping
that depends on one input token and answers held-out inputs right (the way TRL and torchtune test their
trainers: a run that only lowers a loss can still learn nothing the task needs)."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from tandem.lm import Request
from tandem.lm.local import LocalLM
from tandem.program import Predict
from tandem.prompts import parse_reply, render_messages, render_reply, reply_format
from tandem.settings import LoraSettings
from tandem.training.lora import finetune
from tandem.training.reports import TrainingCall

SIGNATURE = Predict("sentence -> action: stop|go|wait", "Say what a driver does at the light in the sentence.").signature
ACTIONS = {"red": "stop", "green": "go", "yellow": "wait"}
NOUNS = ("light", "lamp", "signal", "bulb", "sign", "arrow")
# Held out: one sentence of each colour, each with a noun the training sentences pair with the other colours.
HELD_OUT = {("lamp", "red"), ("sign", "green"), ("arrow", "yellow")}


def rows(held_out: bool):
    return [({"sentence": f"The {noun} is {colour} now."}, ACTIONS[colour])
            for noun, colour in itertools.product(NOUNS, ACTIONS) if ((noun, colour) in HELD_OUT) == held_out]


def answers(lm, examples, adapter):
    requests = [Request(tuple(render_messages(SIGNATURE, [], inputs)), max_new_tokens=8, adapter=adapter,
                        format=reply_format(SIGNATURE)) for inputs, _ in examples]
    return [parse_reply(SIGNATURE, c.text)["action"] for c in lm.generate(requests)]


@pytest.fixture(scope="module")
def learner_dir(tmp_path_factory, embedded_model_dir) -> str:
    """A 2-layer Llama with random weights, like `tiny_model_dir`, but with no padding row in its embedding:
    SmolLM2's pad token is its end-of-turn token, and a padding row (zero, tied to the output, never trained)
    would leave a model unable ever to end a reply."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("learner")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
                         tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def learned(learner_dir, tmp_path_factory):
    lm = LocalLM(learner_dir, dtype="float32")
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    conversations = [TrainingCall(render_messages(SIGNATURE, [], inputs)
                                  + [{"role": "assistant", "content": render_reply(SIGNATURE, {"action": a})}], a)
                     for inputs, a in rows(held_out=False)]
    out = tmp_path_factory.mktemp("learn") / "adapter"
    settings = LoraSettings(rank=8, alpha=16, learning_rate=2e-2, epochs=20, batch_size=3, micro_batch_size=3)
    report = finetune(lm, conversations, out, settings, progress=False)
    yield lm, base, out, report
    lm.close()


def test_held_out_inputs_are_answered_by_the_one_token_that_decides(learned):
    lm, _, out, _ = learned
    before = answers(lm, rows(held_out=False) + rows(held_out=True), None)
    assert len(set(before)) == 1  # the random model answers one action whatever the colour
    assert answers(lm, rows(held_out=False), str(out)) == [a for _, a in rows(held_out=False)]
    assert answers(lm, rows(held_out=True), str(out)) == [a for _, a in rows(held_out=True)]


def test_training_moves_the_adapter_and_leaves_the_base_weights_alone(learned):
    lm, base, out, report = learned
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # peft starts every B at zero
    model = lm.model.base_model.model if hasattr(lm.model, "base_model") else lm.model
    now = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert now.keys() == base.keys()
    assert all((now[k] == base[k]).all() for k in base)
    assert report.last_loss < 0.2 * report.first_loss
