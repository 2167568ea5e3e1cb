"""Language-model backends behind one protocol: `generate(requests) -> completions` (base.py), the
engines (tandem's transformers engine, vLLM, an OpenAI-compatible server), the reply grammar and
constrained decoding, the call cache, and model resolution. `load_lm` builds the engine a name asks for.

May import: errors, settings. Nothing above it (program, training, optimizers) and no training:
an engine lends its model to train (`training(rank)`) and serves the adapter that comes back."""

from ..errors import UsageError
from ..settings import EngineSettings
from .base import LM, Completion, Request, Usage
from .cache import CachedLM
from .models import ModelNotFoundError, resolve_model


def load_lm(model: str, *, cache: str | None = None, lora_rank: int = 16, **options) -> LM:
    """`model` on the engine `options` name (fields of `EngineSettings`: engine, dtype, base_url, ...),
    behind the on-disk cache unless `cache` is None. `load_lm("smollm2-135m")` is tandem's own engine.
    `lora_rank`: the rank weight steps will train (vLLM reserves room for adapters up to it)."""
    settings = EngineSettings(**{"engine": "transformers", **options})
    kind = choose_engine(settings.engine)
    device = choose_device(settings.device)
    if settings.served_model_name and kind != "openai":
        raise UsageError(f"--served-model-name names a model on a server: it goes with --engine openai, not {kind}")
    if settings.adapter_share and kind != "openai":
        raise UsageError(f"--adapter-share is where servers read adapters: it goes with --engine openai, not {kind}")
    # Each engine is imported when it is asked for: they import torch, and vLLM or the openai client (extras),
    # which `import tandem` and the CLI's start do not need.
    if kind == "vllm":
        from .vllm import VLLMEngine

        engine = VLLMEngine(model, dtype=settings.dtype, device=device, max_batch=settings.max_batch,
                            max_model_len=settings.max_model_len, kv_cache_fraction=settings.kv_cache_fraction,
                            tensor_parallel_size=settings.tensor_parallel_size, eager=settings.eager,
                            max_lora_rank=lora_rank)
    elif kind == "openai":
        from .openai_server import OpenAIEngine

        if not settings.base_url:
            raise UsageError("--engine openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
        # The trainer copy decides its device at the first weight step: `auto` takes the GPU only where the
        # copy fits beside what the GPU holds (a server on the same GPU), else the CPU (lm/trainer_copy.py).
        engine = OpenAIEngine(model, settings.base_url, served_model_name=settings.served_model_name,
                              concurrency=settings.concurrency, timeout=settings.request_timeout,
                              dtype=settings.dtype, device=settings.device, adapter_share=settings.adapter_share)
    else:
        from .local import LocalLM

        engine = LocalLM(model, dtype=settings.dtype, device=device, max_batch=settings.max_batch)
    return CachedLM(engine, cache) if cache else engine


def choose_device(name: str) -> str:
    """`auto`: the first CUDA GPU where there is one, else the CPU; any other name as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def honest_generation(lm: LM, generation):
    """`generation` as `lm` can honour it: on an engine that cannot constrain decoding (a server that
    ignores grammars) constrained decoding is turned off, so no run records it falsely."""
    from dataclasses import replace

    if generation.constrained and getattr(lm, "constrains", True) is False:
        return replace(generation, constrained=False)
    return generation


def choose_engine(name: str) -> str:
    """`auto`: vLLM where a CUDA GPU and vLLM are both present (it is the engine there), else tandem's
    own. On a CPU, tandem's engine is the default: vLLM's CPU build runs about 2x faster once up, but
    starts in 30-80 s and takes 6-7 GB, which short jobs like the main one do not win back."""
    if name != "auto":
        return name
    import importlib.util

    import torch

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "transformers"


__all__ = ["LM", "Completion", "Request", "Usage", "CachedLM", "ModelNotFoundError", "resolve_model", "load_lm",
           "choose_engine", "choose_device", "honest_generation"]
