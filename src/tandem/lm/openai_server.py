"""tandem's LM protocol on any OpenAI-compatible server (`--engine openai --base-url URL`), or on several
serving the same weights (`--base-url` once per server; lm/servers.py spreads requests, takes out a server
that stops answering and brings adapters to each).

vLLM, SGLang, llama.cpp's server or a hosted endpoint, through the official `openai` client: one
chat completion per request, at most `concurrency` in flight (the servers batch them), each
retried `max_retries` times by the client with backoff; a server that still does not answer, or answers
that it is not serving (lm/servers.py), is taken out and the request goes to another; one that answers
with an error stops the step with its message.
Sampling settings, seed and stop strings go with every request.

Names: `--model` names the weights (a folder, an alias or a hub id: what weight steps train and whose
tokenizer prices replies), `--served-model-name` what requests ask for, where the server serves the model
under another name (vLLM's flag of the same name); by default the two are one. Both are checked up
front against every server's model list; several servers must answer one greedy request alike (the
same weights), or the run is refused naming the two that differ.

Adapters: a weight step trains with peft on a local copy of the weights and then loads the adapter into
every server at runtime (vLLM: `POST /v1/load_lora_adapter`, enabled by `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`
and `--enable-lora`; the files sent to a `tandem serve` server, or put in `--adapter-share`), before any
request asks for it, addressing it by name from then on. A server that could not load the step's adapter
is found before training (`check_adapters`), with one line saying what to do.

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
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from ..errors import EngineError, UsageError
from .base import (
    DECODING_VERSION, Completion, Message, Request, Usage, adapter_key, chat_prompt, sampling_seed,
)
from .cache import adapter_digest
from .constrained import Budget, PhasedReply
from .models import ModelNotFoundError, resolve_model
from .servers import STRIKES, Pool, Server, Share, Unavailable, copy_to_share, prefix_key, probe_adapter, \
    refusal, runtime_lora_hint
from .trainer_copy import TrainerCopy

log = logging.getLogger(__name__)

# Where servers take a grammar: vLLM >= 0.10, older vLLM, SGLang; all read xgrammar's EBNF.
GRAMMAR_FIELDS = ("structured_outputs", "guided_grammar", "ebnf")
PROBE = "tandem-ok"  # the one string the probe's grammar allows
_UNKNOWN = object()



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
    """A model behind one or several OpenAI-compatible endpoints."""

    def __init__(self, model: str, base_url: str | Sequence[str], *, served_model_name: str | None = None,
                 api_key: str | None = None, concurrency: int = 32, max_retries: int = 3, timeout: float = 600.0,
                 dtype: str = "auto", device: str = "auto", adapter_share: str | None = None):
        try:
            import openai
        except ImportError as exc:
            raise UsageError(f"--engine openai needs the openai package: pip install openai ({exc})") from None
        self.openai = openai
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise UsageError("--engine openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
        twice = next((u for i, u in enumerate(urls) if u.rstrip("/") in [v.rstrip("/") for v in urls[:i]]), None)
        if twice:
            raise UsageError(f"--base-url {twice} is given twice: give each server once")
        key = api_key or os.environ.get("OPENAI_API_KEY", "none")
        self.servers = [Server(u, openai, api_key=key, max_retries=max_retries, timeout=timeout) for u in urls]
        self.base_url = self.servers[0].url
        self.name = served_model_name or model  # what requests ask for
        self.weights = model  # what weight steps train, and the tokenizer's home
        for server in self.servers:
            check_served(server.models(), self.name, model, server.url)
        if len(self.servers) > 1:
            self._check_same_weights(self.servers)
        self.dtype_setting, self.device_setting = dtype, device  # for the trainer copy (lm/trainer_copy.py)
        # The cache's key for replies: the weights, not the servers (checked above to serve the same ones), so
        # a run resumed on other servers finds its replies.
        self.fingerprint = f"openai|{self.name}|{model}"
        self.usage = Usage()
        self.concurrency = concurrency
        self.share = Share.parse(adapter_share) if adapter_share else None
        self.pool = Pool(self.servers, slack=max(2, concurrency // (4 * len(self.servers))), back=self._answers)
        self.adapter_loads: list[dict] = []  # server, way, seconds of each adapter load (bench/servers.py)
        self.retries = 0  # requests sent again after a server did not answer them (bench/servers.py)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="tandem-openai")
        self._adapters: dict[tuple[str, float], str] = {}
        self._checked: set[tuple[str, str, int]] = set()
        self._lock = threading.Lock()  # the counters (usage, retries)
        # Adapter loads: a request for an adapter waits for its load, a request without one does not (nor does
        # the accounting of replies), however long a server takes to load or to time out.
        self._loading = threading.Lock()
        self._trainer: TrainerCopy | None = None  # made at the first weight step
        self._tokenizer = None
        self._budgets: Budget | bool | None = None
        self._setup_lock = threading.Lock()  # the grammar probe and the tokenizer are each found once
        self._grammar_field: object = _UNKNOWN
        self._token_ids = True  # ask for the sampled token ids (vLLM's `return_token_ids`) until the server refuses

    def describe(self) -> dict[str, object]:
        """What a run folder records and compares; the client's version is recorded with the others."""
        named = {"served_model_name": self.name} if self.name != self.weights else {}
        urls = [s.url for s in self.servers]
        return {"engine": "openai", "base_url": urls[0] if len(urls) == 1 else urls, "model": self.weights, **named,
                "decoding": self.decoding}

    def served_models(self) -> dict[str, dict]:
        """The first server's model list (`Server.models`)."""
        return self.servers[0].models()

    def _check_same_weights(self, servers: Sequence[Server]) -> None:
        """Several servers must serve the same weights: one greedy request of 8 tokens, the same reply from each.
        This tells apart other weights or a dtype that changes those 8 tokens, not every difference."""
        replies = {}
        for server in servers:
            try:
                response = server.client.chat.completions.create(
                    model=self.name, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=8,
                    temperature=0.0, seed=0)
            except self.openai.APIError as exc:
                raise EngineError(f"the server at {server.url} failed a request: {exc}") from None
            replies[server.url] = response.choices[0].message.content or ""
        first, reply = next(iter(replies.items()))
        for url, other in replies.items():
            if other != reply:
                raise UsageError(f"the servers at {first} and {url} serve different weights as {self.name!r}: the same "
                                 f"greedy request got {reply!r} from one and {other!r} from the other; start every "
                                 "server on the same weights and --dtype, or give only those that are")

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
                                "replies are written freely and parsed after the fact", self.pool.pick(b"").url,
                                ", ".join(GRAMMAR_FIELDS))
            return self._grammar_field

    def _honours(self, field: str) -> bool:
        grammar = f'root ::= "{PROBE}"'
        server = self.pool.pick(b"")
        try:
            response = server.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": "Say anything."}], max_tokens=32,
                temperature=0.0, extra_body={field: {"grammar": grammar} if field == "structured_outputs" else grammar})
        except self.openai.BadRequestError:  # a server that refuses the field outright
            return False
        except self.openai.APIError as exc:
            raise EngineError(f"the server at {server.url} failed a request: {exc}") from None
        return (response.choices[0].message.content or "").strip() == PROBE

    def _grammar_body(self, grammar: str) -> dict:
        field = self._grammar()
        return {field: {"grammar": grammar} if field == "structured_outputs" else grammar}

    def _answers(self, server: Server) -> None:
        """A server taken out may come back once it answers as at the start: it serves the model, and the same
        greedy reply as a server still in (raises where not)."""
        check_served(server.models(), self.name, self.weights, server.url)
        live = self.pool.live()
        if live:
            self._check_same_weights([live[0], server])

    def close(self) -> None:
        self.pool.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the LM protocol ---------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        futures = [self._pool.submit(self._one, r) for r in requests]
        return [f.result() for f in futures]

    def _one(self, request: Request) -> Completion:
        """One request on the server the pool picks. Where that server does not answer, the request, all of it,
        is sent again, to the server the pool picks then: the same one after a timeout, another once it is
        taken out (`Pool.failed`; an adapter is on every server still in before any request asks for it).
        A server that lost an adapter (restarted) gets it again. The step stops where a server still in (it
        answers other requests between) leaves this request unanswered STRIKES times: the request itself is
        the trouble (a reply longer than the timeout allows); and where it went unanswered STRIKES times per
        server, servers coming back and going again. With no server left, the pool says so."""
        key, reloaded, unanswered = prefix_key(request), set(), Counter()
        while True:
            with self.pool.lease(key) as server:
                try:
                    completion = self._on(server, request)
                    self.pool.answered(server)
                    return completion
                except Unavailable as exc:
                    failure = exc
                except self.openai.NotFoundError as exc:
                    if request.adapter is None or server.url in reloaded:
                        raise EngineError(f"the server at {server.url} failed a request: {exc}") from None
                    reloaded.add(server.url)
                    try:
                        self._reload(server, request.adapter)
                        continue
                    except Unavailable as exc:
                        failure = exc
                self.pool.failed(server, failure)
                unanswered[server.url] += 1
                with self._lock:
                    self.retries += 1
                if (server.alive and unanswered[server.url] >= STRIKES) or \
                        unanswered.total() >= STRIKES * len(self.servers):
                    raise EngineError(f"a request went unanswered {unanswered.total()} times, the last time by the "
                                      f"server at {server.url} ({failure})") from None

    def _on(self, server: Server, request: Request) -> Completion:
        """One request on `server`; a constrained one a field at a time (PhasedReply), continuing the
        assistant's message (vLLM's `continue_final_message`), so the free text stays within its share."""
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
                    response = server.client.chat.completions.create(
                        **kwargs, extra_body={**extra, **({"return_token_ids": True} if ids else {})} or None)
                except self.openai.BadRequestError:
                    if not ids:
                        raise
                    self._token_ids = ids = False  # a server that refuses the field: said once, asked no more
                    log.warning("the server at %s does not return token ids: r steps re-tokenize its replies",
                                server.url)
                    response = server.client.chat.completions.create(**kwargs, extra_body=extra or None)
            except self.openai.APIConnectionError as exc:  # a timeout too (APITimeoutError)
                raise Unavailable.of(exc) from None
            except self.openai.NotFoundError:
                raise
            except self.openai.APIStatusError as exc:
                raise Unavailable.answered(exc.status_code, exc.response.text) or \
                    EngineError(f"the server at {server.url} failed a request: {exc}") from None
            except self.openai.APIError as exc:
                raise EngineError(f"the server at {server.url} failed a request: {exc}") from None
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

    def check_adapters(self, folder: str | Path, rank: int) -> None:
        """Refuse, before anything trains, a server that could not load the adapters a step writes under
        `folder` at `rank`: a test adapter goes to every server the way the step's will and is unloaded
        again. One line names the server and says what to do; checked once per server, way and rank."""
        folder = Path(folder).resolve()
        todo = []
        for server in self.pool.live():  # the cheap question first: no test adapter (nor weights) needed for it
            try:
                if (server.url, self._way(server, folder), rank) in self._checked:
                    continue
                runtime = server.has_runtime_lora()
            except Unavailable as exc:
                self.pool.take_out(server, exc)
                continue
            if not runtime:
                raise UsageError(f"the server at {server.url} cannot load adapters at runtime: "
                                 f"{runtime_lora_hint(rank)}")
            todo.append(server)
        if not todo:
            return
        folder.mkdir(parents=True, exist_ok=True)
        # A name and a folder of this check's own: clients that check one server at once (a DSPy job beside
        # `tandem optimize`) must not load, unload or remove each other's probe.
        probe = Path(tempfile.mkdtemp(prefix=f".tandem-probe-{os.getpid()}-", dir=folder))
        name = f"tandem-probe-{uuid.uuid4().hex[:16]}"
        try:
            try:
                probe_adapter(resolve_model(self.weights), probe, rank)
            except (ModelNotFoundError, OSError) as exc:
                raise UsageError(f"a weight step on --engine openai trains locally, so --model must name the "
                                 f"weights the servers run (a folder or hub id): {exc}") from None
            for server in [s for s in todo if s.alive]:
                try:
                    self._load_on(server, name, probe, rank, what="a test adapter")
                    server.unload(name, pushed=server.receives())
                except Unavailable as exc:
                    self.pool.take_out(server, exc)
                    continue
                self._checked.add((server.url, self._way(server, folder), rank))
        finally:
            shutil.rmtree(probe, ignore_errors=True)
            if self.share:
                shutil.rmtree(self.share.local / name, ignore_errors=True)

    def _way(self, server: Server, folder: Path) -> str:
        """How adapters reach `server`: sent (`tandem serve`), through the shared folder, or by this path."""
        return "push" if server.receives() else "share" if self.share else str(folder)

    def load_adapter(self, path: str) -> str:
        """Load the PEFT adapter folder at `path` into every server (once) and return the model name that
        addresses it, for clients other than tandem's own (DSPy's, through tandem.integrations.dspy)."""
        return self._served_name(path)

    def _served_name(self, path: str | None) -> str:
        """The model name to ask for: the base model, or the adapter for `path`, loaded first into every
        server still in that lacks it (a request never runs on a server without its adapter)."""
        if path is None:
            return self.name
        key = adapter_key(path)
        with self._loading:
            name = self._adapters.get(key) or "tandem-" + adapter_digest(key[0])[:16]
            missing = [s for s in self.pool.live() if name not in s.adapters]
            if missing and self.share:
                with contextlib.suppress(Unavailable):  # a server that does not answer is found by its load below
                    if not all(s.receives() for s in missing):
                        copy_to_share(Path(key[0]), self.share, name)  # once, before the servers read it at once
            if missing:
                with ThreadPoolExecutor(max_workers=len(missing)) as loaders:
                    done = [loaders.submit(self._load_on, s, name, Path(key[0])) for s in missing]
                for server, future in zip(missing, done):
                    try:
                        future.result()
                    except Unavailable as exc:
                        self.pool.take_out(server, exc)
                if not self.pool.live():
                    self.pool.pick(b"")  # says which servers stopped answering
            self._adapters[key] = name
            return name

    def _reload(self, server: Server, path: str) -> None:
        """A server answered that it does not know an adapter it had loaded (it restarted): load it again
        (once per request and server: a second refusal stops the step). Unavailable where the server does not
        answer meanwhile: the request then fails over as any other (`_one`)."""
        log.warning("the server at %s no longer has adapter %s (restarted?): loading it again", server.url, path)
        name = self._served_name(path)
        with self._loading:
            server.adapters.discard(name)
            self._load_on(server, name, Path(adapter_key(path)[0]))

    def _load_on(self, server: Server, name: str, folder: Path, rank: int | None = None,
                 what: str | None = None) -> None:
        """Bring the adapter in `folder` to `server` (sent, copied to the shared folder, or by path) and load it."""
        started = time.perf_counter()
        if server.receives():
            way, path = "push", server.push(name, folder)
        elif self.share:
            way, path = "share", copy_to_share(folder, self.share, name)
        else:
            way, path = "path", str(folder)
        response = server.load(name, path)
        if response.status_code >= 400 and "already been loaded" not in response.text:
            if rank is None:
                rank = int(json.loads((folder / "adapter_config.json").read_text()).get("r", 0))
            raise UsageError(refusal(server, response, path, rank, shared=way == "share",
                                     what=what or f"adapter {folder}"))
        seconds = time.perf_counter() - started
        server.adapters.add(name)
        self.adapter_loads.append({"server": server.url, "way": way, "seconds": seconds})
        log.info("loaded adapter %s into the server at %s as %s (%s, %.2f s)", folder, server.url, name, way, seconds)

    @contextlib.contextmanager
    def training(self, rank: int):
        """Peft on a local copy of the model's own weights (lm/trainer_copy.py: in the dtype and on the device
        tandem chose, off the GPU between steps); the servers then load the adapter at runtime
        (`check_adapters`, called by the training functions before this, has found that they can, at this rank)."""
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
