"""The LM protocol: a batch of chat requests in, one completion per request out.

Every backend (tandem's transformers engine, vLLM, an OpenAI-compatible server, a cache in front
of one, the scripted LM of the tests) implements `generate`; an engine whose weights can be
trained also lends its model (`Trainable.training`). Program code never holds a global LM: it is
passed in explicitly.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ..errors import ConfigError, EngineError
from .grammar import ReplyFormat

Message = dict[str, str]


# Which code makes constrained replies: part of their cache keys and of a run's record, so a change to
# the grammar, the budget or the phases never serves old replies or resumes old steps. Bump it with them.
DECODING_VERSION = 2


@dataclass(frozen=True)
class Request:
    messages: tuple[Message, ...]
    max_new_tokens: int = 512
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    adapter: str | None = None  # path of a PEFT adapter folder; None means base weights
    seed: int = 0  # tells apart repeated samples of the same prompt at temperature > 0
    format: ReplyFormat | None = None  # constrain decoding to this reply format (None: free)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError("temperature", f"must be >= 0, got {self.temperature}")

    def key(self, model: str, adapter_digest: str | None = None, decoding: str | None = None) -> str:
        """Stable cache key: the model, the adapter's content (not its path), messages and sampling;
        for a constrained request also `decoding`, what made the reply (an engine's `decoding`)."""
        data = asdict(self)
        data["adapter"] = adapter_digest
        if data["format"] is None:  # unconstrained requests keep the keys they had before formats existed
            del data["format"]
        else:
            data["decoding"] = decoding
        data["model"] = model
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def sampling_seed(request: "Request", *more: object, bits: int = 63) -> int:
    """The seed a sampled request draws with: from its own seed and messages (and `more`, such as a
    phase), never from what shares its batch, so a reply is the same whatever it is batched with,
    as the cache (keyed per request) assumes. Every engine seeds through here."""
    digest = hashlib.sha256(repr((request.seed, request.messages, *more)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)


def eos_ids(tokenizer, *more: int | Sequence[int] | None) -> list[int]:
    """The tokens that end a reply: the tokenizer's end of sequence and `more` (a generation config's
    `eos_token_id`, which may be a list; a pad token that stands for it). Every engine asks here."""
    ids = [tokenizer.eos_token_id]
    for extra in more:
        ids += list(extra) if isinstance(extra, (list, tuple)) else [extra]
    return [i for i in dict.fromkeys(ids) if i is not None]


def chat_prompt(tokenizer, messages: Sequence[Message]) -> str:
    """The prompt text for chat messages: the tokenizer's chat template, or for base models without
    one a readable transcript. Every engine and every training run renders prompts here."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].upper()}:\n{m['content']}\n\n" for m in messages) + "ASSISTANT:\n"


def adapter_key(path: str) -> tuple[str, float]:
    """(folder, newest file time) of a PEFT adapter folder: a rewritten folder is a new adapter."""
    folder = Path(path).resolve()
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"not a PEFT adapter folder (no adapter_config.json): {folder}")
    return str(folder), max(f.stat().st_mtime for f in folder.iterdir())


FINISH_REASONS = ("stop", "length")


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    finish_reason: str = "stop"  # "length": the reply hit max_new_tokens before it ended by itself
    # The reply as the engine sampled it, in the model's tokens, the token that ended it included (an
    # end-of-sequence token, or the one that completed a stop string); None where the engine cannot say.
    # What an r step trains on: the tokens the model chose, not a re-tokenization of `text`.
    token_ids: tuple[int, ...] | None = None
    forced: tuple[int, ...] = ()  # indices into token_ids the engine wrote itself (text a reply format fixes)


def check_results(requests: Sequence[object], results: Sequence[object | None], who: str) -> list:
    """Results matched to requests by index: one per request, none missing, or a hard error.

    A silently dropped slot would shift every later reply onto the wrong request.
    """
    missing = [i for i, r in enumerate(results) if r is None]
    if len(results) != len(requests) or missing:
        raise EngineError(f"{who} returned {len(results) - len(missing)} results for {len(requests)} requests "
                          f"(missing: {missing[:5]})")
    return list(results)


@runtime_checkable
class LM(Protocol):
    name: str

    def generate(self, requests: Sequence[Request]) -> list[Completion]: ...


@dataclass
class Usage:
    """Counters an LM keeps for reporting throughput."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    batches: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, completions: Sequence[Completion]) -> None:
        for c in completions:
            self.requests += 1
            self.cache_hits += c.cached
            if not c.cached:
                self.prompt_tokens += c.prompt_tokens
                self.completion_tokens += c.completion_tokens


@dataclass
class Trainee:
    """What an engine lends a training run (`Trainable.training`): the model an adapter is added to,
    its tokenizer, and the chat renderer that made the prompts the engine served."""

    model: Any
    tokenizer: Any
    render: Callable[[Sequence[Message]], str]


@runtime_checkable
class Trainable(Protocol):
    """An engine whose weights steps can train: `training(rank)` is a context that lends a `Trainee`
    (tandem's engine: the model it serves, under its lock; vLLM and servers: a Hugging Face copy)
    and holds what must hold while it trains (vLLM asleep, a server that can load the result). The
    training itself (LoRA, policy updates) is the training package's, which imports no engine; the
    engine then serves the adapter by path."""

    def training(self, rank: int) -> AbstractContextManager[Trainee]: ...


def can_train(lm: LM, method: str) -> bool:
    """Whether `lm` can run `method` ("finetune" or "train_policy"): it trains itself, or lends a model."""
    return getattr(lm, method, None) is not None or isinstance(lm, Trainable)
