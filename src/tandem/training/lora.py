"""LoRA training on chat examples, with peft, on a model that is already loaded.

One loop, used by BootstrapFinetune (w, w+) and the DSPy provider through `training.finetune`.
Loss is taken on the assistant reply only, or on its end from `TrainingCall.loss_from` (the answer after
the reasoning); the reply's untaught start can be held to the base model's distribution by a KL term
(`LoraSettings.untaught_kl`), so that teaching the answer does not rewrite the reasoning before it. Calls
that name their answer's class (`TrainingCall.group`) are ordered so that every optimizer step holds the
classes in their proportions; others are grouped by length into micro-batches so that padding stays small.
The adapter's attach, save and detach serve policy updates too.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..lm.base import LM, Message
from ..settings import LoraSettings
from .reports import TrainingCall, TrainReport

log = logging.getLogger(__name__)


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


def as_call(call: Sequence[Message] | TrainingCall) -> TrainingCall:
    return call if isinstance(call, TrainingCall) else TrainingCall(call)


def tokenize_chat(
    tokenizer, render: Callable[[Sequence[Message]], str], messages: Sequence[Message], loss_from: int = 0
) -> tuple[list[int], list[int], int]:
    """Token ids, labels and the index of the reply's first token, for one conversation whose last message
    is the assistant's reply; the labels are -100 (no loss) on the prompt and on the reply's first
    `loss_from` characters."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with the assistant's reply")
    content = messages[-1]["content"]
    prompt = render(messages[:-1])
    full = tokenizer.apply_chat_template(list(messages), tokenize=False) if tokenizer.chat_template else prompt + content + (tokenizer.eos_token or "")
    if not full.startswith(prompt) or content not in full[len(prompt):]:
        # Some templates render the final assistant turn differently; fall back to prompt + reply + eos.
        full = prompt + content + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply = full[len(prompt):]
    # Offsets (fast tokenizers) say where each reply token starts, for `loss_from`; asked for in the one call.
    encoded = tokenizer(reply, add_special_tokens=False, return_offsets_mapping=bool(loss_from and tokenizer.is_fast))
    reply_ids = encoded["input_ids"]
    untaught = _untaught(tokenizer, encoded, reply.index(content) + loss_from) if loss_from else 0
    return prompt_ids + reply_ids, [-100] * (len(prompt_ids) + untaught) + reply_ids[untaught:], len(prompt_ids)


def _untaught(tokenizer, encoded, cut: int) -> int:
    """How many of the reply's tokens (`encoded`, with offsets where the tokenizer gives them) lie before
    character `cut`: a token that starts before it is left untaught, so the loss begins at the first token
    wholly after it."""
    if "offset_mapping" in encoded:
        return sum(1 for start, _ in encoded["offset_mapping"] if start < cut)
    ids = encoded["input_ids"]
    n = 0  # a slow tokenizer has no offsets: the longest run of tokens whose text ends by `cut`
    while n < len(ids) and len(tokenizer.decode(ids[: n + 1])) <= cut:
        n += 1
    return n


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


def checkpoint_steps(planned: int, per_epoch: int, accumulate: int, epochs: int, every: int) -> list[int]:
    """The optimizer steps after which an adapter is saved for val: every `every` steps, or (0) the first step
    at or after each epoch's end; the last step always."""
    if every > 0:
        steps = set(range(every, planned + 1, every))
    else:
        steps = {min(planned, math.ceil(e * per_epoch / accumulate)) for e in range(1, epochs + 1)}
    return sorted(steps | {planned})


def _micro_batches(rows: list[tuple[list[int], list[int]]], size: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length, then the groups shuffled: little padding, random order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(groups)
    return groups


def stratified(labels: Sequence[str], size: int, rng: random.Random) -> list[list[int]]:
    """Indices in an order that spreads every class evenly over the epoch, in micro-batches of `size`: the
    k-th of a class's n calls (shuffled) sits at (k + u) / n of the way, u drawn once per class. So any run
    of consecutive calls, an optimizer step's, holds the classes in about their shares of the data."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    placed = []
    for members in by_class.values():
        rng.shuffle(members)
        u = rng.random()
        placed += [((k + u) / len(members), i) for k, i in enumerate(members)]
    order = [i for _, i in sorted(placed)]
    return [order[i : i + size] for i in range(0, len(order), size)]


def micro_batch_size(settings: LoraSettings, device: torch.device) -> int:
    """Sequences per forward pass: the setting where it is set, else by device. A CPU gains nothing from
    batching a forward pass whose matmuls already fill its cores and pays for the padding (measured in
    bench/finetune.py); a GPU sits idle on one sequence at a time."""
    if settings.micro_batch_size is not None:
        return settings.micro_batch_size
    return 1 if device.type == "cpu" else 8


def pad_rows(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows padded on the right to the longest: a causal model reads each
    row's tokens before its padding, so their positions and logits are those of the row alone."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def reply_loss(forward, rows: Sequence[tuple[list[int], list[int], int]], pad: int, device, autocast,
               hold: float = 0.0, base: Callable | None = None) -> torch.Tensor:
    """Each call's mean token loss on its reply (labels -100 elsewhere), one value per call of the micro-batch.

    The mean is taken per call, not over the micro-batch's tokens, so a call weighs the same whatever it
    is batched with: summed over a step's calls and divided by their number, the loss (and its gradient)
    is the one micro-batches of one call give, at any micro-batch size.

    `hold` > 0 adds, times `hold`, each call's mean KL divergence from `base` (the same model with the
    adapter switched off, called without gradients) to the model, over the vocabulary, at the reply's
    untaught tokens (from the row's reply start to its first taught token): the reasoning a chain of
    thought's call keeps as context stays the base model's while the answer after it is taught."""
    ids, mask = pad_rows([r[0] for r in rows], pad, device)
    labels, _ = pad_rows([r[1] for r in rows], -100, device)
    taught_from = [next((i for i, t in enumerate(r[1]) if t != -100), len(r[1])) for r in rows]
    held_from = [min(r[2], f) for r, f in zip(rows, taught_from)] if hold and base is not None else taught_from
    # Logits only from the position before the first token that needs them on: the prompt's positions need
    # none, and the output layer over a 49k vocabulary is a fifth of a small model's work per token.
    keep = ids.shape[1] - max(min(held_from) - 1, 0)
    with autocast:
        logits = forward(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    start = ids.shape[1] - logits.shape[1] + 1  # the index of the token logits[:, 0] predicts
    targets = labels[:, start:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                                  reduction="none")
    loss = per_token.sum(1) / (targets != -100).sum(1).clamp(min=1)
    if held_from == taught_from:
        return loss
    predicted = torch.arange(start, ids.shape[1], device=device)
    held = (predicted >= torch.tensor(held_from, device=device)[:, None]) & (
        predicted < torch.tensor(taught_from, device=device)[:, None])
    with torch.no_grad(), autocast:
        reference = base(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[:, :-1][held].float()
    divergence = torch.nn.functional.kl_div(torch.log_softmax(logits[:, :-1][held].float(), -1),
                                            torch.log_softmax(reference, -1), log_target=True, reduction="none").sum(-1)
    per_call = torch.zeros(len(rows), device=device).index_add(0, held.nonzero()[:, 0], divergence)
    return loss + hold * per_call / held.sum(1).clamp(min=1)


def train_lora(
    model,
    tokenizer,
    render: Callable[[Sequence[Message]], str],
    conversations: Sequence[Sequence[Message] | TrainingCall],
    out_dir: str | Path,
    settings: LoraSettings,
    adapter_name: str = "tandem_new",
    progress: bool = True,
    accelerator=None,
    checkpoint_dir: str | Path | None = None,
):
    """Train a new LoRA adapter on `model` (a PeftModel or a plain model) and save it to `out_dir`.

    Returns (report, peft_model). A plain model comes back wrapped as a PeftModel; either way the
    new adapter is saved and removed from memory, ready to be loaded by path like any other.

    `checkpoint_dir`: the adapter is also saved on the way, to `checkpoint_dir/step-NNNN`, at the steps
    `checkpoint_steps` picks (`settings.checkpoint_every`), so that a weight step can keep the one best
    on val; the last is `out_dir` itself. `report.checkpoints` lists them all.

    `accelerator` (an `accelerate.Accelerator` in a process started by torchrun or `accelerate
    launch`, see training/launch.py): the model is wrapped for data parallelism (DDP), each process
    takes its share of every epoch's micro-batches, gradients are averaged across processes, and
    the main process saves the adapter.
    """
    if not conversations:
        raise ValueError("no training conversations")
    calls = [as_call(c) for c in conversations]
    tokenized = [tokenize_chat(tokenizer, render, c.messages, c.loss_from) for c in calls]
    # A call longer than max_length is left out, never cut: cutting the prompt's left loses the
    # system message, cutting the reply teaches an unfinished answer.
    fits = [i for i, row in enumerate(tokenized) if len(row[0]) <= settings.max_length]
    rows = [tokenized[i] for i in fits]
    # Stratified steps where every call names its class and there are several classes.
    labels = [calls[i].group for i in fits]
    labels = labels if settings.stratify and None not in labels and len(set(labels)) > 1 else None
    dropped = len(tokenized) - len(rows)
    if dropped:
        log.warning("LoRA: %d of %d training calls are longer than max_length=%d tokens and are left out",
                    dropped, len(tokenized), settings.max_length)
    if not rows:
        raise ConfigError("max_length", f"is {settings.max_length} tokens: every training call is longer; raise it")
    peft_model, params, previous = attach_adapter(model, adapter_name, settings)
    device, autocast = training_autocast(peft_model)
    size = micro_batch_size(settings, device)
    rng = random.Random(settings.seed)

    # A handful of examples (a weak model passes few runs) still gets several optimizer steps per
    # epoch: the effective batch shrinks to half the data when the data is smaller than two batches.
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    batch = max(size * world, min(settings.batch_size, len(rows) // 2))
    if labels:  # ... but never below one call of each class: a step of one class pulls toward that class alone
        batch = max(batch, min(len(set(labels)), len(rows)))
    accumulate = max(1, batch // (size * world))  # micro-batches per process and step
    per_epoch = math.ceil(math.ceil(len(rows) / size) / world)
    # Few calls make few steps (6 calls, 2 epochs: 2 steps), too few to move the weights: repeat the
    # data, whole epochs at a time, until the run makes at least `min_steps` optimizer steps.
    epochs = max(settings.epochs, math.ceil(settings.min_steps * accumulate / per_epoch))
    if epochs > settings.epochs:
        log.info("LoRA: %d calls make %d steps in %d epochs, fewer than min_steps=%d; training %d epochs",
                 len(rows), math.ceil(per_epoch * settings.epochs / accumulate), settings.epochs, settings.min_steps,
                 epochs)
    total_micro = per_epoch * epochs
    planned = math.ceil(total_micro / accumulate)
    saves = checkpoint_steps(planned, per_epoch, accumulate, epochs, settings.checkpoint_every) if checkpoint_dir else []
    checkpoints: list[dict] = []
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, planned, settings.warmup_ratio, settings.min_lr_ratio)
    )
    forward = peft_model
    if accelerator is not None:
        forward, optimizer = accelerator.prepare(peft_model, optimizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def base(**inputs):  # the reference of the untaught tokens' KL term: the model without the adapter
        with peft_model.disable_adapter():
            return peft_model(**inputs)

    losses: list[float] = []
    rates: list[float] = []
    step_losses: list[float] = []  # the mean of each optimizer step's micro-batches
    pending = 0  # micro-batches since the last optimizer step
    tokens = target_tokens = steps = 0
    started = time.perf_counter()
    peft_model.train()
    bar = tqdm(total=total_micro, desc="lora", unit="batch", disable=not progress or rank > 0, dynamic_ncols=True)
    try:
        micro = 0
        for _ in range(epochs):
            groups = stratified(labels, size, rng) if labels else _micro_batches(rows, size, rng)  # the same in every process
            mine = groups[rank::world]
            mine += groups[: per_epoch - len(mine)]  # every process takes as many steps (DDP waits on each)
            for group in mine:
                per_call = reply_loss(forward, [rows[i] for i in group], pad, device, autocast, settings.untaught_kl,
                                      base)
                loss = per_call.sum() / (accumulate * size)  # a step's calls weigh alike at any micro-batch size
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
                micro += 1
                tokens += sum(len(rows[i][0]) for i in group)
                target_tokens += sum(sum(t != -100 for t in rows[i][1]) for i in group)
                losses.append(float(per_call.detach().mean()))
                pending += 1
                if micro % accumulate == 0 or micro == total_micro:
                    step_losses.append(sum(losses[-pending:]) / pending)
                    pending = 0
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    rates.append(optimizer.param_groups[0]["lr"])
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    steps += 1
                    if steps in saves:
                        where = Path(checkpoint_dir) / f"step-{steps:04d}" if steps < planned else Path(out_dir)
                        checkpoints.append({"step": steps, "epoch": round(micro / per_epoch, 2), "path": str(where)})
                        if steps < planned and rank == 0:
                            save_adapter(peft_model, adapter_name, where)
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
    window = max(1, len(rows) // size // world)  # one epoch of this process's losses
    report = TrainReport(
        examples=len(rows), tokens=tokens, target_tokens=target_tokens, steps=steps, seconds=seconds,
        first_loss=sum(losses[:window]) / len(losses[:window]), last_loss=sum(losses[-window:]) / len(losses[-window:]),
        losses=losses, dropped_too_long=dropped, learning_rates=rates, epochs=epochs, checkpoints=checkpoints,
        step_losses=step_losses,
        device=str(device),
        dtype=str(next(p for p in peft_model.parameters() if not p.requires_grad).dtype).removeprefix("torch."),
    )
    (Path(out_dir) / "training.json").write_text(json.dumps({"settings": asdict(settings), **asdict(report)}, indent=1))

    detach_adapter(peft_model, adapter_name, previous)
    return report, peft_model


def check_adapters(lm: LM, out_dir: str | Path, rank: int) -> None:
    """Before anything trains: an engine whose servers load adapters at runtime (`--engine openai`) checks
    that each can load one written under `out_dir` at `rank`, and refuses in one line where one cannot."""
    check = getattr(lm, "check_adapters", None)
    if check is not None:
        check(out_dir, rank)


def finetune(lm: LM, conversations: Sequence[Sequence[Message] | TrainingCall], out_dir: str | Path, settings: LoraSettings,
             progress: bool = True, checkpoint_dir: str | Path | None = None) -> TrainReport:
    """Train one LoRA adapter on chat examples and save it (PEFT, safetensors) to `out_dir`, and checkpoints
    on the way to `checkpoint_dir` (see `train_lora`): on the model `lm` lends (`training(rank)`), or by
    `lm.finetune` where the LM trains itself (the scripted LM)."""
    own = getattr(lm, "finetune", None)
    if own is not None:
        return own(conversations, out_dir, settings, progress=progress, checkpoint_dir=checkpoint_dir)
    check_adapters(lm, out_dir, settings.rank)
    with lm.training(settings.rank) as trainee:
        report, trainee.model = train_lora(trainee.model, trainee.tokenizer, trainee.render, conversations, out_dir,
                                           settings, progress=progress, checkpoint_dir=checkpoint_dir)
    return report
