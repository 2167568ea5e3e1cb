"""Policy updates for r steps: the clipped policy-gradient objective over the scored module calls of
sampled program runs, on the model an engine lends (`lm.base.Trainee`), one LoRA adapter updated per
round. The adapter's attach, save and detach are LoRA training's own (training/lora.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..lm.base import LM, Message, Trainee
from ..settings import LoraSettings, PolicySettings
from .lora import attach_adapter, detach_adapter, save_adapter, training_autocast
from .reports import PolicyCall, PolicyReport

log = logging.getLogger(__name__)


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


def train_policy(lm: LM, calls: Sequence[PolicyCall], start: str | Path | None, out_dir: str | Path,
                 lora: LoraSettings, policy: PolicySettings, progress: bool = True) -> PolicyReport:
    """One policy-gradient update of the adapter at `start` (None: a new one) on scored calls, on the model
    `lm` lends (or by `lm.train_policy` where the LM trains itself); the result goes to `out_dir`
    (`out_dir/adapter`, and the optimizer's state beside it)."""
    own = getattr(lm, "train_policy", None)
    if own is not None:
        return own(calls, start, out_dir, lora, policy, progress=progress)
    with lm.training(lora.rank) as trainee:
        report, trainee.model = policy_update(trainee, calls, start, out_dir, lora, policy, progress=progress)
    return report
