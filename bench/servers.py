"""One server against several (`--engine openai --base-url A --base-url B`): the same evaluation in one run,
first on the first server alone, then spread over all of them; requests/s, p50/p95 latency per request,
and how long an adapter takes to reach a server by its path here against sent to it (`tandem serve`).

    python bench/servers.py                       # starts two servers here: `tandem serve` and vLLM's own
    python bench/servers.py --base-url http://gpu0:8000/v1 --base-url http://gpu1:8000/v1 --model WEIGHTS

Held equal: the program (Iris, tandem's chain of thought), the examples, greedy constrained decoding
without the LM cache, `--threads` programs at once, the adapter (rank `--rank`, made here with peft). On a
machine whose servers share its cores (two vLLM CPU servers on 2 cores) two cannot be faster than one: the
figure is the overhead of spreading; on servers with their own GPUs or hosts it is the scaling. Given URLs,
the adapter is sent to those that take files (`tandem serve`) and loaded by path on the others.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the weights: alias, folder or hub id (default: smollm2-135m)")
    p.add_argument("--base-url", action="append", help="a running server, once per server; default: start two here")
    p.add_argument("--examples", type=int, default=40, help="Iris val examples evaluated (default: 40)")
    p.add_argument("--threads", type=int, default=16, help="programs at once (default: 16)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    p.add_argument("--rank", type=int, default=16, help="the adapter's LoRA rank (default: 16)")
    p.add_argument("--dtype", default="float32", help="the servers' dtype, when this script starts them")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], log: Path, port: int) -> tuple[subprocess.Popen, str]:
    import os

    import httpx

    from tandem.lm.vllm import cpu_environment

    env = {**os.environ, **cpu_environment(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    process = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        if process.poll() is not None:
            sys.exit(f"a server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(1)
    sys.exit(f"a server did not come up: {log}")


def make_adapter(weights: str, out: Path, rank: int) -> str:
    """A LoRA adapter on every linear layer, its B matrices random so that it changes the replies."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(weights),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(out)
    return str(out)


def evaluate_on(urls: list[str], weights: str, program, examples, metric, generation) -> dict:
    from tandem.evaluate import evaluate
    from tandem.lm.openai_server import OpenAIEngine

    engine = OpenAIEngine(weights, urls, concurrency=generation.threads * 2)
    engine.load_adapter(program.adapter)  # loaded before timing, as a step does before its first request
    latencies, on = [], engine._on

    def timed(server, request):
        started = time.perf_counter()
        completion = on(server, request)
        latencies.append(time.perf_counter() - started)
        return completion

    engine._on = timed
    started = time.perf_counter()
    result = evaluate(program, engine, examples, metric, generation, progress=False, max_errors=10**6)
    seconds = time.perf_counter() - started
    engine.close()
    latencies.sort()
    return {"servers": len(urls), "requests": len(latencies), "seconds": seconds, "rps": len(latencies) / seconds,
            "p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))],
            "score": result.score}


def load_times(urls: list[str], weights: str, adapter: str, tries: int = 3) -> list[tuple[str, str, float]]:
    """(server, way, seconds) of loading `adapter` into each server, `tries` times (a new name each time:
    the adapter's files are rewritten, so its content hash changes)."""
    import shutil

    from tandem.lm.openai_server import OpenAIEngine

    rows = []
    for i in range(tries):
        copy = Path(adapter).with_name(f"load-{i}")
        shutil.copytree(adapter, copy, dirs_exist_ok=True)
        (copy / "adapter_config.json").write_text((copy / "adapter_config.json").read_text() + " " * (i + 1))
        for url in urls:
            engine = OpenAIEngine(weights, url)
            engine.load_adapter(str(copy))
            rows += [(load["server"], load["way"], load["seconds"]) for load in engine.adapter_loads]
            engine.close()
    return rows


def main() -> None:
    args = parse_args()
    from tandem.lm.models import resolve_model
    from tandem.settings import GenerationSettings
    from tandem.tasks import load_task

    weights = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="tandem-bench-servers-"))
    processes = []
    urls = args.base_url
    if not urls:
        ports = free_port(), free_port()
        common = ["--host", "127.0.0.1", "--dtype", args.dtype, "--max-model-len", "4096", "--enforce-eager"]
        first = start([sys.executable, "-m", "tandem", "serve", "--model", weights, "--rank", str(args.rank),
                       "--port", str(ports[0]), *common], work / "serve.log", ports[0])
        second = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", weights, "--port",
                        str(ports[1]), "--enable-lora", "--max-lora-rank", str(args.rank), "--gpu-memory-utilization",
                        "0.25", *common], work / "vllm.log", ports[1])
        processes = [first[0], second[0]]
        urls = [first[1], second[1]]
    try:
        task = load_task("iris")
        examples = (task.split("val") + task.split("test"))[: args.examples]
        program = task.make_program()
        program.adapter = make_adapter(weights, work / "adapter", args.rank)
        generation = GenerationSettings(max_new_tokens=args.max_new_tokens, threads=args.threads)
        rows = [evaluate_on(urls[:1], weights, program, examples, task.metric, generation),
                evaluate_on(urls, weights, program, examples, task.metric, generation)]
        loads = load_times(urls, weights, program.adapter)
    finally:
        import os
        import signal

        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
    print(f"Iris, {len(examples)} examples, {args.model}, an adapter of rank {args.rank} on every request, "
          f"{args.threads} programs at once, greedy constrained decoding, no cache")
    print(f"{'servers':>8} {'requests':>9} {'seconds':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'score':>6}")
    for r in rows:
        print(f"{r['servers']:>8} {r['requests']:>9} {r['seconds']:>8.1f} {r['rps']:>7.1f} {r['p50']:>7.3f} "
              f"{r['p95']:>7.3f} {r['score']:>6.1f}")
    size = sum(f.stat().st_size for f in Path(program.adapter).iterdir() if f.is_file()) / 2**20
    print(f"adapter load ({size:.1f} MiB of files), seconds per load, {len(loads) // len(urls)} loads per server:")
    for url in urls:
        mine = [(way, s) for server, way, s in loads if server == url.rstrip("/")]
        print(f"  {url}  {mine[0][0]:>5}  median {statistics.median(s for _, s in mine):.3f}  "
              f"({', '.join(f'{s:.3f}' for _, s in mine)})")


if __name__ == "__main__":
    main()
