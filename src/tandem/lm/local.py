"""The local backend: one transformers model, batched generation, several LoRA adapters on one base.

Requests from many threads are gathered by a `DynamicBatcher`; each gathered batch is split
into groups that can share one `generate` call (same adapter and temperature), sorted by prompt
length so that left-padding wastes little. Adapters are PEFT folders loaded once onto the same
base model and switched per group: no reload, no merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from .base import Completion, Message, Request, Usage
from .batching import DynamicBatcher
from .models import ModelNotFoundError, resolve_model

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def matmul_flops(dtype: torch.dtype, size: int = 512, repeats: int = 3) -> float:
    """Measured matmul FLOP/s for a dtype on this device (CPU here)."""
    a = torch.randn(size, size, dtype=dtype)
    a @ a
    started = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * size**3 / (time.perf_counter() - started)


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """'auto': bf16 where it is fast (GPUs, CPUs with AMX or AVX512-BF16), else fp32.

    Without native bf16 a CPU emulates it ~100x slower than fp32 (measured on an AVX2-only EPYC),
    so the choice is made by timing both, not by habit.
    """
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    if device != "cpu":
        return torch.bfloat16
    faster = matmul_flops(torch.bfloat16, 256, 1) > matmul_flops(torch.float32, 256, 1)
    return torch.bfloat16 if faster else torch.float32


class _StopOnStrings:
    """Per-row stopping: a row is done at its own stop strings or its own token limit."""

    def __init__(self, tokenizer, prompt_len: int, stops: list[tuple[str, ...]], limits: list[int]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stops = stops
        self.limits = torch.tensor(limits)
        self.tail = 12  # tokens decoded to look for a stop string that just appeared

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.prompt_len
        done = self.limits <= produced
        for i, stops in enumerate(self.stops):
            if stops and not done[i]:
                text = self.tokenizer.decode(input_ids[i, -self.tail :])
                done[i] = any(s in text for s in stops)
        return done


def _plain_template(messages: Sequence[Message]) -> str:
    """For models without a chat template (base models): a readable transcript."""
    body = "".join(f"{m['role'].upper()}:\n{m['content']}\n\n" for m in messages)
    return body + "ASSISTANT:\n"


class LocalLM:
    """A Hugging Face causal LM on this machine, served to many threads through dynamic batching."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        max_batch: int = 32,
        max_wait: float = 0.02,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.dtype = pick_dtype(dtype, device)
        path = resolve_model(model)
        self.name = model if not Path(path).is_dir() else str(Path(path).resolve())
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(device)
        except OSError as exc:
            raise ModelNotFoundError(
                f"could not load model '{model}' ({exc.__class__.__name__}): without hub access, "
                "pass a local model folder or a .gguf file"
            ) from exc
        self.model.eval()
        log.info("loaded %s (%s) on %s", model, self.dtype, device)
        self.device = device
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.usage = Usage()
        self.lock = threading.RLock()  # held while the model generates or trains
        self._adapters: dict[tuple[str, float], str] = {}
        self.max_batch = max_batch
        self._batcher = DynamicBatcher(self._run_batch, max_batch=max_batch, max_wait=max_wait)

    # -- the LM protocol ---------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return self._batcher.submit(list(requests))

    def close(self) -> None:
        self._batcher.close()

    # -- prompts -----------------------------------------------------------------------------

    def prompt_text(self, messages: Sequence[Message]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return _plain_template(messages)

    def encode(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenizer(self.prompt_text(messages), add_special_tokens=False)["input_ids"]

    # -- adapters ----------------------------------------------------------------------------

    def _adapter_name(self, path: str) -> str:
        folder = Path(path)
        if not (folder / "adapter_config.json").exists():
            raise FileNotFoundError(f"not a PEFT adapter folder (no adapter_config.json): {folder}")
        stamp = max(f.stat().st_mtime for f in folder.iterdir())
        key = (str(folder.resolve()), stamp)
        if key not in self._adapters:
            from peft import PeftModel

            name = "a" + hashlib.sha256(repr(key).encode()).hexdigest()[:12]
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
            self.model.eval()
            self._adapters[key] = name
            log.info("loaded adapter %s as %s", folder, name)
        return self._adapters[key]

    @contextlib.contextmanager
    def using_adapter(self, path: str | None):
        """Run the block with this adapter active (None: base weights), on the one loaded model."""
        from peft import PeftModel

        with self.lock:
            if path is None:
                if isinstance(self.model, PeftModel):
                    with self.model.disable_adapter():
                        yield self.model
                else:
                    yield self.model
            else:
                name = self._adapter_name(path)  # may wrap self.model in a PeftModel: look it up after
                self.model.set_adapter(name)
                yield self.model

    # -- fine-tuning -------------------------------------------------------------------------

    def finetune(self, conversations, out_dir, settings, progress: bool = True):
        """Train one LoRA adapter on the loaded base model; save it (PEFT, safetensors) to `out_dir`.

        Generation waits while this runs (same lock); afterwards the adapter is served by path.
        """
        from .training import train_lora

        with self.lock:
            report, self.model = train_lora(
                self.model, self.tokenizer, self.prompt_text, conversations, out_dir, settings, progress=progress
            )
        return report

    # -- batched generation ------------------------------------------------------------------

    def _run_batch(self, requests: list[Request]) -> list[Completion]:
        encoded = [self.encode(r.messages) for r in requests]
        order = sorted(
            range(len(requests)),
            key=lambda i: (requests[i].adapter or "", requests[i].temperature, len(encoded[i])),
        )
        results: list[Completion | None] = [None] * len(requests)
        group: list[int] = []

        def flush() -> None:
            if group:
                outs = self._generate_group([requests[i] for i in group], [encoded[i] for i in group])
                for i, out in zip(group, outs):
                    results[i] = out
                group.clear()

        for i in order:
            if group and (
                len(group) == self.max_batch
                or (requests[i].adapter, requests[i].temperature)
                != (requests[group[0]].adapter, requests[group[0]].temperature)
            ):
                flush()
            group.append(i)
        flush()
        self.usage.batches += 1
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def _generate_group(self, requests: list[Request], encoded: list[list[int]]) -> list[Completion]:
        started = time.perf_counter()
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.device)
        limits = [r.max_new_tokens for r in requests]
        temperature = requests[0].temperature
        stopper = _StopOnStrings(self.tokenizer, width, [r.stop for r in requests], limits)
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        if temperature > 0:
            torch.manual_seed(sum(r.seed for r in requests) + len(requests))
        with self.using_adapter(requests[0].adapter) as model:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max(limits),
                stopping_criteria=[stopper],
                pad_token_id=pad,
                top_k=None,
                **sampling,
            )
        completions = []
        eos = set(self._eos_ids())
        for row, req, ids in zip(out[:, width:].tolist(), requests, encoded):
            row = row[: req.max_new_tokens]
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            text = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
            for s in req.stop:
                if s in text:
                    text = text[: text.index(s)]
            completions.append(Completion(text.strip(), prompt_tokens=len(ids), completion_tokens=cut))
        self.usage.add(completions)
        self.usage.extra["generate_seconds"] = self.usage.extra.get("generate_seconds", 0.0) + (
            time.perf_counter() - started
        )
        return completions

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [i for i in ids + [self.tokenizer.eos_token_id, self.tokenizer.pad_token_id] if i is not None]
