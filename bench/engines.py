"""Engines side by side: (a) `model.generate` one request at a time, (b) tandem's transformers engine,
(c) vLLM in process; the same GSM8K prompts, greedy, the same token limit, no cache.

Run twice over: the program's zero-shot prompts, then the same questions behind 3 labeled demos
(a long shared prefix: what prefix reuse is for). For each engine: start-up time, wall time,
generated tokens/s and peak memory (this process and its children: vLLM runs the model in a
worker process), then the ratios c/b and c/a.

    python bench/engines.py --examples 64 --baseline-examples 8
"""

from __future__ import annotations

import argparse
import threading
import time


class PeakMemory:
    """Peak resident memory of this process and its children, sampled every 0.1 s, above a baseline."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a child that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.base) / 2**30


def run_engine(label, make, prompts_sets, limit):
    """Start an engine with `make()`, then generate each prompt set; one row per set."""
    from tandem.lm import Request

    memory = PeakMemory()
    started = time.perf_counter()
    engine = make()
    startup = time.perf_counter() - started
    rows = []
    for name, messages in prompts_sets:
        requests = [Request(tuple(m), max_new_tokens=limit) for m in messages]
        started = time.perf_counter()
        completions = engine.generate(requests)
        wall = time.perf_counter() - started
        tokens = sum(c.completion_tokens for c in completions)
        rows.append({"engine": label, "prompts": name, "n": len(requests), "tokens": tokens, "wall": wall,
                     "rate": tokens / wall, "startup": startup, "texts": [c.text for c in completions]})
    peak = memory.stop()
    for row in rows:
        row["memory"] = peak
    close = getattr(engine, "close", None)
    if close:
        close()
    return rows


class OneAtATime:
    """`model.generate` on one prompt at a time: what a plain transformers script does."""

    def __init__(self, model_path, dtype, device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device = device

    def generate(self, requests):
        import torch

        from tandem.lm import Completion

        out = []
        for r in requests:
            text = self.tokenizer.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                gen = self.model.generate(**ids, max_new_tokens=r.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.eos_token_id)[0, ids["input_ids"].shape[1]:]
            out.append(Completion(self.tokenizer.decode(gen, skip_special_tokens=True), completion_tokens=len(gen)))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=64, help="GSM8K test questions for (b) and (c)")
    parser.add_argument("--baseline-examples", type=int, default=8, help="the first N of them for (a), the slow side")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu", help="for (a) and (b); vLLM runs where its build runs")
    args = parser.parse_args()

    from tandem.lm.local import LocalLM, pick_dtype
    from tandem.lm.models import resolve_model
    from tandem.lm.vllm import VLLMEngine
    from tandem.tasks import load_task

    task = load_task("gsm8k")
    program = task.make_program()
    module = program.solve
    questions = task.test[: args.examples]
    plain = [module.messages(q.inputs()) for q in questions]
    demos = [{"question": e["question"], "reasoning": e["reasoning"], "answer": e["answer"]} for e in task.train[:3]]
    with_demos = [module.messages(q.inputs(), demos=demos) for q in questions]
    sets = [("zero-shot", plain), ("3 demos", with_demos)]
    path = resolve_model(args.model)
    dtype = pick_dtype(args.dtype, args.device)
    name = str(dtype).removeprefix("torch.")
    print(f"{args.model} ({name}), greedy, {args.max_new_tokens} new tokens max, no cache; "
          f"(a) on the first {args.baseline_examples} of {args.examples} questions")

    rows = run_engine("(a) model.generate, one at a time", lambda: OneAtATime(path, dtype, args.device),
                      [(n, m[: args.baseline_examples]) for n, m in sets], args.max_new_tokens)
    rows += run_engine("(b) tandem engine", lambda: LocalLM(args.model, dtype=name, device=args.device, max_batch=64), sets,
                       args.max_new_tokens)
    rows += run_engine("(c) vLLM in process", lambda: VLLMEngine(args.model, dtype=name, max_batch=256), sets,
                       args.max_new_tokens)

    print(f"\n{'engine':<36}{'prompts':<11}{'n':>4}{'tokens':>8}{'wall s':>8}{'tok/s':>8}{'start s':>9}{'peak GB':>9}")
    for r in rows:
        print(f"{r['engine']:<36}{r['prompts']:<11}{r['n']:>4}{r['tokens']:>8}{r['wall']:>8.1f}{r['rate']:>8.1f}"
              f"{r['startup']:>9.1f}{r['memory']:>9.1f}")
    for prompts in ("zero-shot", "3 demos"):
        by = {r["engine"][:3]: r for r in rows if r["prompts"] == prompts}
        same = sum(x == y for x, y in zip(by["(b)"]["texts"], by["(c)"]["texts"]))
        print(f"{prompts}: c/b {by['(c)']['rate'] / by['(b)']['rate']:.2f}x, c/a {by['(c)']['rate'] / by['(a)']['rate']:.1f}x "
              f"(generated tok/s); replies identical in (b) and (c): {same}/{len(by['(b)']['texts'])}")


if __name__ == "__main__":
    main()
