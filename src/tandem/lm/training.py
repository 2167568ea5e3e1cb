"""LoRA training on chat examples, with peft, on a model that is already loaded.

One loop, used by BootstrapFinetune through `LocalLM.finetune`. Loss is taken on the assistant
reply only. Examples are grouped by length into micro-batches so that padding stays small.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .base import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters. The defaults suit ~0.1-1B models with a few hundred examples."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    learning_rate: float = 3e-4
    epochs: int = 3
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 1  # fastest on a CPU (bench/finetune.py): no padding to compute
    max_length: int = 1024  # longer examples are cut from the left of the prompt
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "alpha", "epochs", "batch_size", "micro_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"lora.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"lora.learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainReport:
    examples: int
    tokens: int  # tokens processed over all epochs, padding excluded
    target_tokens: int
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    losses: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def tokenize_chat(
    tokenizer, render: Callable[[Sequence[Message]], str], messages: Sequence[Message], max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation whose last message is the assistant's reply."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with the assistant's reply")
    prompt = render(messages[:-1])
    full = tokenizer.apply_chat_template(list(messages), tokenize=False) if tokenizer.chat_template else prompt + messages[-1]["content"] + (tokenizer.eos_token or "")
    if not full.startswith(prompt):
        # Some templates render the final assistant turn differently; fall back to prompt + reply + eos.
        full = prompt + messages[-1]["content"] + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    room = max_length - len(reply_ids)
    if room < 16:
        reply_ids, room = reply_ids[: max_length - 16], 16
    prompt_ids = prompt_ids[-room:]
    return prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids


def _micro_batches(rows: list[tuple[list[int], list[int]]], size: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length, then the groups shuffled: little padding, random order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(groups)
    return groups


def train_lora(
    model,
    tokenizer,
    render: Callable[[Sequence[Message]], str],
    conversations: Sequence[Sequence[Message]],
    out_dir: str | Path,
    settings: LoraSettings,
    adapter_name: str = "tandem_new",
    progress: bool = True,
):
    """Train a new LoRA adapter on `model` (a PeftModel or a plain model) and save it to `out_dir`.

    Returns (report, peft_model). A plain model comes back wrapped as a PeftModel; either way the
    new adapter is saved and removed from memory, ready to be loaded by path like any other.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if not conversations:
        raise ValueError("no training conversations")
    rows = [tokenize_chat(tokenizer, render, c, settings.max_length) for c in conversations]
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) if isinstance(settings.target_modules, tuple) else settings.target_modules,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    wrapped = not isinstance(model, PeftModel)
    if wrapped:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    else:
        peft_model = model
        previous = peft_model.active_adapter
        peft_model.add_adapter(adapter_name, config)
        peft_model.set_adapter(adapter_name)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    for p in peft_model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.data = p.data.float()  # adapter weights in fp32 whatever the base dtype
        p.requires_grad_(True)

    # A handful of examples (a weak model passes few runs) still gets several optimizer steps per
    # epoch: the effective batch shrinks to half the data when the data is smaller than two batches.
    batch = max(settings.micro_batch_size, min(settings.batch_size, len(rows) // 2))
    accumulate = max(1, batch // settings.micro_batch_size)
    per_epoch = math.ceil(len(rows) / settings.micro_batch_size)
    total_micro = per_epoch * settings.epochs
    total_steps = math.ceil(total_micro / accumulate)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = max(1, int(settings.warmup_ratio * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, (step + 1 - warmup) / max(1, total_steps - warmup))))),
    )
    base_dtype = next(p for p in peft_model.parameters() if not p.requires_grad).dtype
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if base_dtype == torch.bfloat16 else torch.autocast("cpu", enabled=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    losses: list[float] = []
    tokens = target_tokens = 0
    started = time.perf_counter()
    peft_model.train()
    bar = tqdm(total=total_micro, desc="lora", unit="batch", disable=not progress, dynamic_ncols=True)
    try:
        micro = 0
        for _ in range(settings.epochs):
            for group in _micro_batches(rows, settings.micro_batch_size, rng):
                width = max(len(rows[i][0]) for i in group)
                ids = torch.tensor([rows[i][0] + [pad] * (width - len(rows[i][0])) for i in group])
                labels = torch.tensor([rows[i][1] + [-100] * (width - len(rows[i][1])) for i in group])
                mask = torch.tensor([[1] * len(rows[i][0]) + [0] * (width - len(rows[i][0])) for i in group])
                with autocast:
                    loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
                (loss / accumulate).backward()
                micro += 1
                tokens += int(mask.sum())
                target_tokens += int((labels != -100).sum())
                losses.append(loss.item())
                if micro % accumulate == 0 or micro == total_micro:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - started):.0f}", refresh=False)
    finally:
        bar.close()
        peft_model.eval()
    seconds = time.perf_counter() - started

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
    saved = tmp / adapter_name if (tmp / adapter_name).is_dir() else tmp  # peft nests non-default names
    shutil.rmtree(out_dir, ignore_errors=True)
    saved.rename(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    window = max(1, len(rows) // settings.micro_batch_size)
    report = TrainReport(
        examples=len(rows), tokens=tokens, target_tokens=target_tokens, steps=total_steps, seconds=seconds,
        first_loss=sum(losses[:window]) / len(losses[:window]), last_loss=sum(losses[-window:]) / len(losses[-window:]),
        losses=losses,
    )
    (out_dir / "training.json").write_text(json.dumps({"settings": asdict(settings), **asdict(report)}, indent=1))

    # The adapter lives on disk now and is loaded by path when a program uses it.
    peft_model.delete_adapter(adapter_name)
    if not wrapped and previous and previous != adapter_name and previous in peft_model.peft_config:
        peft_model.set_adapter(previous)
    return report, peft_model
