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


def reasoned(noun, colour, action):
    """A chain-of-thought call whose answer alone is taught: the reasoning before it stays as context."""
    reply = f"Reasoning: the {noun} is lit and the driver looks at it.\nAction: {action}"
    messages = render_messages(SIGNATURE, [], {"sentence": f"The {noun} is {colour} now."})
    return TrainingCall(messages + [{"role": "assistant", "content": reply}], action, reply.index("Action:"))


def reasoning_drift_and_answers(lm, learner_dir, adapter, calls):
    """The mean KL(base || adapted) over the calls' reasoning tokens, and whether the adapted model's greedy
    token is the taught one at every taught position (the answer, teacher-forced), per call."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tandem.training.lora import tokenize_chat

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(learner_dir), str(adapter)).eval()
    drift, right = [], []
    for call in calls:
        ids, labels, start = tokenize_chat(lm.tokenizer, lm.prompt_text, call.messages, call.loss_from)
        taught = [i for i, t in enumerate(labels) if t != -100]
        with torch.no_grad():
            adapted = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            with model.disable_adapter():
                base = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        drift.append(float((base.exp() * (base - adapted)).sum(-1)[start - 1 : taught[0] - 1].mean()))
        right.append(all(int(adapted[i - 1].argmax()) == labels[i] for i in taught))
    return sum(drift) / len(drift), right


def test_the_untaught_kl_term_holds_the_reasoning_while_the_answer_is_learned(learner_dir, tmp_path):
    """Teaching a chain of thought's answer alone moves what the model predicts at the reasoning tokens too
    (one adapter acts at every position); `untaught_kl` holds them near the base model's, and the answers
    are learned all the same."""
    lm = LocalLM(learner_dir, dtype="float32")
    calls = [reasoned(noun, colour, ACTIONS[colour]) for noun, colour in itertools.product(NOUNS[:4], ACTIONS)]
    drift, right = {}, {}
    for hold in (0.0, 1.0):
        settings = LoraSettings(rank=8, alpha=16, learning_rate=2e-2, epochs=20, batch_size=3, micro_batch_size=3,
                                untaught_kl=hold)
        finetune(lm, calls, tmp_path / f"hold-{hold}", settings, progress=False)
        drift[hold], right[hold] = reasoning_drift_and_answers(lm, learner_dir, tmp_path / f"hold-{hold}", calls)
    lm.close()
    assert all(right[1.0]), right  # (without the term, 4 of 12 were still wrong after the same 20 epochs)
    assert drift[1.0] < 0.1 * drift[0.0], drift  # measured: 0.018 nats a token against 2.6
