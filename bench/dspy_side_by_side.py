"""DSPy's BetterTogether with tandem's provider against `tandem optimize --engine openai`: the same Iris
splits, the same model on the same vLLM server, the same strategy, side by side per step (vanilla, then
each prefix): val and test score, wall time, requests the server answered and tokens it generated.

    python bench/dspy_side_by_side.py                                      # starts a server on smollm2-135m
    python bench/dspy_side_by_side.py --train-size 8 --val-size 8 --test-size 16 --num-candidates 1
    python bench/dspy_side_by_side.py --base-url http://127.0.0.1:8000/v1 --served-model-name smol --model WEIGHTS

Held equal: the data, the server, greedy decoding without an LM cache, `--threads` programs at once, the
optimizers' settings (3 bootstrapped + 3 labeled demos, zero-shot, labeled-only, unshuffled and
`--num-candidates` shuffled candidates scored on val; weight steps without demos, as the paper and
tandem do: DSPy's `exclude_demos=True`) and the weight step's trainer: one LoRA by tandem's `train_lora`
(DSPy's through TandemProvider), loaded into the server at runtime. What differs is what each framework
brings: its prompts and reply format (tandem's `Label: value` lines, constrained a field at a time, so a
module call is 2-3 requests; DSPy's ChatAdapter sections, free, with a JSON retry when they do not
parse), its candidate search and its evaluation. A step's time and requests cover the step, its val
score and its test score; DSPy's per-step boundaries come from timing each optimizer it runs, tandem's
from its step.json files. The server's counters come from its /metrics.

One change to DSPy: its BootstrapFinetune (3.4.1) keeps the runs whose reply did not parse, scored -1,
and then crashes on them before asking any provider; the bench's `PassingRunsOnly` keeps the runs that
passed, as DSPy's filter means to. BetterTogether logs a step that fails and goes on: the bench prints
what it said, and the table says "failed" for the steps DSPy did not finish.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BIG = 10**6  # "never stop on errors": a small model's unparsed replies are failed examples, not a reason to stop


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the weights: alias, folder or hub id (default: smollm2-135m)")
    p.add_argument("--base-url", help="a running vLLM server with runtime LoRA loading on; default: start one here")
    p.add_argument("--served-model-name", default="smol", help="the server's name for the model (default: smol)")
    p.add_argument("--dtype", default="float32", help="the server's dtype, when this script starts it (default: float32)")
    p.add_argument("--strategy", default="p -> w -> p")
    p.add_argument("--train-size", type=int, default=15, help="(default: 15, tandem's tiny budget)")
    p.add_argument("--val-size", type=int, default=20, help="(default: 20)")
    p.add_argument("--test-size", type=int, default=50, help="(default: 50)")
    p.add_argument("--num-candidates", type=int, default=2, help="shuffled bootstrap candidates (default: 2)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="(default: 96)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=16, help="programs run at once, on both sides (default: 16)")
    p.add_argument("--out", default="runs/dspy-side-by-side", help="a new folder for both runs and results.json")
    return p.parse_args()


# -- the server and its counters ------------------------------------------------------------------


@contextlib.contextmanager
def vllm_server(weights: str, name: str, dtype: str, rank: int, log_path: Path):
    """vLLM's OpenAI-compatible server on a free port, runtime adapter loading on; stopped on exit."""
    import httpx

    from tandem.lm.models import resolve_model
    from tandem.lm.vllm import cpu_environment, lora_rank_slot

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **cpu_environment(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model(weights),
               "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
               "--max-model-len", "4096", "--enable-lora", "--max-lora-rank", str(lora_rank_slot(rank)),
               "--max-loras", "2", "--gpu-memory-utilization", "0.25", "--enforce-eager"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the vLLM server exited: {log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise SystemExit(f"the vLLM server did not come up in 600 s: see {log_path}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


class Counters:
    """The server's request and generated-token counters, sampled every 0.25 s with the wall-clock time,
    so any window of time (a step) can be charged what the server did in it."""

    def __init__(self, base_url: str):
        self.url = base_url.removesuffix("/v1") + "/metrics"
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> tuple[float, float, float]:
        import httpx

        text = httpx.get(self.url, timeout=10).text
        total = {"vllm:request_success_total": 0.0, "vllm:generation_tokens_total": 0.0}
        for line in text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in total:
                total[name] += float(line.rsplit(" ", 1)[1])
        row = (time.time(), total["vllm:request_success_total"], total["vllm:generation_tokens_total"])
        self.samples.append(row)
        return row

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    def between(self, start: float, end: float) -> tuple[int, int]:
        """(requests, generated tokens) from the last sample before `start` to the first after `end`."""
        self.sample()
        before = max((s for s in self.samples if s[0] <= start), default=self.samples[0])
        after = min((s for s in self.samples if s[0] >= end), default=self.samples[-1])
        return int(after[1] - before[1]), int(after[2] - before[2])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- tandem --------------------------------------------------------------------------------------------


def run_tandem(args, url: str, weights: str, run_dir: Path, counters: Counters) -> list[dict]:
    """`tandem optimize --engine openai` on the server; each step's window is its step.json's time of
    writing less its seconds."""
    from tandem.kinds import parse_strategy, prefix_name

    command = [sys.executable, "-m", "tandem", "optimize", "--task", "iris", "--model", weights, "--engine", "openai",
               "--base-url", url, "--served-model-name", args.served_model_name, "--strategy", args.strategy,
               "--run-dir", str(run_dir), "--no-cache", "--threads", str(args.threads),
               "--train-size", str(args.train_size), "--val-size", str(args.val_size), "--test-size", str(args.test_size),
               "--num-candidates", str(args.num_candidates), "--max-bootstrapped-demos", "3", "--max-labeled-demos", "3",
               "--max-new-tokens", str(args.max_new_tokens), "--epochs", str(args.epochs), "--rank", str(args.rank),
               "--alpha", str(args.alpha), "--learning-rate", str(args.learning_rate)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"tandem: {time.perf_counter() - started:.0f} s in all (start-up included)", flush=True)
    steps = parse_strategy(args.strategy)
    rows = []
    for depth in range(len(steps) + 1):
        path = run_dir / prefix_name(steps[:depth]) / "step.json"
        step = json.loads(path.read_text())
        end = path.stat().st_mtime
        requests, tokens = counters.between(end - step["seconds"], end)
        rows.append({"step": " -> ".join(steps[:depth]) or "vanilla", "val": step["val"], "test": step["test"],
                     "seconds": step["seconds"], "requests": requests, "tokens": tokens,
                     "notes": "; ".join(step["details"].get("notes", []))})
    return rows


# -- DSPy ----------------------------------------------------------------------------------------------


class StepFailures(logging.Handler):
    """BetterTogether logs a failed step and goes on with the best program so far: keep what it said."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "failed with error" in message:
            self.lines.append(re.sub(r"\x1b\[[0-9;]*m", "", message))


def run_dspy(args, url: str, weights: str, train, val, test, program_signature: str, instructions: str,
             jobs: Path, counters: Counters) -> tuple[list[dict], list[str]]:
    """DSPy's BetterTogether with TandemProvider; each optimizer is timed as BetterTogether starts it, and
    each step's program is scored on test afterwards (its time and requests added to the step's)."""
    import dspy
    from dspy.teleprompt import BootstrapFewShotWithRandomSearch, BootstrapFinetune, Teleprompter

    from tandem.integrations.dspy import TandemProvider
    from tandem.settings import LoraSettings

    marks: list[float] = []

    class Timed(Teleprompter):
        """An optimizer that notes when BetterTogether starts it: the boundaries of the steps."""

        def __init__(self, inner):
            self.inner = inner

        def compile(self, student, *, trainset, teacher=None, valset=None):
            marks.append(time.time())
            accepted = inspect.signature(self.inner.compile).parameters
            given = {"trainset": trainset, "teacher": teacher, "valset": valset}
            return self.inner.compile(student, **{k: v for k, v in given.items() if k in accepted})

    class PassingRunsOnly(BootstrapFinetune):
        """DSPy 3.4.1's BootstrapFinetune keeps runs whose reply did not parse (scored -1, which its filter
        takes for a pass) and then fails on them (AttributeError: 'FailedPrediction' object has no attribute
        'get'), so a model that does not follow its format ends the weight step before any provider is
        asked. Kept here: the runs that passed the metric, as its filter means to (and tandem does)."""

        def _prepare_finetune_data(self, trace_data, lm, pred_ind=None):
            passed = [d for d in trace_data if (d["score"] or 0) > 0]
            return super()._prepare_finetune_data(passed, lm, pred_ind)

    class Iris(dspy.Module):
        def __init__(self):
            super().__init__()
            self.classify = dspy.ChainOfThought(dspy.Signature(program_signature, instructions))

        def forward(self, **inputs):
            return self.classify(**inputs)

    def metric(example, prediction, trace=None) -> float:
        return float(str(getattr(prediction, "species", "")).strip().lower() == example.species)

    lora = LoraSettings(rank=args.rank, alpha=args.alpha, epochs=args.epochs, learning_rate=args.learning_rate)
    provider = TandemProvider(url, out_dir=jobs, lora=lora, served_model_name=args.served_model_name)
    lm = dspy.LM(f"openai/{args.served_model_name}", api_base=url, api_key="none", provider=provider,
                 finetuning_model=weights, temperature=0.0, max_tokens=args.max_new_tokens, cache=False)
    student = Iris()
    student.set_lm(lm)
    prompts = BootstrapFewShotWithRandomSearch(metric, max_bootstrapped_demos=3, max_labeled_demos=3,
                                               num_candidate_programs=args.num_candidates, num_threads=args.threads,
                                               max_errors=BIG)
    optimizer = dspy.BetterTogether(metric, p=Timed(prompts),
                                    w=Timed(PassingRunsOnly(metric, exclude_demos=True, num_threads=args.threads)))
    failures = StepFailures()
    logging.getLogger("dspy.teleprompt.bettertogether").addHandler(failures)
    start = time.time()
    best = optimizer.compile(student, trainset=train, valset=val, strategy=args.strategy, num_threads=args.threads,
                             max_errors=BIG, seed=0)
    end = time.time()
    for line in failures.lines:
        print(f"DSPy: {line}", flush=True)
    print(f"DSPy: {end - start:.0f} s for BetterTogether (test scoring after it)", flush=True)
    bounds = [start, *marks, end]
    evaluate = dspy.Evaluate(devset=test, metric=metric, num_threads=args.threads, max_errors=BIG,
                             display_progress=False, display_table=False)
    rows = []
    for i, candidate in enumerate(sorted(best.candidate_programs, key=lambda c: len(c["strategy"]))):
        requests, tokens = counters.between(bounds[i], bounds[i + 1])
        tested = time.time()
        score = evaluate(candidate["program"]).score
        done = time.time()
        more_requests, more_tokens = counters.between(tested, done)
        rows.append({"step": candidate["strategy"] or "vanilla", "val": candidate["score"], "test": score,
                     "seconds": bounds[i + 1] - bounds[i] + done - tested, "requests": requests + more_requests,
                     "tokens": tokens + more_tokens, "notes": ""})
    return rows, failures.lines


# -- side by side ----------------------------------------------------------------------------------------


def table(tandem_rows: list[dict], dspy_rows: list[dict]) -> str:
    """One markdown row a step: each figure for tandem, then for DSPy ("failed" where DSPy's step did not finish)."""
    columns = [("val", "val %", ".1f"), ("test", "test %", ".1f"), ("seconds", "s", ".0f"), ("requests", "requests", "d"),
               ("tokens", "gen. tokens", "d")]
    head = "| step | " + " | ".join(f"tandem {name} | DSPy {name}" for _, name, _ in columns) + " |"
    lines = [head, "|---" * (1 + 2 * len(columns)) + "|"]
    theirs = {r["step"]: r for r in dspy_rows}
    for mine in tandem_rows:
        other = theirs.get(mine["step"])
        cells = [f"{format(mine[key], fmt)} | {format(other[key], fmt) if other else 'failed'}"
                 for key, _, fmt in columns]
        lines.append(f"| {mine['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dspy_examples(examples) -> list:
    """tandem's examples as DSPy's, the same inputs marked."""
    import dspy

    return [dspy.Example(**dict(e)).with_inputs(*e.input_keys) for e in examples]


def main() -> None:
    from tandem.export import dspy_signature
    from tandem.lm.models import resolve_model
    from tandem.settings import DataSettings
    from tandem.tasks import load_task

    args = parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty: give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    weights = resolve_model(args.model)
    task = load_task("iris")
    train, val, test = task.sized(DataSettings(args.train_size, args.val_size, args.test_size))
    (_, module), = task.make_program().named_predictors()
    with contextlib.ExitStack() as stack:
        url = args.base_url or stack.enter_context(vllm_server(weights, args.served_model_name, args.dtype, args.rank,
                                                               out / "server.log"))
        counters = Counters(url)
        stack.callback(counters.stop)
        tandem_rows = run_tandem(args, url, weights, out / "tandem", counters)
        dspy_rows, failed = run_dspy(args, url, weights, dspy_examples(train), dspy_examples(val), dspy_examples(test),
                                     dspy_signature(module), module.signature.instructions, out / "dspy-jobs", counters)
    result = table(tandem_rows, dspy_rows)
    print(f"\nIris, {args.model} on one vLLM server, strategy {args.strategy}: {len(train)} train / {len(val)} val / "
          f"{len(test)} test, {args.num_candidates} shuffled candidates, LoRA r{args.rank} {args.epochs} epochs, "
          f"{args.max_new_tokens} new tokens, {args.threads} threads")
    print(result)
    for line in failed:
        print(f"DSPy: {line}")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "tandem": tandem_rows, "dspy": dspy_rows,
                                                  "dspy_failed_steps": failed}, indent=1))


if __name__ == "__main__":
    main()
