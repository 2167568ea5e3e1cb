"""The Hugging Face copy that `--engine vllm` and `--engine openai` train on (lm/trainer_copy.py): the dtype
and device tandem chose, and on a GPU the copy off it after every weight step before vLLM wakes.

There is no GPU here: the GPU tests fake one where torch reports it (is_available, mem_get_info, the
allocator calls) and record, instead of making, the moves of the model to "cuda"; the training itself
is real and runs on the CPU. bench/gpu_smoke.sh runs the same paths on a real GPU."""

import logging

import pytest
import torch

from tandem.errors import UsageError
from tandem.lm.trainer_copy import TrainerCopy
from tandem.settings import LoraSettings
from tandem.training.lora import finetune

CONVERSATIONS = [[{"role": "user", "content": f"word: {w}"}, {"role": "assistant", "content": f"reply: ok {w}"}]
                 for w in ("alpha", "beta", "gamma")]
QUICK = LoraSettings(rank=4, alpha=8, epochs=1, batch_size=2, min_steps=2)


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model saved in bf16 (config.json says so), as most hub checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def probe_says(monkeypatch, faster: str) -> None:
    """The `--dtype auto` probe on a CPU, timing `faster` as the faster dtype by far (bf16 is emulated ~100x
    slower on a CPU without native bf16: the issue's AVX2-only EPYC)."""
    speeds = (1e11, 1e9) if faster == "bfloat16" else (1e9, 1e11)
    monkeypatch.setattr("tandem.lm.local.probe_dtype_speeds", lambda shape: speeds)


def dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_the_copy_of_a_bf16_checkpoint_trains_in_the_dtype_the_probe_chose(bf16_model_dir, monkeypatch, tmp_path,
                                                                          faster):
    from transformers import AutoTokenizer

    from tandem.lm.base import chat_prompt

    probe_says(monkeypatch, faster)
    copy = TrainerCopy(bf16_model_dir, dtype="auto", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(bf16_model_dir)
    with copy.lend(tokenizer, lambda m: chat_prompt(tokenizer, m)) as trainee:
        assert dtypes(trainee.model) == {getattr(torch, faster)}
    assert copy.dtype == getattr(torch, faster) and copy.device == "cpu"


@pytest.fixture()
def fake_gpu(monkeypatch):
    """torch says a GPU with `fake_gpu["free"]` bytes free is there; allocator calls and moves of a model to
    it are recorded in `fake_gpu["events"]` (the model stays on the CPU, where it really trains)."""
    state = {"free": 80 * 2**30, "total": 80 * 2**30, "events": []}
    events = state["events"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], state["total"]))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    for name in ("reset_peak_memory_stats",):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    for name in ("max_memory_allocated", "memory_allocated", "memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: 0)
    from peft import PeftModel
    from transformers import PreTrainedModel

    move = torch.nn.Module.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(self, (PreTrainedModel, PeftModel)) and isinstance(target, (str, torch.device)):
            events.append(f"to {target}")  # the model's own moves, not peft's per-layer ones
            if str(target).startswith("cuda"):
                return self
        return move(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return state


def test_auto_trains_on_the_cpu_where_a_server_fills_the_gpu_and_a_named_gpu_is_refused(tiny_model_dir, fake_gpu,
                                                                                      caplog):
    fake_gpu["free"] = 2**29  # a server holds all but half a GB
    copy = TrainerCopy(tiny_model_dir, dtype="float32", device="auto", what="tiny (served at URL)")
    with caplog.at_level(logging.WARNING, logger="tandem.lm.trainer_copy"):
        copy.load()
    assert copy.device == "cpu" and "to cuda" not in fake_gpu["events"]
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("training a LoRA on tiny (served at URL) needs about 1.0 GB of GPU memory for its copy of "
                           "the weights, and cuda has 0.5 GB of 80.0 GB free: it trains on the CPU instead")

    with pytest.raises(UsageError) as refused:
        TrainerCopy(tiny_model_dir, dtype="float32", device="cuda:1").load()
    assert "cuda:1 has 0.5 GB of 80.0 GB free: train on the CPU (device cpu)" in str(refused.value)
    assert "\n" not in str(refused.value)

    fake_gpu["free"] = 40 * 2**30
    roomy = TrainerCopy(tiny_model_dir, dtype="float32", device="auto")
    roomy.load()
    assert roomy.device == "cuda" and fake_gpu["events"][-1] == "to cuda"


class SleepingLLM:
    """vLLM's LLM as the engine uses it on a GPU: sleep(level) and wake_up(), recorded."""

    def __init__(self, events):
        self.events = events

    def sleep(self, level):
        self.events.append(f"sleep {level}")

    def wake_up(self):
        self.events.append("wake_up")
        return True


def test_every_weight_step_on_vllm_leaves_the_gpu_before_vllm_wakes(tiny_model_dir, fake_gpu, tmp_path):
    """`--engine vllm` on a GPU, two weight steps (an r step's rounds alike: both go through `training`):
    vLLM sleeps, the copy goes to the GPU and trains, then leaves it and the allocator's cache is emptied,
    and only then does vLLM wake."""
    from transformers import AutoTokenizer

    from tandem.lm.vllm import VLLMEngine

    events = fake_gpu["events"]
    engine = object.__new__(VLLMEngine)  # the engine's state that training() uses; no vLLM starts here
    engine.llm, engine.sleeps, engine.max_lora_rank = SleepingLLM(events), True, 16
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine._trainer = TrainerCopy(tiny_model_dir, "float32", "cuda")
    for step in range(2):
        finetune(engine, CONVERSATIONS, tmp_path / f"adapter{step}", QUICK, progress=False)
        moves = [e for e in events if not e.startswith("empty")]
        assert moves == ["sleep 1", "to cuda", "to cpu", "wake_up"] * (step + 1)
        woke = len(events) - 1 - events[::-1].index("wake_up")
        left = len(events) - 1 - events[::-1].index("to cpu")
        assert "empty_cache" in events[left:woke]  # the cache emptied after the copy left, before vLLM woke
    assert (tmp_path / "adapter1" / "adapter_model.safetensors").is_file()


def test_a_failed_step_still_takes_the_copy_off_the_gpu_and_wakes_vllm(tiny_model_dir, fake_gpu, tmp_path):
    from transformers import AutoTokenizer

    from tandem.lm.vllm import VLLMEngine

    events = fake_gpu["events"]
    engine = object.__new__(VLLMEngine)
    engine.llm, engine.sleeps, engine.max_lora_rank = SleepingLLM(events), True, 16
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine._trainer = TrainerCopy(tiny_model_dir, "float32", "cuda")
    with pytest.raises(RuntimeError, match="out of memory"):
        with engine.training(4):
            raise RuntimeError("CUDA out of memory (stand-in)")
    assert [e for e in events if not e.startswith("empty")] == ["sleep 1", "to cuda", "to cpu", "wake_up"]
