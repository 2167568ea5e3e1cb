"""The local backend: one transformers model, batched generation, several LoRA adapters on one base.

Requests from many threads are gathered by a `DynamicBatcher`; each gathered batch is split
into groups that can share one `generate` call (same adapter and temperature), sorted by prompt
length so that left-padding wastes little. Adapters are PEFT folders loaded once onto the same
base model and switched per group: no reload, no merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import ConfigError
from .base import (
    DECODING_VERSION, Completion, Message, Request, Trainee, Usage, adapter_key, chat_prompt, check_results,
    eos_ids, sampling_seed,
)
from .batching import Cancelled, DynamicBatcher
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


def probe_shape(model_path: str | Path | None = None) -> tuple[int, int, int]:
    """(rows, hidden, intermediate): the model's MLP up-projection, which the dtype probe times.

    Kernels differ by shape, so the probe times the model's own (from its config.json where the
    model is a folder; a typical small model's otherwise), each side capped at 4096 (a larger matrix
    costs the probe time and memory, not other kernels), with rows for ~1e8 FLOP a call: a batch's
    worth of tokens, and cheap to time even where bf16 is emulated.
    """
    hidden, intermediate = 1024, 4096
    config = Path(model_path) / "config.json" if model_path else None
    if config is not None and config.is_file():
        with contextlib.suppress(ValueError, TypeError, OSError):
            cfg = json.loads(config.read_text(encoding="utf-8"))
            cfg = cfg.get("text_config") or cfg  # multimodal configs nest the language model's
            h = int(cfg.get("hidden_size") or cfg.get("n_embd"))
            hidden, intermediate = h, int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * h)
    hidden, intermediate = min(hidden, 4096), min(intermediate, 4096)
    return max(8, min(256, 10**8 // (2 * hidden * intermediate))), hidden, intermediate


def probe_dtype_speeds(shape: tuple[int, int, int], calls: int = 24, budget_s: float = 0.3) -> tuple[float, float]:
    """(bf16, fp32) FLOP/s of a `shape` (rows, k, n) matmul on one CPU core: the fastest of `calls`
    of each, alternating, fewer once `budget_s` has passed (only emulated bf16 gets there).

    The first calls in a dtype pay one-time costs (kernel generation): an AVX512-BF16 EPYC ran
    its first bf16 256^3 call at 3 GFLOP/s and its fourth at ~300, so the fastest call is the
    steady rate. One thread, because with every core in use another process on any of them stalls
    each call at the thread pool's barrier (measured on 2 busy cores: 6-14 GFLOP/s instead of
    160-350, in either dtype); the bf16/fp32 ratio is the instruction set's, not the core count's.
    Alternating the dtypes puts any remaining disturbance on both.
    """
    rows, k, n = shape
    pairs = [(torch.randn(rows, k, dtype=d), torch.randn(n, k, dtype=d)) for d in (torch.bfloat16, torch.float32)]
    best = [math.inf, math.inf]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        for _ in range(calls):
            for i, (x, w) in enumerate(pairs):
                t = time.perf_counter()
                torch.nn.functional.linear(x, w)  # what the model's Linear layers call
                best[i] = min(best[i], time.perf_counter() - t)
            if time.perf_counter() - started > budget_s:
                break
    finally:
        torch.set_num_threads(threads)
    return 2 * rows * k * n / best[0], 2 * rows * k * n / best[1]


def choose_dtype(bf16_flops: float, fp32_flops: float, margin: float = 1.5) -> torch.dtype:
    """bf16 only where it is clearly faster. Native bf16 runs matmuls ~2x fp32 and emulated bf16
    ~100x slower (an AVX2-only EPYC), so a margin costs nothing and keeps a noisy timing from
    flipping the choice."""
    return torch.bfloat16 if bf16_flops > margin * fp32_flops else torch.float32


def pick_dtype(requested: str, device: str, model_path: str | Path | None = None) -> torch.dtype:
    """'auto': bf16 on GPUs; on a CPU, bf16 where it times clearly faster than fp32 on the model's
    matmul shape (`model_path`: its folder, for `probe_shape`), else fp32.

    Without native bf16 a CPU emulates it ~100x slower than fp32 (measured on an AVX2-only EPYC),
    so the choice is made by timing both, not by habit.
    """
    if requested != "auto":
        if requested not in DTYPES:
            raise ConfigError("dtype", f"must be 'auto' or one of {sorted(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    if device != "cpu":
        return torch.bfloat16
    shape = probe_shape(model_path)
    bf16, fp32 = probe_dtype_speeds(shape)
    chosen = choose_dtype(bf16, fp32)
    log.info("dtype auto: bf16 %.0f GFLOP/s, fp32 %.0f GFLOP/s (one core, %dx%d @ %dx%d) -> %s", bf16 / 1e9, fp32 / 1e9,
             shape[0], shape[1], shape[1], shape[2], str(chosen).removeprefix("torch."))
    return chosen


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer with its room reserved up front: each step writes in place.

    transformers' DynamicLayer concatenates the whole cache every step, which on a CPU costs
    more than the model's matmuls once a batch holds a few thousand tokens of context.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = key_states.new_empty(b, h, self.capacity, d)
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self._k.shape[-2]:  # more than reserved: double the room
            grow = max(n, self._k.shape[-2])
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow, self._k.shape[-1])], dim=-2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow, self._v.shape[-1])], dim=-2)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def _shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all rows share, leaving every row at least one token of its own."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for row in rows[1:]:
        i = 0
        while i < n and row[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _generator(request: Request, device: str) -> torch.Generator:
    """A random stream for one request, from its seed and content (not from its batch-mates)."""
    return torch.Generator(device=device).manual_seed(sampling_seed(request))


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
        min_shared_prefix: int = 32,
    ):
        """`min_shared_prefix`: prompts of a batch that share at least this many leading tokens
        prefill them once (0 turns sharing off)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        self.dtype = pick_dtype(dtype, device, path)
        self.path = path  # the weights' folder: a weight step under a launcher trains from it
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
        # What the cache keys on: the same weights in another dtype give other replies.
        self.fingerprint = f"{self.name}|{str(self.dtype).removeprefix('torch.')}"
        log.info("loaded %s (%s) on %s", model, self.dtype, device)
        self.device = device
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.usage = Usage()
        self.min_shared_prefix = min_shared_prefix
        self.lock = threading.RLock()  # held while the model generates or trains
        self._adapters: dict[tuple[str, float], str] = {}
        self._constraint_builder = None  # built at the first request with a reply format
        self.max_batch = max_batch
        self._batcher = DynamicBatcher(self._run_batch, max_batch=max_batch, max_wait=max_wait)

    # -- the LM protocol ---------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return self._batcher.submit(list(requests))

    def cancel(self) -> None:
        """Stop the running batch within one decode step and fail the waiting calls (Ctrl-C)."""
        self._batcher.cancel()

    decoding = f"forced-v{DECODING_VERSION}"  # constrained replies in one pass, breaks forced (lm/constrained.py)

    def describe(self) -> dict[str, str]:
        """What a run folder records about the engine: the dtype actually chosen, not 'auto'."""
        return {"engine": "transformers", "model": self.name, "dtype": str(self.dtype).removeprefix("torch."),
                "device": self.device, "decoding": self.decoding}

    def close(self) -> None:
        self._batcher.close()

    # -- prompts -----------------------------------------------------------------------------

    def prompt_text(self, messages: Sequence[Message]) -> str:
        return chat_prompt(self.tokenizer, messages)

    def encode(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenizer(self.prompt_text(messages), add_special_tokens=False)["input_ids"]

    # -- adapters ----------------------------------------------------------------------------

    def _adapter_name(self, path: str) -> str:
        key = adapter_key(path)
        folder = key[0]
        if key not in self._adapters:  # a rewritten folder is another adapter
            from peft import PeftModel

            name = "a" + hashlib.sha256(repr(key).encode()).hexdigest()[:12]
            # Loaded as ordinary tensors even from inside generation's inference mode: a later
            # fine-tune touches every adapter's requires_grad, which inference tensors refuse.
            with torch.inference_mode(False):
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
                if isinstance(self.model, PeftModel) and self.model.active_adapter in self.model.peft_config:
                    with self.model.disable_adapter():
                        yield self.model
                elif isinstance(self.model, PeftModel):  # a training run deleted the last adapter it held
                    yield self.model.base_model.model
                else:
                    yield self.model
            else:
                name = self._adapter_name(path)  # may wrap self.model in a PeftModel: look it up after
                self.model.set_adapter(name)
                yield self.model

    # -- fine-tuning -------------------------------------------------------------------------

    @contextlib.contextmanager
    def training(self, rank: int):
        """The served model itself; generation waits while it trains (same lock)."""

        with self.lock:
            trainee = Trainee(self.model, self.tokenizer, self.prompt_text)
            try:
                yield trainee
            finally:
                self.model = trainee.model  # a plain model comes back wrapped as a PeftModel

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
        return check_results(requests, results, "local engine")

    @torch.inference_mode()
    def _generate_group(self, requests: list[Request], encoded: list[list[int]]) -> list[Completion]:
        started = time.perf_counter()
        limits = [r.max_new_tokens for r in requests]
        # Each sampled request draws from its own generator, seeded by the request alone: its reply
        # does not depend on what shares its batch, as the cache (keyed per request) assumes.
        generators = [_generator(r, self.device) for r in requests] if requests[0].temperature > 0 else None
        with self.using_adapter(requests[0].adapter) as model:
            rows, ended, ends, forced = self._decode(model, encoded, limits, [r.stop for r in requests],
                                                     requests[0].temperature, generators, [r.format for r in requests])
        completions = []
        for row, req, ids, stopped, end, wrote in zip(rows, requests, encoded, ended, ends, forced):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for s in req.stop:
                if s in text:
                    text = text[: text.index(s)]
            completions.append(Completion(text.strip(), prompt_tokens=len(ids), completion_tokens=len(row),
                                          finish_reason="stop" if stopped else "length",
                                          token_ids=tuple(row + ([end] if end is not None else [])),
                                          forced=tuple(wrote)))
        self.usage.add(completions)
        self.usage.extra["generate_seconds"] = self.usage.extra.get("generate_seconds", 0.0) + (
            time.perf_counter() - started
        )
        return completions

    def _prefill(self, model, encoded: list[list[int]], room: int):
        """Run the prompts through the model into a fresh KV cache; return it, the last logits,
        the attention mask and each row's next position.

        Prompts of one module share a long prefix (instructions and demos). It is computed once,
        its cache copied to every row, and only the rest of each prompt is run per row: the
        padding goes between the shared part and each row's own part, masked out.
        """
        shared = _shared_prefix(encoded) if len(encoded) > 1 and self.min_shared_prefix > 0 else 0
        if shared < self.min_shared_prefix:
            shared = 0
        pad = self.tokenizer.pad_token_id
        rest = [ids[shared:] for ids in encoded]
        width = max(len(ids) for ids in rest)
        cache = DynamicCache(config=model.config)
        cache.layers = [_GrowingLayer(shared + width + room) for _ in range(model.config.num_hidden_layers)]
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rest], device=self.device)
        if shared:
            prefix = torch.tensor([encoded[0][:shared]], device=self.device)
            model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_select_indices(torch.zeros(len(encoded), dtype=torch.long, device=self.device))  # one copy a row
            mask = torch.cat([mask.new_ones(len(encoded), shared), mask], dim=1)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rest], device=self.device)
        positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, shared:]
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        self.usage.extra["shared_prefix_tokens"] = self.usage.extra.get("shared_prefix_tokens", 0) + shared * (len(encoded) - 1)
        return cache, logits, mask, positions[:, -1] + 1

    def _constraints(self):
        if self._constraint_builder is None:
            from .constrained import Constraints

            self._constraint_builder = Constraints(self.tokenizer, self.model.config.vocab_size, self._eos_ids())
        return self._constraint_builder

    def _decode(self, model, encoded, limits, stops, temperature, generators=None, formats=None):
        """Prefill, then decode token by token; a finished row leaves the batch at once.

        A row finishes at an end-of-sequence token or one of its stop strings (it ended by
        itself), or at its own token limit (it was cut). Removing finished rows (and their cache)
        means a batch costs what its live rows need, not what its longest reply needs.
        A row with a reply format is masked to what the format allows (lm/constrained.py).
        Returns per row: the generated ids, whether it ended by itself, the end-of-sequence token that
        ended it (None: a stop string or the limit did), and the indices of the ids the format forced.
        """
        eos = set(self._eos_ids())
        cache, logits, mask, next_pos = self._prefill(model, encoded, max(limits))
        active = list(range(len(limits)))
        rows: list[list[int]] = [[] for _ in limits]
        ended = [False] * len(limits)
        ends: list[int | None] = [None] * len(limits)
        wrote: list[list[int]] = [[] for _ in limits]  # indices of forced tokens, per row
        formats = formats or [None] * len(limits)
        constraints = ([self._constraints().row(f, n) if f else None for f, n in zip(formats, limits)]
                       if any(formats) else None)
        while True:
            if self._batcher.cancelling:
                raise Cancelled(f"generation cancelled after {max(map(len, rows))} tokens")
            if constraints:
                logits = self._constraints().apply(logits, [constraints[i] for i in active], [len(rows[i]) for i in active])
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                tokens = torch.cat([torch.multinomial(probs[j], 1, generator=generators[i]) for j, i in enumerate(active)])
            else:
                tokens = logits.argmax(dim=-1)
            if constraints:
                for j, i in enumerate(active):
                    forced = constraints[i].next_forced() if constraints[i] else None
                    if forced is not None:
                        tokens[j] = forced
                        wrote[i].append(len(rows[i]))
            keep = []
            for j, (i, t) in enumerate(zip(active, tokens.tolist())):
                if constraints and constraints[i]:
                    constraints[i].accept(t)
                if t in eos:
                    ended[i], ends[i] = True, t
                    continue
                rows[i].append(t)
                if stops[i] and any(s in self.tokenizer.decode(rows[i][-12:]) for s in stops[i]):
                    ended[i] = True
                    continue
                if len(rows[i]) >= limits[i]:
                    continue
                keep.append(j)
            if not keep:
                return rows, ended, ends, wrote
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                           past_key_values=cache, use_cache=True).logits[:, -1]
            next_pos = next_pos + 1

    def _eos_ids(self) -> list[int]:
        return eos_ids(self.tokenizer, self.model.generation_config.eos_token_id, self.tokenizer.pad_token_id)
