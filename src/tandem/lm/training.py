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
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..settings import LoraSettings
from .base import Message

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    examples: int  # training calls trained on
    tokens: int  # tokens processed over all epochs, padding excluded
    target_tokens: int
    steps: int  # optimizer steps taken, counted in the loop
    seconds: float
    first_loss: float
    last_loss: float
    losses: list[float]
    dropped_too_long: int = 0  # calls left out because they exceed max_length
    learning_rates: list[float] = field(default_factory=list)  # per optimizer step
    epochs: int = 0  # passes over the data: the setting's, or more to reach min_steps

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Trainee:
    """What an engine lends a training run (`Trainable.training`): the model an adapter is added to,
    its tokenizer, and the chat renderer that made the prompts the engine served."""

    model: Any
    tokenizer: Any
    render: Callable[[Sequence[Message]], str]


def attach_adapter(model, name: str, settings: LoraSettings, start: str | Path | None = None):
    """`model` (a PeftModel or a plain model, then wrapped) with a trainable adapter `name`: a new
    one, or a copy of the adapter saved at `start`. Returns (peft_model, trainable params, the
    adapter that was active before)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    wrapped = not isinstance(model, PeftModel)
    previous = None if wrapped else model.active_adapter
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) if isinstance(settings.target_modules, tuple) else settings.target_modules,
        task_type="CAUSAL_LM",
    )
    # LoRA's random init draws from torch's global generator: seed it inside a fork, so this
    # training is reproducible and leaves no seed behind for anything else.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        if start is not None and wrapped:
            peft_model = PeftModel.from_pretrained(model, str(start), adapter_name=name, is_trainable=True)
        elif start is not None:
            peft_model = model
            peft_model.load_adapter(str(start), adapter_name=name, is_trainable=True)
        elif wrapped:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model = model
            peft_model.add_adapter(name, config)
    peft_model.set_adapter(name)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n and f".{name}." in n]
    for p in peft_model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.data = p.data.float()  # adapter weights in fp32 whatever the base dtype
        p.requires_grad_(True)
    return peft_model, params, previous


def training_autocast(peft_model):
    """(device, autocast context): a half-precision base computes in its own dtype, the fp32 adapter
    weights are cast inside; an fp32 base runs without autocast."""
    device = next(peft_model.parameters()).device
    base_dtype = next(p for p in peft_model.parameters() if not p.requires_grad).dtype
    return device, torch.autocast(device.type, dtype=base_dtype, enabled=base_dtype in (torch.bfloat16, torch.float16))


def save_adapter(peft_model, name: str, out_dir: str | Path) -> None:
    """Write adapter `name` (PEFT layout, safetensors) to `out_dir`, replacing it whole or not at all."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, selected_adapters=[name])
    saved = tmp / name if (tmp / name).is_dir() else tmp  # peft nests non-default names
    shutil.rmtree(out_dir, ignore_errors=True)
    saved.rename(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)


def detach_adapter(peft_model, name: str, previous: str | None) -> None:
    """The adapter lives on disk now and is loaded by path when a program uses it: drop it from memory."""
    peft_model.eval()
    peft_model.delete_adapter(name)
    if previous and previous != name and previous in peft_model.peft_config:
        peft_model.set_adapter(previous)


def tokenize_chat(
    tokenizer, render: Callable[[Sequence[Message]], str], messages: Sequence[Message]
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
    return prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids


def lr_factor(step: int, total: int, warmup_ratio: float, floor: float) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based) of `total`.

    Linear warm-up over the first steps (never starting at the full rate when there is more than
    one step), then a cosine decay that reaches `floor` exactly at the last step, never 0.
    """
    if total <= 1:
        return 1.0
    warmup = max(1, round(warmup_ratio * total)) if warmup_ratio > 0 else 0
    warmup = min(warmup, total - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
    accelerator=None,
):
    """Train a new LoRA adapter on `model` (a PeftModel or a plain model) and save it to `out_dir`.

    Returns (report, peft_model). A plain model comes back wrapped as a PeftModel; either way the
    new adapter is saved and removed from memory, ready to be loaded by path like any other.

    `accelerator` (an `accelerate.Accelerator` in a process started by torchrun or `accelerate
    launch`, see lm/train_launch.py): the model is wrapped for data parallelism (DDP), each process
    takes its share of every epoch's micro-batches, gradients are averaged across processes, and
    the main process saves the adapter.
    """
    if not conversations:
        raise ValueError("no training conversations")
    tokenized = [tokenize_chat(tokenizer, render, c) for c in conversations]
    # A call longer than max_length is left out, never cut: cutting the prompt's left loses the
    # system message, cutting the reply teaches an unfinished answer.
    rows = [row for row in tokenized if len(row[0]) <= settings.max_length]
    dropped = len(tokenized) - len(rows)
    if dropped:
        log.warning("LoRA: %d of %d training calls are longer than max_length=%d tokens and are left out",
                    dropped, len(tokenized), settings.max_length)
    if not rows:
        raise ConfigError("max_length", f"is {settings.max_length} tokens: every training call is longer; raise it")
    peft_model, params, previous = attach_adapter(model, adapter_name, settings)
    rng = random.Random(settings.seed)

    # A handful of examples (a weak model passes few runs) still gets several optimizer steps per
    # epoch: the effective batch shrinks to half the data when the data is smaller than two batches.
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    batch = max(settings.micro_batch_size * world, min(settings.batch_size, len(rows) // 2))
    accumulate = max(1, batch // (settings.micro_batch_size * world))  # micro-batches per process and step
    per_epoch = math.ceil(math.ceil(len(rows) / settings.micro_batch_size) / world)
    # Few calls make few steps (6 calls, 2 epochs: 2 steps), too few to move the weights: repeat the
    # data, whole epochs at a time, until the run makes at least `min_steps` optimizer steps.
    epochs = max(settings.epochs, math.ceil(settings.min_steps * accumulate / per_epoch))
    if epochs > settings.epochs:
        log.info("LoRA: %d calls make %d steps in %d epochs, fewer than min_steps=%d; training %d epochs",
                 len(rows), math.ceil(per_epoch * settings.epochs / accumulate), settings.epochs, settings.min_steps,
                 epochs)
    total_micro = per_epoch * epochs
    planned = math.ceil(total_micro / accumulate)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, planned, settings.warmup_ratio, settings.min_lr_ratio)
    )
    forward = peft_model
    if accelerator is not None:
        forward, optimizer = accelerator.prepare(peft_model, optimizer)
    device, autocast = training_autocast(peft_model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    losses: list[float] = []
    rates: list[float] = []
    tokens = target_tokens = steps = 0
    started = time.perf_counter()
    peft_model.train()
    bar = tqdm(total=total_micro, desc="lora", unit="batch", disable=not progress or rank > 0, dynamic_ncols=True)
    try:
        micro = 0
        for _ in range(epochs):
            groups = _micro_batches(rows, settings.micro_batch_size, rng)  # the same order in every process
            mine = groups[rank::world]
            mine += groups[: per_epoch - len(mine)]  # every process takes as many steps (DDP waits on each)
            for group in mine:
                width = max(len(rows[i][0]) for i in group)
                ids = torch.tensor([rows[i][0] + [pad] * (width - len(rows[i][0])) for i in group], device=device)
                labels = torch.tensor([rows[i][1] + [-100] * (width - len(rows[i][1])) for i in group], device=device)
                mask = torch.tensor([[1] * len(rows[i][0]) + [0] * (width - len(rows[i][0])) for i in group],
                                    device=device)
                with autocast:
                    loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
                if accelerator is not None:
                    accelerator.backward(loss / accumulate)
                else:
                    (loss / accumulate).backward()
                micro += 1
                tokens += int(mask.sum())
                target_tokens += int((labels != -100).sum())
                losses.append(loss.item())
                if micro % accumulate == 0 or micro == total_micro:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    rates.append(optimizer.param_groups[0]["lr"])
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - started):.0f}", refresh=False)
    finally:
        bar.close()
        peft_model.eval()
    seconds = time.perf_counter() - started
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None, peft_model

    save_adapter(peft_model, adapter_name, out_dir)
    window = max(1, len(rows) // settings.micro_batch_size // world)  # one epoch of this process's losses
    report = TrainReport(
        examples=len(rows), tokens=tokens, target_tokens=target_tokens, steps=steps, seconds=seconds,
        first_loss=sum(losses[:window]) / len(losses[:window]), last_loss=sum(losses[-window:]) / len(losses[-window:]),
        losses=losses, dropped_too_long=dropped, learning_rates=rates, epochs=epochs,
    )
    (Path(out_dir) / "training.json").write_text(json.dumps({"settings": asdict(settings), **asdict(report)}, indent=1))

    detach_adapter(peft_model, adapter_name, previous)
    return report, peft_model


# -- policy optimization (r steps) ---------------------------------------------------------------


@dataclass
class PolicyCall:
    """One module call of a sampled program run, with its run's advantage."""

    module: str
    messages: list[Message]  # the prompt exactly as it was sent
    reply: str  # what came back
    advantage: float
    forced: tuple[tuple[int, int], ...] = ()  # character spans of `reply` the grammar wrote, not the model


@dataclass
class PolicyReport:
    calls: int  # calls trained on
    tokens: int  # reply tokens the model chose: the ones that carry loss
    forced_tokens: int  # reply tokens the grammar wrote: no loss
    prompt_tokens: int
    steps: int  # optimizer steps
    seconds: float
    loss: float  # mean over steps
    clip_fraction: float  # share of loss tokens whose ratio was clipped
    kl: float | None  # mean per-token KL estimate to the base model, when kl_coef > 0
    by_module: dict[str, int] = field(default_factory=dict)  # calls trained on per module
    dropped_too_long: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Sequence tokens through the trainer (prompt and reply, each forward and backward) per second."""
        return (self.prompt_tokens + self.tokens + self.forced_tokens) / self.seconds if self.seconds else 0.0


def policy_tokens(tokenizer, render: Callable[[Sequence[Message]], str], call: PolicyCall) -> tuple[list[int], list[int], int]:
    """(ids, loss mask over the reply, prompt length): the prompt as the engine rendered it, then the
    reply re-tokenized from its text. A reply token wholly inside a forced span carries no loss."""
    prompt_ids = tokenizer(render(call.messages), add_special_tokens=False)["input_ids"]
    fast = getattr(tokenizer, "is_fast", False)
    encoded = tokenizer(call.reply, add_special_tokens=False, return_offsets_mapping=fast)
    reply_ids = encoded["input_ids"]
    if fast and call.forced:
        mask = [0 if any(a <= start and end <= b for a, b in call.forced) else 1
                for start, end in encoded["offset_mapping"]]
    else:
        mask = [1] * len(reply_ids)
    return prompt_ids + reply_ids, mask, len(prompt_ids)


def _reply_logps(model, ids: list[int], prompt: int, device) -> torch.Tensor:
    """Log-probabilities of the reply tokens (positions `prompt`..end) under `model`, in fp32."""
    reply = len(ids) - prompt
    logits = model(input_ids=torch.tensor([ids], device=device), logits_to_keep=reply + 1).logits[0, :-1]
    targets = torch.tensor(ids[prompt:], device=device)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]


def _minibatches(calls: Sequence[int], modules: Sequence[str], n: int, rng: random.Random) -> list[list[int]]:
    """`calls` split into `n` minibatches (fewer if there are fewer calls), each module's calls dealt
    round-robin so every minibatch holds its share of every module."""
    by_module: dict[str, list[int]] = {}
    for i in calls:
        by_module.setdefault(modules[i], []).append(i)
    n = max(1, min(n, len(calls)))
    out: list[list[int]] = [[] for _ in range(n)]
    k = 0
    for group in by_module.values():
        rng.shuffle(group)
        for i in group:
            out[k % n].append(i)
            k += 1
    return [b for b in out if b]


def policy_update(trainee: Trainee, calls: Sequence[PolicyCall], start: str | Path | None, out_dir: str | Path,
                  lora: LoraSettings, policy, progress: bool = True, adapter_name: str = "tandem_policy"):
    """One round's update of the policy (base model + the adapter at `start`, or a new adapter) by
    the clipped policy-gradient objective, then the adapter saved to `out_dir/adapter` and AdamW's
    state to `out_dir/optimizer.safetensors` (read back from beside `start` the next round).

    Per reply token t of a call with advantage A: ratio = π(t) / π_old(t), where π_old is the
    policy before this update (the one that sampled the runs, recomputed here); the loss is
    -min(ratio·A, clip(ratio, 1 - clip_low, 1 + clip_high)·A), plus kl_coef times the k3 estimate
    of KL to the base model (the adapter switched off) where kl_coef > 0. Only tokens the model
    chose carry loss: prompt tokens and tokens the grammar forced (`PolicyCall.forced`) are masked
    out of the ratio and of the normalization alike. Probabilities are the model's own softmax,
    not renormalized over the tokens the grammar allowed: where the grammar allowed a free choice
    (free text, the first letters of a choice) the two differ by the mass of masked tokens, which
    the model puts little on.

    mmGRPO's alignment: the loss is a token mean within each module's calls of a minibatch, and the
    modules' means are averaged, so a module with long or many calls does not drown the others.
    The calls are split into `policy.updates_per_round` minibatches, one optimizer step each.
    """
    started = time.perf_counter()
    tokenizer, render = trainee.tokenizer, trainee.render
    rows, dropped = [], 0
    for call in calls:
        ids, mask, prompt = policy_tokens(tokenizer, render, call)
        if len(ids) > lora.max_length:
            dropped += 1
        elif any(mask):
            rows.append((call, ids, mask, prompt))
    if dropped:
        log.warning("policy update: %d of %d calls are longer than max_length=%d tokens and are left out",
                    dropped, len(calls), lora.max_length)
    if not rows:
        raise ConfigError("max_length", f"is {lora.max_length} tokens: no call of this round fits; raise it")

    peft_model, params, previous = attach_adapter(trainee.model, adapter_name, lora, start)
    trainee.model = peft_model
    device, autocast = training_autocast(peft_model)
    optimizer = torch.optim.AdamW(params, lr=policy.policy_learning_rate, weight_decay=lora.weight_decay)
    names = {p: n.replace(f".{adapter_name}.", ".") for n, p in peft_model.named_parameters() if p.requires_grad}
    if start is not None and (Path(start).parent / "optimizer.safetensors").exists():
        _load_optimizer(optimizer, names, Path(start).parent / "optimizer.safetensors")

    masks = [torch.tensor(mask, device=device, dtype=torch.float32) for _, _, mask, _ in rows]
    peft_model.eval()
    with torch.no_grad(), autocast:
        old = [_reply_logps(peft_model, ids, prompt, device) for _, ids, _, prompt in rows]
        ref = None
        if policy.kl_coef > 0:
            with peft_model.disable_adapter():
                ref = [_reply_logps(peft_model, ids, prompt, device) for _, ids, _, prompt in rows]

    rng = random.Random(lora.seed)
    modules = [call.module for call, *_ in rows]
    batches = _minibatches(range(len(rows)), modules, policy.updates_per_round, rng)
    losses, clipped, kls, counted = [], 0.0, [], 0.0
    peft_model.train()
    bar = tqdm(total=len(rows), desc="policy update", unit="call", disable=not progress, dynamic_ncols=True)
    try:
        for batch in batches:
            tokens_of: dict[str, float] = {}
            for i in batch:
                tokens_of[modules[i]] = tokens_of.get(modules[i], 0.0) + float(masks[i].sum())
            step_loss = 0.0
            for i in batch:
                call, ids, _, prompt = rows[i]
                with autocast:
                    logp = _reply_logps(peft_model, ids, prompt, device)
                ratio = torch.exp(logp - old[i])
                advantage = torch.tensor(call.advantage, device=device)
                low, high = 1 - policy.clip_low, 1 + policy.clip_high
                per_token = -torch.minimum(ratio * advantage, ratio.clamp(low, high) * advantage)
                if ref is not None:
                    delta = ref[i] - logp
                    kl = torch.exp(delta) - delta - 1
                    per_token = per_token + policy.kl_coef * kl
                    kls.append(float((kl * masks[i]).sum() / masks[i].sum()))
                loss = (per_token * masks[i]).sum() / (tokens_of[modules[i]] * len(tokens_of))
                loss.backward()
                step_loss += float(loss.detach())
                with torch.no_grad():
                    out = ((ratio < low) & (advantage < 0)) | ((ratio > high) & (advantage > 0))
                    clipped += float((out.float() * masks[i]).sum())
                    counted += float(masks[i].sum())
                bar.update(1)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
    finally:
        bar.close()
        peft_model.eval()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(peft_model, adapter_name, out_dir / "adapter")
    _save_optimizer(optimizer, names, out_dir / "optimizer.safetensors")
    detach_adapter(peft_model, adapter_name, previous)
    forced = sum(len(mask) - sum(mask) for _, _, mask, _ in rows)
    report = PolicyReport(
        calls=len(rows), tokens=int(counted), forced_tokens=forced, prompt_tokens=sum(p for *_, p in rows),
        steps=len(batches), seconds=time.perf_counter() - started, loss=sum(losses) / len(losses),
        clip_fraction=clipped / counted if counted else 0.0, kl=sum(kls) / len(kls) if kls else None,
        by_module=dict(Counter(modules)), dropped_too_long=dropped,
    )
    return report, peft_model


def _save_optimizer(optimizer, names: dict, path: Path) -> None:
    """AdamW's moments and step count per adapter weight, as safetensors (never pickle)."""
    from safetensors.torch import save_file

    tensors = {}
    for p, name in names.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"{name}::{key}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _load_optimizer(optimizer, names: dict, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    for p, name in names.items():
        state = {key.split("::", 1)[1]: value.to(p.device) for key, value in saved.items() if key.split("::", 1)[0] == name}
        if state:
            state["step"] = state["step"].cpu()  # AdamW keeps its step count on the CPU
            optimizer.state[p] = state
