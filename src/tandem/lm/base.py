"""The LM protocol: a batch of chat requests in, one completion per request out.

Every backend (the local transformers engine, a cache in front of it, the scripted LM of the
tests, an OpenAI-compatible server later) implements `generate`. Program code never holds a
global LM: it is passed in explicitly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from ..errors import ConfigError, EngineError

Message = dict[str, str]


@dataclass(frozen=True)
class FieldFormat:
    """One output field of a constrained reply: its label, type and choices (see signatures.Field)."""

    label: str
    type: str = "text"  # text | int | number | choice
    choices: tuple[str, ...] = ()
    optional: bool = False  # free text that may be left empty (reasoning)


# Which code makes constrained replies: part of their cache keys and of a run's record, so a change to
# the grammar, the budget or the phases never serves old replies or resumes old steps. Bump it with them.
DECODING_VERSION = 2

VALUE_TOKENS = {"int": 17, "number": 24}  # the most tokens a typed value can take (one digit a token, sign, dot)


@dataclass(frozen=True)
class ReplyFormat:
    """The shape a reply must have: `Label: value`, one per output field, in order.

    Engine-neutral: `grammar()` (lm/grammar.py) is an EBNF grammar that xgrammar reads, for the
    local engine and for vLLM's structured outputs alike, so every engine enforces the same format.
    Typed values are one line; a choice may be written as declared or capitalized. Free text may
    run over lines, none of which may begin with one of `line_labels` (the signature's labels,
    inputs too), so the reply parses back exactly as it was written.
    """

    fields: tuple[FieldFormat, ...]
    line_labels: tuple[str, ...] = ()

    def grammar(self, phase: int | None = None) -> str:
        """The grammar of the whole reply, or of one phase of it (`lm.grammar.reply_grammar`)."""
        from .grammar import reply_grammar

        return reply_grammar(self, phase)


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
    from pathlib import Path

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


class Trainable:
    """Weight steps on an engine: `finetune` (w, w+) and `train_policy` (r) train one LoRA adapter with
    peft, on the model the engine's `training(rank)` context lends (see lm/training.py); the engine then
    serves the adapter by path. An engine writes only `training`: where the trainable model lives
    (tandem's engine: the one it serves; vLLM and servers: a Hugging Face copy), and what must hold
    while it trains (a lock, vLLM asleep, a server that can load the result)."""

    def finetune(self, conversations, out_dir, settings, progress: bool = True):
        """Train one LoRA adapter on chat examples; save it (PEFT, safetensors) to `out_dir`."""
        from .training import train_lora

        with self.training(settings.rank) as trainee:
            report, trainee.model = train_lora(trainee.model, trainee.tokenizer, trainee.render, conversations, out_dir,
                                               settings, progress=progress)
        return report

    def train_policy(self, calls, start, out_dir, lora, policy, progress: bool = True):
        """One policy-gradient update of the adapter at `start` (None: a new one) on scored calls; the
        result goes to `out_dir` (`out_dir/adapter`, and the optimizer's state beside it)."""
        from .training import policy_update

        with self.training(lora.rank) as trainee:
            report, trainee.model = policy_update(trainee, calls, start, out_dir, lora, policy, progress=progress)
        return report
