"""`tandem serve`: vLLM's own OpenAI-compatible server, started the way tandem's weight steps need it, for a
node that shares no filesystem with the optimizer (another host, a container).

    tandem serve --model WEIGHTS [--rank 16] [--adapter-dir DIR] [--max-adapter-mb 2048] [any flag of vLLM's server]

What it turns on, each unless the flag is given: runtime LoRA (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`,
`--enable-lora`), `--max-lora-rank` the smallest vLLM accepts that holds `--rank`, sleep mode on a GPU
(`--enable-sleep-mode`); on a CPU, what tandem's vllm engine sets (every core, tcmalloc and libiomp5
preloaded, a quarter of the RAM for the KV cache). An alias (`smollm2-135m`) is served under its name and
its folder's path, so clients may name either.

And one thing vLLM's server does not have: a way to receive an adapter's files. Routes under /v1 (so
vLLM's `--api-key` guards them): `PUT /v1/tandem/adapters/NAME` takes a tar of the adapter folder's files
into `--adapter-dir`/NAME and answers the path, which the client then loads through vLLM's own
`/v1/load_lora_adapter`; `DELETE` removes one; `GET /v1/tandem/info` says the routes are there.
An upload is refused with nothing written: a compressed body (415), one past `--max-adapter-mb` or with
more than MAX_FILES files (413), a link, a folder, a dot-file, no adapter_config.json or a bad name (400).
It is unpacked off the event loop (generations go on meanwhile) and renamed into place whole. Started
beyond loopback without `--api-key`, the server says in one line that anyone who reaches it can use them.

How: the server runs in this process with vLLM's own argument parser and `run_server`; its `build_app` is
wrapped to add the routes. vLLM offers no hook for a route that every release has: endpoint plugins
(the `vllm.endpoint_plugins` entry point group, recent releases) need an installed entry point and
`VLLM_PLUGINS` allow-listing, which would also filter vLLM's other plugins.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations as objects.

import asyncio
import ipaddress
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import UsageError
from .lm.models import ModelNotFoundError, resolve_model
from .lm.vllm import MISSING, cpu_environment, lora_rank_slot

log = logging.getLogger(__name__)

ROUTES = "/v1/tandem"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# `--max-adapter-mb`: a rank-64 LoRA on every linear layer of a 7B model (Qwen2.5-7B, Llama-2-7B) is ~650 MB in fp32.
MAX_ADAPTER_MB = 2048
MAX_FILES = 64  # an adapter's config and weights, a README, at most a tokenizer's files beside them
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def vllm_flags(model: str, rank: int, flags: list[str], gpu: bool) -> list[str]:
    """vLLM's command line for `model`: the user's `flags`, then what tandem needs that they do not set."""
    given = {f.split("=", 1)[0] for f in flags if f.startswith("--")}
    try:
        weights = resolve_model(model)
    except ModelNotFoundError:  # a hub id vLLM downloads itself, or a path on this node only
        weights = model
    out = ["--model", weights, *flags]
    if "--served-model-name" not in given and weights != model:
        out += ["--served-model-name", weights, model]
    if "--enable-lora" not in given:
        out.append("--enable-lora")
    if "--max-lora-rank" not in given:
        out += ["--max-lora-rank", str(lora_rank_slot(rank))]
    if gpu and "--enable-sleep-mode" not in given:
        out.append("--enable-sleep-mode")
    if not gpu and "--gpu-memory-utilization" not in given:
        out += ["--gpu-memory-utilization", "0.25"]  # vLLM's CPU build reads it as the share of RAM
    return out


def adapter_routes(folder: Path, max_bytes: int = MAX_ADAPTER_MB * 2**20):
    """The routes that receive adapters into `folder` (a FastAPI router, included into vLLM's app). An upload
    is an uncompressed tar of at most `max_bytes`, written whole or not at all."""
    from fastapi import APIRouter, HTTPException, Request  # vLLM's server brings FastAPI

    router = APIRouter()

    def checked(name: str) -> str:
        if not NAME.match(name):
            raise HTTPException(400, f"an adapter name is letters, digits, '.', '_' and '-', starting with a letter or "
                                     f"digit, not {name!r}")
        return name

    def too_large(what: str) -> HTTPException:
        return HTTPException(413, f"{what} is larger than this server takes ({max_bytes} bytes: tandem serve "
                                  "--max-adapter-mb)")

    def unpack(archive: Path, into: Path) -> None:
        """The tar's files into `into`, refused unless they are an adapter's: plain files with plain names,
        adapter_config.json among them, at most MAX_FILES of them and `max_bytes` in all (a sparse member
        unpacks to more than it takes in the tar)."""
        with open(archive, "rb") as f:
            if f.read(6).startswith(COMPRESSED):
                raise HTTPException(415, "a compressed archive: send the adapter's files as an uncompressed tar")
        try:
            with tarfile.open(archive, mode="r:") as tar:
                members = []
                for member in tar:
                    members.append(member)
                    if len(members) > MAX_FILES:
                        raise HTTPException(413, f"more than {MAX_FILES} files: not an adapter's")
                bad = [m.name for m in members if not m.isfile() or "/" in m.name or m.name.startswith(".")]
                if bad:
                    raise HTTPException(400, f"not an adapter's files (plain files, no folders, links or dot-files): "
                                             f"{bad}")
                if not any(m.name == "adapter_config.json" for m in members):
                    raise HTTPException(400, "not an adapter: no adapter_config.json among "
                                             f"{[m.name for m in members]}")
                if sum(m.size for m in members) > max_bytes:
                    raise too_large("the adapter's files")
                tar.extractall(into, members=members, filter="data")
        except tarfile.TarError as exc:
            raise HTTPException(400, f"not a tar archive: {exc}") from None

    @router.get(f"{ROUTES}/info")
    async def info(request: Request):
        args = request.app.state.args
        return {"adapter_dir": str(folder), "max_lora_rank": getattr(args, "max_lora_rank", None),
                "enable_lora": bool(getattr(args, "enable_lora", False)), "max_adapter_bytes": max_bytes}

    @router.put(f"{ROUTES}/adapters/{{name}}")
    async def receive(name: str, request: Request):
        target = folder / checked(name)
        if int(request.headers.get("content-length") or 0) > max_bytes:
            raise too_large("the upload")
        with tempfile.TemporaryDirectory(dir=folder, prefix=".incoming-") as tmp:
            archive, files, size = Path(tmp) / "adapter.tar", Path(tmp) / "files", 0
            with open(archive, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_bytes:  # a body sent without its length
                        raise too_large("the upload")
                    f.write(chunk)
            files.mkdir()
            # Off the event loop: the server's generations go on while a large adapter is written out.
            await asyncio.to_thread(unpack, archive, files)
            try:
                files.rename(target)  # whole or not at all; a folder already there is this adapter (names are hashes)
            except OSError:
                if not target.is_dir():
                    raise
        log.info("received adapter %s", target)
        return {"path": str(target)}

    @router.delete(f"{ROUTES}/adapters/{{name}}")
    async def remove(name: str):
        target = folder / checked(name)
        if target.is_dir():
            await asyncio.to_thread(shutil.rmtree, target)
        return {"removed": name}

    return router


def exposure(host: str | None, api_key: object, uds: str | None = None) -> str | None:
    """One line where the server listens beyond this machine without an API key (anyone who reaches it can
    then write adapters into its folder and remove them); None where it does not."""
    if uds or api_key or os.environ.get("VLLM_API_KEY"):
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host or "0.0.0.0").is_loopback
    except ValueError:  # a host name: this machine's name on its network
        loopback = False
    if loopback:
        return None
    return (f"tandem serve: listening on {host or 'every interface'} without --api-key: anyone who reaches this port "
            "can send and remove adapters and use the model; give --api-key (clients set OPENAI_API_KEY to it), or "
            "--host 127.0.0.1")


def serve(model: str, rank: int, adapter_dir: str | None, flags: list[str], max_adapter_mb: int | None = None) -> int:
    """Run vLLM's OpenAI-compatible server on `model` with tandem's routes, until it is stopped."""
    try:
        import torch
        import uvloop
        from vllm.entrypoints.launchers.api_server import entry as server
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:
        try:  # vLLM before the launchers package: the same functions in the OpenAI server's module
            import torch
            import uvloop
            from vllm.entrypoints.openai import api_server as server
            from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
        except ImportError as exc:
            raise UsageError(f"tandem serve runs vLLM's server: {MISSING} ({exc})") from None
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.update(cpu_environment())
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # as vLLM's own command line sets it
    folder = Path(adapter_dir or tempfile.mkdtemp(prefix="tandem-adapters-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    parser = make_arg_parser(FlexibleArgumentParser(prog="tandem serve", description="vLLM's server, for tandem"))
    args = parser.parse_args(vllm_flags(model, rank, flags, gpu))
    validate_parsed_serve_args(args)

    build_app = server.build_app

    def with_routes(*a, **kw):
        app = build_app(*a, **kw)
        app.include_router(adapter_routes(folder, (max_adapter_mb or MAX_ADAPTER_MB) * 2**20))
        return app

    server.build_app = with_routes
    print(f"tandem serve: {args.model} with runtime LoRA up to rank {args.max_lora_rank}; adapters sent here go to "
          f"{folder}", file=sys.stderr, flush=True)
    warning = exposure(args.host, args.api_key, getattr(args, "uds", None))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    uvloop.run(server.run_server(args))
    return 0
