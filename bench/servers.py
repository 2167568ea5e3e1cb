"""One server against several (`--engine openai --base-url A --base-url B`): the same evaluation in one run,
first on the first server alone, then spread over all of them; requests/s, p50/p95 latency per request,
and how long an adapter takes to reach a server by its path here against sent to it (`tandem serve`).

    python bench/servers.py                       # starts two servers here: `tandem serve` and vLLM's own
    python bench/servers.py --base-url http://gpu0:8000/v1 --base-url http://gpu1:8000/v1 --model WEIGHTS
    python bench/servers.py --soak 300            # the soak, below, on two servers it starts here

Held equal: the program (Iris, tandem's chain of thought), the examples, greedy constrained decoding
without the LM cache, `--threads` programs at once, the adapter (rank `--rank`, made here with peft). On a
machine whose servers share its cores (two vLLM CPU servers on 2 cores) two cannot be faster than one: the
figure is the overhead of spreading; on servers with their own GPUs or hosts it is the scaling. Given URLs,
the adapter is sent to those that take files (`tandem serve`) and loaded by path on the others.

The soak (`--soak SECONDS`): `--evaluations` evaluations at once, again and again, against both servers;
a quarter of the way in, the second server is killed (SIGKILL, no goodbye) and started again on its port;
it goes on for SECONDS and until that server has been back a quarter of SECONDS (three times SECONDS at
most). Reported: requests served, sent again after a server did not answer (retried) and failed for good
(lost), when the server was taken out and put back, wall time, and whether every evaluation's predictions
equal those of a run on the first server alone. Loopback only: it kills a server it started.
"""

from __future__ import annotations

import argparse
import os
import signal
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
    p.add_argument("--soak", type=float, metavar="SECONDS", help="instead of the timings: the soak (above) for SECONDS")
    p.add_argument("--evaluations", type=int, default=4, help="--soak: evaluations at once (default: 4)")
    args = p.parse_args()
    if args.soak and args.base_url:
        p.error("--soak kills and restarts a server: it runs on the two it starts here, not on --base-url")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], log: Path, port: int) -> tuple[subprocess.Popen, str]:
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


def soak(urls: list[str], restart, weights: str, program, examples, metric, generation, seconds: float,
         evaluations: int) -> dict:
    """`evaluations` evaluations at once over both servers for `seconds`, and on until the second server, killed
    and started again by `restart()` a quarter of the way in, has been back for a quarter of `seconds` (three
    times `seconds` at most)."""
    import threading

    from tandem.errors import TandemError
    from tandem.evaluate import evaluate
    from tandem.lm.openai_server import OpenAIEngine

    def predictions(result) -> list:
        return [(r.prediction, r.score) for r in result.results]

    alone = OpenAIEngine(weights, urls[:1], concurrency=generation.threads * 2)
    expected = predictions(evaluate(program, alone, examples, metric, generation, progress=False, max_errors=10**6))
    alone.close()
    engine = OpenAIEngine(weights, urls, concurrency=generation.threads * evaluations)
    engine.pool.recheck = 1.0  # a restarted server is put back within a second of answering
    engine.load_adapter(program.adapter)
    second = engine.servers[1]
    counts = {"served": 0, "served_back": 0, "lost": 0, "evaluations": 0, "unequal": 0, "failed": 0}
    lock, times, stop, one, on = threading.Lock(), {}, threading.Event(), engine._one, engine._on

    def counted(request):  # a request, retries included: served or lost
        try:
            completion = one(request)
        except TandemError:
            with lock:
                counts["lost"] += 1
            raise
        with lock:
            counts["served"] += 1
        return completion

    def answered(server, request):  # one answer of one server
        completion = on(server, request)
        if server is second and "back" in times:
            with lock:
                counts["served_back"] += 1
        return completion

    engine._one, engine._on = counted, answered
    started = time.monotonic()

    def loop() -> None:
        while not stop.is_set():
            try:
                result = evaluate(program, engine, examples, metric, generation, progress=False, max_errors=10**6)
            except TandemError as exc:
                print(f"an evaluation failed: {exc}", file=sys.stderr)
                with lock:
                    counts["failed"] += 1
                continue
            with lock:
                counts["evaluations"] += 1
                counts["unequal"] += predictions(result) != expected

    def again() -> None:
        restart()
        times["answering"] = time.monotonic() - started

    threads = [threading.Thread(target=loop) for _ in range(evaluations)]
    for t in threads:
        t.start()
    time.sleep(seconds / 4)
    times["killed"] = time.monotonic() - started
    threading.Thread(target=again, daemon=True).start()
    while True:
        elapsed = time.monotonic() - started
        if second.alive and "back" not in times and "answering" in times:
            times["back"] = elapsed
        if elapsed >= 3 * seconds or (elapsed >= seconds and elapsed >= times.get("back", 3 * seconds) + seconds / 4):
            break
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    engine.close()
    return {**counts, **times, "retried": engine.retries, "wall": wall, "loads": len(engine.adapter_loads)}


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
        vllm = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", weights, "--port",
                str(ports[1]), "--enable-lora", "--max-lora-rank", str(args.rank), "--gpu-memory-utilization", "0.25",
                *common]
        second = start(vllm, work / "vllm.log", ports[1])
        processes = [first[0], second[0]]
        urls = [first[1], second[1]]

    def restart() -> None:  # the second server dies (no goodbye) and is started again on its port
        os.killpg(processes[1].pid, signal.SIGKILL)
        processes[1].wait()
        processes[1] = start(vllm, work / "vllm-again.log", ports[1])[0]

    try:
        task = load_task("iris")
        examples = (task.split("val") + task.split("test"))[: args.examples]
        program = task.make_program()
        program.adapter = make_adapter(weights, work / "adapter", args.rank)
        generation = GenerationSettings(max_new_tokens=args.max_new_tokens, threads=args.threads)
        if args.soak:
            figures = soak(urls, restart, weights, program, examples, task.metric, generation, args.soak,
                           args.evaluations)
        else:
            rows = [evaluate_on(urls[:1], weights, program, examples, task.metric, generation),
                    evaluate_on(urls, weights, program, examples, task.metric, generation)]
            loads = load_times(urls, weights, program.adapter)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
    if args.soak:
        f = figures
        back = f"put back at {f['back']:.0f} s" if "back" in f else "not put back before the end"
        answering = f"answering again at {f['answering']:.0f} s" if "answering" in f else "not answering again"
        print(f"soak: {args.evaluations} evaluations at once of {len(examples)} Iris examples ({args.model}, an "
              f"adapter of rank {args.rank}, {args.threads} programs each), at least {args.soak:.0f} s, 2 servers")
        print(f"the second killed at {f['killed']:.0f} s, {answering}, {back}")
        print(f"requests served {f['served']} ({f['served_back']} by the second once back), retried {f['retried']}, "
              f"lost {f['lost']}; adapter loads {f['loads']}; evaluations {f['evaluations']} finished ({f['failed']} "
              f"failed), {f['unequal']} unlike the one-server run; wall {f['wall']:.0f} s")
        return
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
