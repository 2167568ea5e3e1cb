"""`tandem serve`: vLLM's own OpenAI-compatible server, started the way tandem's weight steps need it, for a
node that shares no filesystem with the optimizer (another host, a container).

    tandem serve --model WEIGHTS [--rank 16] [--adapter-dir DIR] [any flag of vLLM's server]

What it turns on, each unless the flag is given: runtime LoRA (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`,
`--enable-lora`), `--max-lora-rank` the smallest vLLM accepts that holds `--rank`, sleep mode on a GPU
(`--enable-sleep-mode`); on a CPU, what tandem's vllm engine sets (every core, tcmalloc and libiomp5
preloaded, a quarter of the RAM for the KV cache). An alias (`smollm2-135m`) is served under its name and
its folder's path, so clients may name either.

And one thing vLLM's server does not have: a way to receive an adapter's files. Routes under /v1 (so
vLLM's `--api-key` guards them): `PUT /v1/tandem/adapters/NAME` takes a tar of the adapter folder's files
into `--adapter-dir`/NAME and answers the path, which the client then loads through vLLM's own
`/v1/load_lora_adapter`; `DELETE` removes one; `GET /v1/tandem/info` says the routes are there.

How: the server runs in this process with vLLM's own argument parser and `run_server`; its `build_app` is
wrapped to add the routes. vLLM offers no hook for a route that every release has: endpoint plugins
(the `vllm.endpoint_plugins` entry point group, recent releases) need an installed entry point and
`VLLM_PLUGINS` allow-listing, which would also filter vLLM's other plugins.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations as objects.

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


def adapter_routes(folder: Path):
    """The routes that receive adapters into `folder` (a FastAPI router, included into vLLM's app)."""
    from fastapi import APIRouter, HTTPException, Request  # vLLM's server brings FastAPI

    router = APIRouter()

    @router.get(f"{ROUTES}/info")
    async def info(request: Request):
        args = request.app.state.args
        return {"adapter_dir": str(folder), "max_lora_rank": getattr(args, "max_lora_rank", None),
                "enable_lora": bool(getattr(args, "enable_lora", False))}

    @router.put(f"{ROUTES}/adapters/{{name}}")
    async def receive(name: str, request: Request):
        if not NAME.match(name):
            raise HTTPException(400, f"an adapter name is letters, digits, '.', '_' and '-', not {name!r}")
        target = folder / name
        with tempfile.TemporaryDirectory(dir=folder, prefix=".incoming-") as tmp:
            archive = Path(tmp) / "adapter.tar"
            with open(archive, "wb") as f:
                async for chunk in request.stream():
                    f.write(chunk)
            files = Path(tmp) / "files"
            files.mkdir()
            try:
                with tarfile.open(archive) as tar:
                    members = tar.getmembers()
                    bad = [m.name for m in members if not m.isfile() or "/" in m.name or m.name.startswith(".")]
                    if bad or not any(m.name == "adapter_config.json" for m in members):
                        raise HTTPException(400, f"not an adapter's files (adapter_config.json and weights): {bad}")
                    tar.extractall(files, filter="data")
            except tarfile.TarError as exc:
                raise HTTPException(400, f"not a tar archive: {exc}") from None
            if not target.is_dir():  # names are content hashes: one already there is this adapter
                files.rename(target)
        log.info("received adapter %s", target)
        return {"path": str(target)}

    @router.delete(f"{ROUTES}/adapters/{{name}}")
    async def remove(name: str):
        if NAME.match(name) and (folder / name).is_dir():
            shutil.rmtree(folder / name)
        return {"removed": name}

    return router


def serve(model: str, rank: int, adapter_dir: str | None, flags: list[str]) -> int:
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
        app.include_router(adapter_routes(folder))
        return app

    server.build_app = with_routes
    print(f"tandem serve: {args.model} with runtime LoRA up to rank {args.max_lora_rank}; adapters sent here go to "
          f"{folder}", file=sys.stderr, flush=True)
    uvloop.run(server.run_server(args))
    return 0
