"""Language-model backends behind one protocol: `generate(requests) -> completions`."""

from .base import LM, Completion, Request, Usage
from .cache import CachedLM
from .models import ModelNotFoundError, resolve_model
from .scripted import ScriptedLM


def load_lm(model: str, *, cache: str | None = None, **engine_options) -> LM:
    """The local transformers engine for `model`, behind the on-disk cache unless `cache` is None."""
    from .local import LocalLM

    engine = LocalLM(model, **engine_options)
    return CachedLM(engine, cache) if cache else engine


__all__ = ["LM", "Completion", "Request", "Usage", "CachedLM", "ScriptedLM", "ModelNotFoundError", "resolve_model", "load_lm"]
