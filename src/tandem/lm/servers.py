"""The servers behind `--engine openai`: one or several OpenAI-compatible servers serving the same weights
(`--base-url` given once per server), and how a trained adapter reaches each of them.

Spreading requests (`Pool`): each request has a preferred server, picked by rendezvous hashing of what
comes before its last message (instructions and demos) and its adapter, so calls that share a prompt
prefix meet in one server's prefix cache; where the preferred server has more requests in flight than
the least busy one by more than `slack`, the least busy one takes it, so one dominant prefix (a program
without demos) still spreads over every server.

A request a server does not answer (after the client's own retries) is sent again: no answer at all, or one
that says it is not serving (a gateway's 502 or 504 with nothing behind it, a 503). A server that refuses the
connection (nothing listens: the process is gone) or whose engine died (vLLM's 500 for it, before the server
exits) is taken out at once, one that leaves STRIKES requests in a row unanswered (timeouts, dropped
connections, not serving, no answer between) then; one slow answer does not. Any other error answer is the
server's word on the request and stops the step. A server taken out is asked every few seconds whether it
answers again as at the start (the model, the same greedy reply), and put back, its adapters loaded again
before requests need them. Each change is one warning line. With no server left, requests wait GRACE seconds
for one to come back (a server restarting, the network gone for a moment), then the step stops with one line
naming them.

Adapters reach a server in one of three ways, chosen per server:
- push: a server started with `tandem serve` receives the adapter's files (`PUT /v1/tandem/adapters/NAME`,
  a tar of the folder's files) into a folder of its own;
- shared: with `--adapter-share LOCAL[=REMOTE]`, tandem copies the adapter to LOCAL/NAME (once, renamed into
  place whole: no server reads half a copy) and the server reads REMOTE/NAME (storage both sides mount: NFS, a
  volume, a bucket mounted with s3fs or gcsfuse);
- path: the adapter's own folder, for a server on this machine that reads tandem's files.
Then vLLM's own `POST /v1/load_lora_adapter` loads it from that path. Names are `tandem-<content hash>`
(`cache.adapter_digest`: one adapter, one name; two adapters, two names).

Whether a server can load tandem's adapters is found before training (`probe_adapter`, `refusal`): a
one-module adapter of the run's rank, made here from the model's config (no weights read), goes the way
real ones will under a name of this check's own (clients may check one server at once) and is unloaded again; vLLM's answer tells a server without runtime LoRA, one without
`--enable-lora`, one that cannot read the path and a rank above its `--max-lora-rank` apart, each in one
line that names the server and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import shutil
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import EngineError, UsageError
from .base import Request
from .vllm import lora_rank_slot

log = logging.getLogger(__name__)

RECEIVE = "v1/tandem"  # `tandem serve`'s routes: under /v1, so vLLM's --api-key guards them too
SERVE_HINT = "start it with `tandem serve --model WEIGHTS` (runtime LoRA on, adapters sent to it)"


STRIKES = 3  # failures in a row on a server, with no answer from it between, that take it out
GRACE = 180.0  # seconds a request waits, with every server out, for one to answer again (a restart, a blip)
# Answers that say the server is not serving, whatever was asked: a gateway (a load balancer, an ingress) with no
# server behind it or one that does not answer it, or a server that is starting, draining or overloaded.
NOT_SERVING = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
# vLLM's answer (a 500) to the requests in flight when its engine process died; the server then shuts down.
ENGINE_DEAD = "EngineCore encountered an issue"


class Unavailable(Exception):
    """A server did not answer, after the client's own retries: `refused` where it took no connection (nothing
    listens there: the process or the node is gone), else a timeout or a dropped connection."""

    def __init__(self, why: str, refused: bool):
        super().__init__(why)
        self.refused = refused

    @classmethod
    def of(cls, exc: BaseException) -> "Unavailable":
        """From an HTTP client's error: httpx's, or the openai client's around its own HTTP library's (httpx,
        httpx2 since openai 3), hence the chain is searched for the socket's error rather than a class."""
        chain, refused = exc, False
        while chain is not None and not refused:
            refused = isinstance(chain, ConnectionRefusedError)
            chain = chain.__cause__ or chain.__context__
        return cls(f"{type(exc).__name__}: {exc.__cause__ or exc}", refused=refused)

    @classmethod
    def answered(cls, status: int, text: str) -> "Unavailable | None":
        """From an HTTP answer that says the server is not serving (NOT_SERVING), or that its engine died
        (`refused`: it takes nothing from now on, as if gone); None for any other answer, which is the
        server's word on the request (an error in it, or in the server's code) and stops the step."""
        if status in NOT_SERVING:
            return cls(f"{status} {NOT_SERVING[status]}: {' '.join(text.split())[:200]}", refused=False)
        if status == 500 and ENGINE_DEAD in text:
            return cls(f"its engine died (500: {ENGINE_DEAD})", refused=True)
        return None


@dataclass(frozen=True)
class Share:
    """A folder the servers read too: `local` here, `remote` the same folder as the servers mount it."""

    local: Path
    remote: str

    @classmethod
    def parse(cls, text: str) -> "Share":
        local, _, remote = text.partition("=")
        if not local:
            raise UsageError(f"--adapter-share takes LOCAL or LOCAL=SERVER_PATH, got {text!r}")
        return cls(Path(local).expanduser().resolve(), remote.rstrip("/") or str(Path(local).expanduser().resolve()))


class Server:
    """One OpenAI-compatible server: its client, whether it is still in, what it has loaded."""

    def __init__(self, url: str, openai, *, api_key: str, max_retries: int, timeout: float):
        self.url = url.rstrip("/")
        self.root = self.url.removesuffix("/v1")
        self.openai = openai
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=max_retries, timeout=timeout)
        self.alive = True
        self.inflight = 0
        self.failures = 0  # requests in a row it did not answer (STRIKES take it out)
        self.adapters: set[str] = set()  # names loaded into it
        self._receives: bool | None = None

    def __repr__(self) -> str:
        return self.url

    def models(self) -> dict[str, dict]:
        """The server's model list: each name it serves, adapters included, with what the server says of it
        (vLLM: `root`, the weights' or the adapter's folder; `parent`, an adapter's base model)."""
        openai = self.openai
        try:
            listed = self.client.models.list().data
        except openai.APIConnectionError as exc:
            raise EngineError(f"cannot reach an OpenAI-compatible server at {self.url} ({exc.__cause__ or exc})") \
                from None
        except openai.APIStatusError as exc:
            if Unavailable.answered(exc.status_code, exc.response.text):
                raise EngineError(f"the server at {self.url} is not serving: GET {self.url}/models answered "
                                  f"{exc.status_code} {NOT_SERVING.get(exc.status_code, '')}".rstrip()) from None
            if isinstance(exc, openai.AuthenticationError):
                raise UsageError(f"the server at {self.url} refused the API key: set OPENAI_API_KEY to its "
                                 "--api-key") from None
            raise UsageError(f"{self.url} is not an OpenAI-compatible server: GET {self.url}/models answered "
                             f"{exc.status_code} (give --base-url the server's /v1 address)") from None
        except (openai.APIError, ValueError, TypeError, AttributeError) as exc:
            raise UsageError(f"{self.url} is not an OpenAI-compatible server: GET {self.url}/models did not list "
                             f"models ({type(exc).__name__}; give --base-url the server's /v1 address)") from None
        if not isinstance(listed, list) or not all(isinstance(getattr(m, "id", None), str) for m in listed):
            raise UsageError(f"{self.url} is not an OpenAI-compatible server: GET {self.url}/models did not list "
                             "models (give --base-url the server's /v1 address)")
        return {m.id: dict(m.model_extra or {}) for m in listed}

    def http(self, method: str, path: str, **kwargs):
        """A request to the server outside the OpenAI API (adapters); Unavailable where it does not answer."""
        import httpx

        headers = {"Authorization": f"Bearer {self.client.api_key}", **kwargs.pop("headers", {})}
        try:
            response = httpx.request(method, f"{self.root}/{path}", timeout=300, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable.of(exc) from None
        gone = Unavailable.answered(response.status_code, response.text)
        if gone:
            raise gone
        return response

    def has_runtime_lora(self) -> bool:
        """Whether vLLM's runtime LoRA route is there (an empty body is refused, an absent route is 404)."""
        return self.http("POST", "v1/load_lora_adapter", json={}).status_code != 404

    def receives(self) -> bool:
        """Whether the server takes an adapter's files (`tandem serve`); asked once."""
        if self._receives is None:
            response = self.http("GET", f"{RECEIVE}/info")
            self._receives = response.status_code == 200 and "adapter_dir" in _json(response)
        return self._receives

    def push(self, name: str, folder: Path) -> str:
        """Send the adapter's files; returns the folder the server keeps them in."""
        response = self.http("PUT", f"{RECEIVE}/adapters/{name}", content=adapter_tar(folder),
                             headers={"Content-Type": "application/x-tar"})
        if response.status_code != 200:
            raise EngineError(f"the server at {self.url} did not take adapter {folder}: {response.status_code} "
                              f"{response.text[:300]}")
        return _json(response)["path"]

    def load(self, name: str, path: str):
        return self.http("POST", "v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

    def unload(self, name: str, pushed: bool) -> None:
        self.http("POST", "v1/unload_lora_adapter", json={"lora_name": name})
        if pushed:
            self.http("DELETE", f"{RECEIVE}/adapters/{name}")
        self.adapters.discard(name)


def _json(response) -> dict:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def adapter_tar(folder: Path) -> bytes:
    """The adapter's files (not its subfolders: checkpoints, optimizer state) as an uncompressed tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for f in sorted(Path(folder).iterdir()):
            if f.is_file() and not f.name.startswith("."):
                tar.add(f, arcname=f.name)
    return buffer.getvalue()


def copy_to_share(folder: Path, share: Share, name: str) -> str:
    """The adapter copied to the shared folder (once: the name is its content hash); the servers' path to it.
    Each copy is made in a folder of its own and renamed into place whole, so copies made at once (one per
    server, or another run's) never meet, and a server never reads half an adapter."""
    target = share.local / name
    if not target.is_dir():
        share.local.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=share.local))
        try:
            for f in Path(folder).iterdir():
                if f.is_file() and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not another copy that came first: a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return f"{share.remote}/{name}"


def refusal(server: Server, response, where: str, rank: int, shared: bool = False, what: str = "a test adapter") -> str:
    """One line for a server's refusal to load an adapter: why, and what to do."""
    text = response.text[:400]
    if shared and "No adapter found" in text:
        return (f"the server at {server.url} cannot read {where} (--adapter-share): mount the shared folder there on "
                f"the server, or give --adapter-share LOCAL=SERVER_PATH with the path it has on the server")
    if response.status_code == 404 and "No adapter found" not in text:
        return f"the server at {server.url} cannot load adapters at runtime: {runtime_lora_hint(rank)}"
    if "No adapter found" in text:
        return (f"the server at {server.url} cannot read {where}, where tandem writes adapters (another host or a "
                f"container): {SERVE_HINT}, or give --adapter-share a folder it reads too")
    if "LoRA is not enabled" in text:
        return f"the server at {server.url} runs without --enable-lora: {runtime_lora_hint(rank)}"
    limit = re.search(r"max_lora_rank (\d+)", text)
    if limit:
        limit = limit.group(1)
        return (f"the server at {server.url} takes LoRA ranks up to {limit} (its --max-lora-rank) and this run "
                f"trains rank {rank}: restart it with --max-lora-rank {lora_rank_slot(rank)}, or train with "
                f"--rank {limit}")
    return f"the server at {server.url} did not load {what}: {response.status_code} {text}"


def runtime_lora_hint(rank: int) -> str:
    return (f"start vLLM's server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora --max-lora-rank "
            f"{lora_rank_slot(rank)} (`tandem serve --model WEIGHTS` does both), or leave it out")


def probe_adapter(weights: str, folder: Path, rank: int) -> Path:
    """A LoRA adapter of `rank` on the first linear layer of the model's first block, zeros: vLLM reads its
    config (the rank check) and loads it as it would a trained one. Built from the config alone (meta
    tensors), so it costs nothing like loading the model."""
    import torch  # the training extra, present wherever weight steps run
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(weights)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    name, layer = next((n, m) for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and any(part.isdigit() for part in n.split(".")))
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"base_model.model.{name}"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(rank, layer.in_features),
               f"{prefix}.lora_B.weight": torch.zeros(layer.out_features, rank)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": [name.rsplit(".", 1)[-1]], "bias": "none", "base_model_name_or_path": str(weights)}))
    return folder


def prefix_key(request: Request) -> bytes:
    """What a server's prefix cache can share between requests: everything before the last message, and
    the adapter (a cached prefix is per adapter)."""
    return hashlib.sha256(repr((request.messages[:-1], request.adapter)).encode()).digest()


class Pool:
    """The servers still in, and which one takes a request (see the module's docstring). A server taken out is
    asked every `recheck` seconds whether it answers again (`back(server)` returns, where it raises the server
    stays out) and, once it does, is put back without the adapters it had: each is loaded into it again
    before a request that needs it goes anywhere."""

    def __init__(self, servers: Sequence[Server], slack: int, back: Callable[[Server], None] | None = None,
                 recheck: float = 5.0, grace: float = GRACE):
        self.servers = list(servers)
        self.slack = slack
        self.recheck = recheck
        self.grace = grace
        self._back = back
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)  # notified when a server is put back
        self._closed = threading.Event()
        self._outage: float | None = None  # when the last server went out, while none is in

    def live(self) -> list[Server]:
        return [s for s in self.servers if s.alive]

    def pick(self, key: bytes) -> Server:
        live = self.live()
        if not live:
            raise EngineError(f"every server stopped answering ({', '.join(s.url for s in self.servers)}): "
                              "restart them and rerun to resume")
        preferred = max(live, key=lambda s: hashlib.sha256(key + s.url.encode()).digest())
        least = min(live, key=lambda s: s.inflight)
        return preferred if preferred.inflight <= least.inflight + self.slack else least

    @contextlib.contextmanager
    def lease(self, key: bytes) -> Iterator[Server]:
        """The server for a request, counted in flight while the request runs. With every server out and
        rechecks running, it waits until one is back or `grace` seconds have passed since the last went out."""
        with self._lock:
            while not self.live() and self._back is not None and self._outage is not None \
                    and not self._closed.is_set():
                left = self._outage + self.grace - time.monotonic()
                if left <= 0:
                    break
                self._returned.wait(min(left, self.recheck))
            server = self.pick(key)
            server.inflight += 1
        try:
            yield server
        finally:
            with self._lock:
                server.inflight -= 1

    def answered(self, server: Server) -> None:
        server.failures = 0

    def failed(self, server: Server, exc: Unavailable) -> None:
        """`server` did not answer a request: taken out where it refused the connection or has now failed
        STRIKES times in a row; else it stays in (a slow answer, a long reply) and the request is retried."""
        with self._lock:
            server.failures += 1
            strikes = server.failures
        if exc.refused or strikes >= STRIKES:
            self.take_out(server, exc if exc.refused else f"{strikes} requests in a row unanswered, the last: {exc}")
        else:
            log.info("the server at %s did not answer (%s): the request is sent again", server.url, exc)

    def take_out(self, server: Server, why: object) -> None:
        with self._lock:
            if not server.alive:
                return
            server.alive = False
            rest = self.live()
            if not rest:
                self._outage = time.monotonic()
        waits = f"requests wait up to {self.grace:.0f} s for one to answer again" if self._back else "the step stops"
        log.warning("the server at %s stopped answering (%s): taken out%s; %s", server.url, why,
                    " until it answers again" if self._back else " of this run",
                    f"its requests go to {', '.join(s.url for s in rest)}" if rest else f"no server is left: {waits}")
        if self._back is not None:
            threading.Thread(target=self._watch, args=(server,), daemon=True, name="tandem-recheck").start()

    def _watch(self, server: Server) -> None:
        said = None
        while not self._closed.wait(self.recheck):
            try:
                self._back(server)
            except (Unavailable, EngineError):  # not answering yet
                continue
            except UsageError as exc:  # answering, but not as a server of this run: said once
                if str(exc) != said:
                    log.warning("the server at %s answers again but stays out: %s", server.url, exc)
                    said = str(exc)
                continue
            with self._lock:
                server.adapters.clear()  # it may have restarted without them
                server.failures = 0
                server.alive = True
                self._outage = None
                self._returned.notify_all()
            log.warning("the server at %s answers again: back in", server.url)
            return

    def close(self) -> None:
        """No more rechecks, nor waits for them."""
        self._closed.set()
        with self._lock:
            self._returned.notify_all()
