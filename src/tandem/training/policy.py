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
from .lora import (
    attach_adapter, check_adapters, detach_adapter, micro_batch_size, pad_rows, save_adapter, training_autocast,
)
from .reports import PolicyCall, PolicyReport

log = logging.getLogger(__name__)


def policy_tokens(tokenizer, render: Callable[[Sequence[Message]], str], call: PolicyCall
                  ) -> tuple[list[int], list[int], int, bool]:
    """(ids, loss mask over the reply, prompt length, re-tokenized): the prompt as the engine rendered it,
    then the reply as the engine sampled it, its end token included (`PolicyCall.token_ids`).

    A reply token carries no loss where the engine wrote it (`engine_forced`) or where it lies wholly
    inside a span the reply format fixes (`forced`, characters: labels, the rest of a choice; an engine
    that samples under a grammar without writing for the model, vLLM's, reports no forced tokens of its
    own). Token spans come from decoding the reply's growing prefixes, which any tokenizer can do, fast or
    slow. Where the engine gave no token ids the reply text is re-tokenized, with the tokenizer's end token
    after a reply that ended by itself, and the last value says so (the report counts them)."""
    prompt_ids = tokenizer(render(call.messages), add_special_tokens=False)["input_ids"]
    reply_ids, engine_forced = list(call.token_ids or ()), set(call.engine_forced)
    spans = _token_spans(tokenizer, reply_ids) if call.token_ids is not None else []
    decoded = tokenizer.decode(reply_ids, skip_special_tokens=True) if call.token_ids is not None else ""
    lead = len(decoded) - len(decoded.lstrip())  # the reply text is the decoded ids, stripped (and cut at a stop)
    retokenized = call.token_ids is None or not decoded[lead:].startswith(call.reply)
    if retokenized:
        if call.token_ids is not None:
            log.warning("policy update: the engine's token ids do not spell the reply %r: re-tokenized", call.reply[:60])
        end = [tokenizer.eos_token_id] if call.ended and tokenizer.eos_token_id is not None else []
        reply_ids = tokenizer(call.reply, add_special_tokens=False)["input_ids"] + end
        spans, engine_forced, lead = _token_spans(tokenizer, reply_ids), set(), 0
    mask = [0 if k in engine_forced or (b > a and any(lead + x <= a and b <= lead + y for x, y in call.forced)) else 1
            for k, (a, b) in enumerate(spans)] if call.forced or engine_forced else [1] * len(reply_ids)
    return prompt_ids + reply_ids, mask, len(prompt_ids), retokenized


def _token_spans(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Each token's (start, end) characters in the decoded text (special tokens decode to nothing: empty)."""
    spans, at = [], 0
    for k in range(1, len(ids) + 1):
        end = max(at, len(tokenizer.decode(ids[:k], skip_special_tokens=True)))
        spans.append((at, end))
        at = end
    return spans


def reply_logps(model, rows: Sequence[tuple[Sequence[int], int]], pad: int, device, temperature: float = 1.0
                ) -> list[torch.Tensor]:
    """Log-probabilities of each row's reply tokens (from its prompt length on) under `model`, in fp32, at
    the temperature the replies were sampled at (the logits divided by it, as the sampler did), for a
    micro-batch of rows padded on the right (lora.pad_rows)."""
    ids, mask = pad_rows([r[0] for r in rows], pad, device)
    width = ids.shape[1]
    keep = width - min(prompt for _, prompt in rows) + 1  # logits from the earliest reply's last prompt token on
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    first = width - keep  # the position logits[:, 0] predicts from
    out = []
    for r, (row, prompt) in enumerate(rows):
        scaled = logits[r, prompt - 1 - first: len(row) - 1 - first].float() / temperature
        targets = torch.tensor(list(row[prompt:]), device=device)
        out.append(torch.log_softmax(scaled, dim=-1).gather(1, targets[:, None])[:, 0])
    return out


def clipped_objective(logp: torch.Tensor, old: torch.Tensor, advantage: float, clip_low: float, clip_high: float,
                      ref: torch.Tensor | None = None, kl_coef: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per reply token: (loss, ratio, whether the clip held the ratio, k3 KL estimate to `ref` or None).

    loss = -min(ratio·A, clip(ratio, 1 - clip_low, 1 + clip_high)·A) + kl_coef·KL, ratio = exp(logp - old)."""
    ratio = torch.exp(logp - old)
    a = torch.tensor(advantage, device=logp.device)
    low, high = 1 - clip_low, 1 + clip_high
    loss = -torch.minimum(ratio * a, ratio.clamp(low, high) * a)
    clipped = ((ratio < low) & (a < 0)) | ((ratio > high) & (a > 0))
    kl = None
    if ref is not None:
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + kl_coef * kl
    return loss, ratio, clipped, kl


def module_weights(modules: Sequence[str], token_counts: Sequence[float]) -> list[float]:
    """mmGRPO's alignment, per call of a minibatch: the divisor of its summed token losses, so the loss is a
    token mean within each module's calls, averaged over the modules (a module with long or many calls
    does not drown the others)."""
    tokens_of: dict[str, float] = {}
    for module, n in zip(modules, token_counts):
        tokens_of[module] = tokens_of.get(module, 0.0) + n
    return [tokens_of[m] * len(tokens_of) for m in modules]


def _chunks(indices: Sequence[int], size: int, length) -> list[list[int]]:
    """`indices` sorted by length and cut into micro-batches of `size`: little padding."""
    order = sorted(indices, key=length)
    return [order[i:i + size] for i in range(0, len(order), size)]


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
                  lora: LoraSettings, policy: PolicySettings, progress: bool = True, adapter_name: str = "tandem_policy"):
    """One round's update of the policy (base model + the adapter at `start`, or a new adapter) by
    the clipped policy-gradient objective, then the adapter saved to `out_dir/adapter` and AdamW's
    state to `out_dir/optimizer.safetensors` (read back from beside `start` the next round).

    Per reply token t of a call with advantage A: ratio = π(t) / π_old(t), where π_old is the
    policy before this update (the one that sampled the runs, recomputed here); the loss is
    -min(ratio·A, clip(ratio, 1 - clip_low, 1 + clip_high)·A), plus kl_coef times the k3 estimate
    of KL to the base model (the adapter switched off) where kl_coef > 0. The tokens are the ones the
    engine sampled, the end token included (`policy_tokens`), and probabilities are taken at the
    rollout temperature, the distribution they were sampled from (TRL's GRPO does the same). Only
    tokens the model chose carry loss: prompt tokens and tokens the grammar forced are masked out of
    the ratio and of the normalization alike. Probabilities are the model's own softmax, not
    renormalized over the tokens the grammar allowed: where the grammar allowed a free choice (free
    text, the first letters of a choice) the two differ by the mass of masked tokens, which the model
    puts little on.

    Dropout is off for the whole update (the model in eval mode; gradients flow as ever), for π_old and
    π alike: with LoRA dropout (or a base model's own) on for π only, the ratio would move at random
    even on-policy and clip tokens for no reason (TRL's `disable_dropout` exists for the same reason).
    `onpolicy_ratio_error` in the report is the first step's largest |ratio - 1|: 0 up to rounding.

    mmGRPO's alignment (`module_weights`): the loss is a token mean within each module's calls of a
    minibatch, and the modules' means are averaged. The calls are split into
    `policy.updates_per_round` minibatches, one optimizer step each; a minibatch runs in micro-batches
    of `lora.micro_batch_size` calls (by device where unset), padded, each call's loss weighted as
    above, so the gradient is the same at any micro-batch size.
    """
    started = time.perf_counter()
    tokenizer, render = trainee.tokenizer, trainee.render
    rows, dropped, no_loss, retokenized = [], 0, 0, 0
    for call in calls:
        ids, mask, prompt, again = policy_tokens(tokenizer, render, call)
        if len(ids) > lora.max_length:
            dropped += 1
        elif not any(mask):
            no_loss += 1  # every reply token was written by the grammar: nothing the model chose
        else:
            rows.append((call, ids, mask, prompt))
            retokenized += again
    if dropped:
        log.warning("policy update: %d of %d calls are longer than max_length=%d tokens and are left out",
                    dropped, len(calls), lora.max_length)
    if no_loss:
        log.info("policy update: %d of %d calls have no token the model chose (the format wrote them all): left out",
                 no_loss, len(calls))
    if retokenized:
        log.warning("policy update: %d of %d calls came without the engine's token ids and were re-tokenized",
                    retokenized, len(rows))
    if not rows:
        if dropped:
            raise ConfigError("max_length", f"is {lora.max_length} tokens: no call of this round fits ({dropped} "
                                            f"longer, {no_loss} with no token the model chose); raise it")
        raise ValueError(f"policy update: none of {len(calls)} calls has a reply token the model chose")

    peft_model, params, previous = attach_adapter(trainee.model, adapter_name, lora, start)
    trainee.model = peft_model
    device, autocast = training_autocast(peft_model)
    size = micro_batch_size(lora, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    temperature = policy.rollout_temperature
    optimizer = torch.optim.AdamW(params, lr=policy.policy_learning_rate, weight_decay=lora.weight_decay)
    names = {p: n.replace(f".{adapter_name}.", ".") for n, p in peft_model.named_parameters() if p.requires_grad}
    if start is not None and (Path(start).parent / "optimizer.safetensors").exists():
        _load_optimizer(optimizer, names, Path(start).parent / "optimizer.safetensors")

    masks = [torch.tensor(mask, device=device, dtype=torch.float32) for _, _, mask, _ in rows]
    seqs = [(ids, prompt) for _, ids, _, prompt in rows]
    everything = _chunks(range(len(rows)), size, lambda i: len(seqs[i][0]))
    peft_model.eval()  # dropout off for old and new log-probs alike (see above)
    old: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    ref: list[torch.Tensor] | None = [None] * len(rows) if policy.kl_coef > 0 else None  # type: ignore[list-item]
    with torch.no_grad(), autocast:
        for chunk in everything:
            for i, logp in zip(chunk, reply_logps(peft_model, [seqs[i] for i in chunk], pad, device, temperature)):
                old[i] = logp
            if ref is not None:
                with peft_model.disable_adapter():
                    for i, logp in zip(chunk, reply_logps(peft_model, [seqs[i] for i in chunk], pad, device,
                                                          temperature)):
                        ref[i] = logp

    rng = random.Random(lora.seed)
    modules = [call.module for call, *_ in rows]
    batches = _minibatches(range(len(rows)), modules, policy.updates_per_round, rng)
    losses, clipped, kls, counted, ratio_error = [], 0.0, [], 0.0, 0.0
    bar = tqdm(total=len(rows), desc="policy update", unit="call", disable=not progress, dynamic_ncols=True)
    try:
        for step, batch in enumerate(batches):
            divisors = dict(zip(batch, module_weights([modules[i] for i in batch], [float(masks[i].sum()) for i in batch])))
            step_loss = 0.0
            for chunk in _chunks(batch, size, lambda i: len(seqs[i][0])):
                with autocast:
                    logps = reply_logps(peft_model, [seqs[i] for i in chunk], pad, device, temperature)
                loss = torch.zeros((), device=device)
                for i, logp in zip(chunk, logps):
                    per_token, ratio, out, kl = clipped_objective(
                        logp, old[i], rows[i][0].advantage, policy.clip_low, policy.clip_high,
                        ref[i] if ref is not None else None, policy.kl_coef)
                    loss = loss + (per_token * masks[i]).sum() / divisors[i]
                    with torch.no_grad():
                        clipped += float((out.float() * masks[i]).sum())
                        counted += float(masks[i].sum())
                        if kl is not None:
                            kls.append(float((kl * masks[i]).sum() / masks[i].sum()))
                        if step == 0:
                            ratio_error = max(ratio_error, float(((ratio - 1).abs() * masks[i]).max()))
                loss.backward()
                step_loss += float(loss.detach())
                bar.update(len(chunk))
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
        by_module=dict(Counter(modules)), dropped_too_long=dropped, no_loss_tokens=no_loss, retokenized=retokenized,
        onpolicy_ratio_error=ratio_error, micro_batch=size,
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
    check_adapters(lm, out_dir, lora.rank)
    with lm.training(lora.rank) as trainee:
        report, trainee.model = policy_update(trainee, calls, start, out_dir, lora, policy, progress=progress)
    return report
