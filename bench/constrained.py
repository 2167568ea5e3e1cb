"""What constrained decoding costs and what it buys: the same programs, examples and limits, free vs constrained.

For each task, tandem's engine runs the task's program on the same test examples twice, greedy, no
cache: once decoding freely (the reply parsed after the fact), once constrained to the reply format.
Prints generated tokens/s, wall time, replies that failed (by kind) and the score, side by side,
with the ratio of tokens/s; then the grammar mask's own cost per token (xgrammar), measured apart
from the model.

    python bench/constrained.py --examples 32 --max-new-tokens 192
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="iris,gsm8k")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import torch

    from tandem.evaluate import describe_failures, evaluate
    from tandem.lm.local import LocalLM
    from tandem.prompts import reply_format
    from tandem.settings import GenerationSettings
    from tandem.tasks import load_task

    engine = LocalLM(args.model, dtype=args.dtype)
    print(f"{args.model} ({engine.dtype}), {args.examples} test examples a task, greedy, max {args.max_new_tokens} "
          f"new tokens, {torch.get_num_threads()} threads")
    header = f"{'task':<8}{'decoding':<13}{'tok/s':>8}{'tokens':>8}{'wall s':>8}{'score %':>9}  failed"
    print(header)
    for name in args.tasks.split(","):
        task = load_task(name)
        rates = {}
        for constrained in (False, True):
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens, constrained=constrained)
            started = time.perf_counter()
            result = evaluate(task.make_program(), engine, task.test[: args.examples], task.metric, settings,
                              progress=False)
            wall = time.perf_counter() - started
            tokens = result.usage.get("completion_tokens", 0)
            rates[constrained] = tokens / wall
            failed = describe_failures(result.failures()) or "0"
            print(f"{name:<8}{'constrained' if constrained else 'free':<13}{tokens / wall:8.1f}{tokens:8.0f}{wall:8.1f}"
                  f"{result.score:9.1f}  {failed}")
        print(f"{name:<8}{'ratio c/f':<13}{rates[True] / rates[False]:8.2f}")

    # The mask alone: fill and apply it for one row over a typical reply, no model.
    task = load_task("iris")
    module = task.make_program().classify
    builder = engine._constraints()
    row = builder.row(reply_format(module.signature), 10_000)
    reply = "Reasoning: The petals are long and wide, so this is the largest of the three kinds.\nSpecies: virginica"
    ids = engine.tokenizer(reply, add_special_tokens=False)["input_ids"]
    logits = torch.zeros(1, engine.model.config.vocab_size)
    started = time.perf_counter()
    for t in ids:
        builder.apply(logits, [row], [0])
        row.forced.clear()
        row.accept(t)
    per_token = (time.perf_counter() - started) / len(ids)
    print(f"xgrammar mask: {per_token * 1e3:.3f} ms per token per row ({len(ids)} tokens of an Iris reply)")


if __name__ == "__main__":
    main()
