"""Shared-prefix prefill: prompts with demos, prefilled per row vs the shared part once per batch.

After Π a module's prompts share a long prefix (instructions and demos) and differ only in the
last user message. Both sides run the same program with the same demos on the same examples,
greedy, no cache, one engine with sharing off and one with it on. Prints examples/s, prompt
tokens per example, the prompt tokens the sharing skipped, the ratio, and whether the replies
were identical.

    python bench/prefix.py --task hotpotqa --examples 16 --demos 2
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="hotpotqa", choices=["gsm8k", "hotpotqa", "iris"])
    parser.add_argument("--examples", type=int, default=16, help="val examples, the same for both sides")
    parser.add_argument("--demos", type=int, default=2, help="labeled demos per module, from the training split")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="kept short: this measures prefill")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from tandem.evaluate import evaluate
    from tandem.settings import GenerationSettings
    from tandem.lm.local import LocalLM
    from tandem.optimizers.fewshot import labeled_demos
    from tandem.tasks import load_task

    task = load_task(args.task)
    examples = task.val[: args.examples]
    program = task.make_program()
    demos = labeled_demos(program, task.train, args.demos, random.Random(0))
    for name, predictor in program.named_predictors():
        predictor.demos = demos[name]

    rows = []
    replies = []
    for label, min_shared in (("(a) every row prefilled whole", 0), ("(b) shared prefix prefilled once", 32)):
        engine = LocalLM(args.model, dtype=args.dtype, max_batch=args.batch_size, min_shared_prefix=min_shared)
        started = time.perf_counter()
        result = evaluate(program, engine, examples, task.metric,
                          GenerationSettings(max_new_tokens=args.max_new_tokens, threads=args.batch_size), progress=False)
        seconds = time.perf_counter() - started
        usage = engine.usage
        rows.append((label, len(examples) / seconds, usage.prompt_tokens / len(examples),
                     usage.extra.get("shared_prefix_tokens", 0) / max(usage.prompt_tokens, 1), seconds))
        replies.append([[t.reply for t in r.trace] for r in result.results])
        engine.close()

    print(f"{args.task}, {args.examples} val examples, {args.demos} labeled demos per module, "
          f"{args.max_new_tokens} new tokens max, {engine.dtype}")
    print(f"{'side':<36}{'examples/s':>12}{'prompt tok/ex':>15}{'skipped':>10}{'seconds':>10}")
    for label, rate, tokens, skipped, seconds in rows:
        print(f"{label:<36}{rate:>12.3f}{tokens:>15.0f}{skipped:>9.0%}{seconds:>10.1f}")
    print(f"ratio b/a: {rows[1][1] / rows[0][1]:.2f}x; identical replies: {replies[0] == replies[1]}")


if __name__ == "__main__":
    main()
