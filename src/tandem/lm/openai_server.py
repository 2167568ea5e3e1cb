"""tandem's LM protocol on any OpenAI-compatible server (`--engine openai --base-url URL`).

vLLM, SGLang, llama.cpp's server or a hosted endpoint, through the official `openai` client: one
chat completion per request, at most `concurrency` in flight (the server batches them), each
retried `max_retries` times by the client with backoff; a failure after that stops the step with
the server's message. Sampling settings, seed and stop strings go with every request.

Names: `--model` names the weights (a folder, an alias or a hub id: what weight steps train and whose
tokenizer prices replies), `--served-model-name` what requests ask for, where the server serves the model
under another name (vLLM's flag of the same name); by default the two are one. Both are checked up
front against the server's model list.

Adapters: a weight step trains with peft on a local copy of the weights and then loads the adapter into the
server at runtime (vLLM: `POST /v1/load_lora_adapter`, enabled by `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`
and `--enable-lora`), addressing it by name from then on. A server that cannot load adapters is
found out before training, with one line saying how to start it.

Constrained decoding sends the reply grammar (xgrammar's EBNF) in the first request field the server
honours: vLLM's `structured_outputs`, older vLLM's `guided_grammar` or SGLang's `ebnf`. Which one is
found once, with a grammar that allows one string; a server that honours none (llama.cpp's, a hosted
endpoint) is said so in one line, its replies are free and parsed after the fact, and a run records
`constrained: false` (`lm.honest_generation`). A server cannot be made to end a free field
mid-request, so a constrained reply is written a field at a time (`PhasedReply`), each phase
continuing the assistant's message within its share of the token limit, priced with the model's
tokenizer; without a tokenizer here, a constrained reply is one request whose free text is unbounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from ..errors import EngineError, UsageError
from .base import (
    DECODING_VERSION, Completion, Message, Request, Usage, adapter_key, chat_prompt, sampling_seed,
)
from .constrained import Budget, PhasedReply
from .models import ModelNotFoundError, resolve_model
from .trainer_copy import TrainerCopy
from .vllm import lora_rank_slot

log = logging.getLogger(__name__)

# Where servers take a grammar: vLLM >= 0.10, older vLLM, SGLang; all read xgrammar's EBNF.
GRAMMAR_FIELDS = ("structured_outputs", "guided_grammar", "ebnf")
PROBE = "tandem-ok"  # the one string the probe's grammar allows
_UNKNOWN = object()

RUNTIME_LORA_HINT = ("start vLLM's server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora "
                     "--max-lora-rank 64, or run weight steps with --engine transformers or vllm")


def check_served(served: dict[str, dict], name: str, weights: str, base_url: str) -> None:
    """Refuse a name the server does not serve, in one line that lists its models and the weights behind
    each (so a missing --served-model-name shows); warn where the server says it runs other weights than
    those a weight step would train."""
    if name not in served:
        bases = {n: info.get("root") for n, info in served.items() if not info.get("parent")}
        listed = ", ".join(repr(n) + (f" (weights {root})" if root and root != n else "") for n, root in bases.items())
        adapters = len(served) - len(bases)
        more = f" and {adapters} adapter{'s' * (adapters > 1)}" if adapters else ""
        raise UsageError(f"the server at {base_url} serves {listed or 'no model'}{more}, not {name!r} "
                         f"(--served-model-name names the server's model, --model its weights)")
    root = served[name].get("root")
    if root and not served[name].get("parent") and root != weights and not _same_folder(root, weights):
        log.warning("the server at %s runs %r as %s, but --model names %s: weight steps train on --model's weights",
                    base_url, name, root, weights)


def _same_folder(root: str, weights: str) -> bool:
    """Whether the server's folder is the one --model names (an alias resolves to its converted folder);
    where either is no folder here (a hub id, another machine's path), they are taken to be the same."""
    try:
        local = Path(resolve_model(weights))
    except ModelNotFoundError:
        return True
    return not (Path(root).is_dir() and local.is_dir()) or Path(root).resolve() == local.resolve()


class OpenAIEngine:
    """A model behind an OpenAI-compatible endpoint."""

    def __init__(self, model: str, base_url: str, *, served_model_name: str | None = None, api_key: str | None = None,
                 concurrency: int = 32, max_retries: int = 3, timeout: float = 600.0, dtype: str = "auto",
                 device: str = "auto"):
        try:
            import openai
        except ImportError as exc:
            raise UsageError(f"--engine openai needs the openai package: pip install openai ({exc})") from None
        self.openai = openai
        self.base_url = base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"),
                                    max_retries=max_retries, timeout=timeout)
        self.name = served_model_name or model  # what requests ask for
        self.weights = model  # what weight steps train, and the tokenizer's home
        check_served(self.served_models(), self.name, model, self.base_url)
        self.dtype_setting, self.device_setting = dtype, device  # for the trainer copy (lm/trainer_copy.py)
        self.fingerprint = f"{self.base_url}|{model}"
        self.usage = Usage()
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="tandem-openai")
        self._adapters: dict[tuple[str, float], str] = {}
        self._lock = threading.Lock()
        self._trainer: TrainerCopy | None = None  # made at the first weight step
        self._tokenizer = None
        self._ranks: set[int] = set()  # LoRA ranks the server was found to take
        self._budgets: Budget | bool | None = None
        self._setup_lock = threading.Lock()  # the grammar probe and the tokenizer are each found once
        self._grammar_field: object = _UNKNOWN
        self._token_ids = True  # ask for the sampled token ids (vLLM's `return_token_ids`) until the server refuses

    def describe(self) -> dict[str, str]:
        """What a run folder records and compares; the client's version is recorded with the others."""
        named = {"served_model_name": self.name} if self.name != self.weights else {}
        return {"engine": "openai", "base_url": self.base_url, "model": self.weights, **named,
                "decoding": self.decoding}

    def served_models(self) -> dict[str, dict]:
        """The server's model list: each name it serves, adapters included, with what the server says of it
        (vLLM: `root`, the weights' or the adapter's folder; `parent`, an adapter's base model)."""
        try:
            listed = self.client.models.list().data
        except self.openai.APIConnectionError as exc:
            raise EngineError(f"cannot reach an OpenAI-compatible server at {self.base_url} ({exc.__cause__ or exc})") \
                from None
        except self.openai.APIError as exc:
            raise EngineError(f"the server at {self.base_url} refused to list its models: {exc}") from None
        return {m.id: dict(m.model_extra or {}) for m in listed}

    @property
    def decoding(self) -> str:
        """How constrained replies are made here: a field at a time, in one request, or not at all."""
        if not self.constrains:
            return "free"
        return f"{'phased' if self._budget() else 'one-request'}-v{DECODING_VERSION}"

    @property
    def constrains(self) -> bool:
        """Whether this server honours a reply grammar (asked once)."""
        return self._grammar() is not None

    def _grammar(self) -> str | None:
        """The request field through which the server honours a grammar, found once with a grammar
        that allows one string; None (said in one line) if it ignores every one it was offered."""
        with self._setup_lock:
            if self._grammar_field is _UNKNOWN:
                self._grammar_field = next((f for f in GRAMMAR_FIELDS if self._honours(f)), None)
                if self._grammar_field is None:
                    log.warning("the server at %s ignores reply grammars (tried %s): constrained decoding is off, "
                                "replies are written freely and parsed after the fact", self.base_url,
                                ", ".join(GRAMMAR_FIELDS))
            return self._grammar_field

    def _honours(self, field: str) -> bool:
        grammar = f'root ::= "{PROBE}"'
        try:
            response = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": "Say anything."}], max_tokens=32,
                temperature=0.0, extra_body={field: {"grammar": grammar} if field == "structured_outputs" else grammar})
        except self.openai.BadRequestError:  # a server that refuses the field outright
            return False
        except self.openai.APIError as exc:
            raise EngineError(f"the server at {self.base_url} failed a request: {exc}") from None
        return (response.choices[0].message.content or "").strip() == PROBE

    def _grammar_body(self, grammar: str) -> dict:
        field = self._grammar()
        return {field: {"grammar": grammar} if field == "structured_outputs" else grammar}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the LM protocol ---------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        futures = [self._pool.submit(self._one, r) for r in requests]
        return [f.result() for f in futures]

    def _one(self, request: Request) -> Completion:
        """One request; a constrained one a field at a time (PhasedReply), continuing the assistant's
        message (vLLM's `continue_final_message`), so the free text stays within its share."""
        fmt = request.format if request.format is not None and self.constrains else None
        budget = self._budget() if fmt is not None else None
        reply = PhasedReply(request, budget) if budget is not None else None
        prompt_tokens = used = 0
        text, finish = "", "stop"
        while reply is None or reply.next_phase():
            extra: dict = {}
            messages = list(request.messages)
            if reply is not None:
                extra.update(self._grammar_body(reply.grammar()))
                if reply.text:
                    messages.append({"role": "assistant", "content": reply.text})
                    extra.update(continue_final_message=True, add_generation_prompt=False)
            elif fmt is not None:
                extra.update(self._grammar_body(fmt.grammar()))
            # Each phase draws with its own seed, as on vLLM in process (the phase is part of it).
            seed = sampling_seed(request, *([reply.field] if reply else []), bits=32) if request.temperature > 0 else None
            # A sampled reply made in one request comes with its token ids where the server gives them, for r steps
            # to train on what was sampled; a phased one does not (each phase continues from re-rendered text).
            ids = reply is None and request.temperature > 0 and self._token_ids
            kwargs = dict(model=self._served_name(request.adapter), messages=messages,
                          max_tokens=reply.max_tokens() if reply else request.max_new_tokens,
                          temperature=request.temperature, stop=list(request.stop) or None, seed=seed)
            try:
                try:
                    response = self.client.chat.completions.create(
                        **kwargs, extra_body={**extra, **({"return_token_ids": True} if ids else {})} or None)
                except self.openai.BadRequestError:
                    if not ids:
                        raise
                    self._token_ids = ids = False  # a server that refuses the field: said once, asked no more
                    log.warning("the server at %s does not return token ids: r steps re-tokenize its replies",
                                self.base_url)
                    response = self.client.chat.completions.create(**kwargs, extra_body=extra or None)
            except self.openai.APIError as exc:
                raise EngineError(f"the server at {self.base_url} failed a request: {exc}") from None
            choice, usage = response.choices[0], response.usage
            prompt_tokens = prompt_tokens or (getattr(usage, "prompt_tokens", 0) or 0)
            tokens = getattr(usage, "completion_tokens", 0) or 0
            # vLLM counts the end-of-sequence token that closes a reply (its stop_reason is then None);
            # it is not part of the reply.
            extras = choice.model_extra or {}
            if choice.finish_reason == "stop" and "stop_reason" in extras and extras["stop_reason"] is None:
                tokens = max(tokens - 1, 0)
            if reply is None:
                text, used, finish = choice.message.content or "", tokens, choice.finish_reason
                sampled = extras.get("token_ids") if ids else None
                break
            reply.take(choice.message.content or "", tokens, choice.finish_reason)
        if reply is not None:
            text, used, finish, sampled = reply.text, reply.used, reply.finish, None
        completion = Completion(text.strip(), prompt_tokens=prompt_tokens, completion_tokens=used,
                                finish_reason="length" if finish == "length" else "stop",
                                token_ids=tuple(sampled) if sampled else None)
        with self._lock:
            self.usage.add([completion])
        return completion

    def _budget(self) -> Budget | None:
        """Token costs of reply formats, from the model's own tokenizer where it can be found here;
        without one, a constrained reply is one request and its free text is not bounded."""
        with self._setup_lock:  # the pool's threads ask at once; transformers' lazy imports are not thread-safe
            return self._make_budget()

    def _make_budget(self) -> Budget | None:
        if self._budgets is None:
            try:
                from transformers import AutoTokenizer

                self._budgets = Budget(AutoTokenizer.from_pretrained(resolve_model(self.weights)),
                                       jump_forward=False)
            except Exception as exc:  # no local tokenizer: the one-request fallback, said once
                log.warning("no tokenizer for %s here (%s): constrained replies are not bounded by the token "
                            "limit on this server", self.weights, exc)
                self._budgets = False
        return self._budgets or None

    # -- adapters ------------------------------------------------------------------------------

    def _post(self, path: str, body: dict):
        import httpx

        root = self.base_url.removesuffix("/v1")
        return httpx.post(f"{root}/v1/{path}", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {self.client.api_key}"})

    def can_load_adapters(self) -> bool:
        """Whether the server has vLLM's runtime LoRA endpoint (an empty body is refused, not unknown)."""
        return self._post("load_lora_adapter", {}).status_code != 404

    def load_adapter(self, path: str) -> str:
        """Load the PEFT adapter folder at `path` into the server (once) and return the model name that
        addresses it, for clients other than tandem's own (DSPy's, through tandem.integrations.dspy)."""
        return self._served_name(path)

    def _served_name(self, path: str | None) -> str:
        """The model name to ask for: the base model, or the adapter loaded into the server for `path`."""
        if path is None:
            return self.name
        key = adapter_key(path)
        folder = key[0]
        with self._lock:
            if key not in self._adapters:
                name = "tandem-" + hashlib.sha256(repr(key).encode()).hexdigest()[:12]
                started = time.perf_counter()
                response = self._post("load_lora_adapter", {"lora_name": name, "lora_path": folder})
                if response.status_code == 404:
                    raise UsageError(f"the server at {self.base_url} cannot load adapters at runtime: {RUNTIME_LORA_HINT}")
                if response.status_code >= 400 and "already been loaded" not in response.text:
                    raise EngineError(f"the server at {self.base_url} did not load adapter {folder}: "
                                      f"{response.status_code} {response.text[:300]}")
                log.info("loaded adapter %s into the server at %s as %s (%.1f s)", folder, self.base_url, name,
                         time.perf_counter() - started)
                self._adapters[key] = name
            return self._adapters[key]

    def check_rank(self, rank: int) -> None:
        """Refuse, before anything trains, a LoRA rank above the server's `--max-lora-rank` (asked once a rank).

        vLLM reads an adapter's adapter_config.json and checks its rank before it reads any weights
        (`PEFTHelper.validate_legal`, in the worker's LoRA manager), and the OpenAI API shows no limit. So
        the probe is that file alone, with `r` = rank: vLLM refuses it for its rank, or else for having no
        weights, and loads nothing either way. A server that answers otherwise (another server; one without
        runtime LoRA, which `can_load_adapters` finds; one that cannot read the probe's folder, which vLLM
        answers 404 like a missing route) leaves the rank unchecked here: loading the adapter will say."""
        if rank in self._ranks:
            return
        with tempfile.TemporaryDirectory(prefix="tandem-rank-probe-") as folder:
            config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj"], "bias": "none"}
            (Path(folder) / "adapter_config.json").write_text(json.dumps(config))
            name = f"tandem-rank-probe-{rank}"
            response = self._post("load_lora_adapter", {"lora_name": name, "lora_path": folder})
        limit = re.search(r"greater than max_lora_rank (\d+)", response.text)
        if limit:
            raise UsageError(f"the server at {self.base_url} takes LoRA adapters up to rank {limit.group(1)} (its "
                             f"--max-lora-rank) and this weight step trains rank {rank}: train rank {limit.group(1)} "
                             f"or less, or start the server with --max-lora-rank {lora_rank_slot(rank)}")
        if response.status_code < 400:  # a server that loaded a weightless adapter: take it out again
            self._post("unload_lora_adapter", {"lora_name": name})
        log.debug("rank probe of the server at %s: %s %s", self.base_url, response.status_code, response.text[:200])
        self._ranks.add(rank)

    @contextlib.contextmanager
    def training(self, rank: int):
        """Peft on a local copy of the model's own weights (lm/trainer_copy.py: in the dtype and on the device
        tandem chose, off the GPU between steps); the server then loads the adapter at runtime. A server that
        cannot load adapters, or not of this rank, is refused first."""
        if not self.can_load_adapters():
            raise UsageError(f"the server at {self.base_url} cannot load adapters at runtime: {RUNTIME_LORA_HINT}")
        self.check_rank(rank)
        from transformers import AutoTokenizer

        if self._trainer is None:
            try:
                path = resolve_model(self.weights)
                self._tokenizer = AutoTokenizer.from_pretrained(path)
                copy = TrainerCopy(path, self.dtype_setting, self.device_setting,
                                   what=f"{self.weights} (served at {self.base_url})",
                                   room="start a server on this GPU with a lower --gpu-memory-utilization")
                copy.load()
            except (ModelNotFoundError, OSError) as exc:
                raise UsageError(f"a weight step on --engine openai trains locally, so --model must name the weights "
                                 f"the server runs (a folder or hub id; --served-model-name the server's name for "
                                 f"them): {exc}") from None
            self._trainer = copy
        with self._trainer.lend(self._tokenizer, self._render) as trainee:
            yield trainee

    @property
    def path(self) -> str:
        """The weights' folder, for training under a launcher (the server's model, found locally)."""
        return resolve_model(self.weights)

    def _render(self, messages: Sequence[Message]) -> str:
        return chat_prompt(self._tokenizer, messages)
