"""Throughput of the GSM8K program: plain one-at-a-time `model.generate` vs tandem's batched engine.

Both sides run the same examples with the same prompts, dtype and token limit, greedy, no cache.
Prints examples/s, generated tokens/s, the ratio, and the fraction of the compute roofline:
2 x params FLOPs per prompt and generated token, against matmul FLOP/s measured in this run.

    python bench/throughput.py --examples 64
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=64, help="GSM8K test examples, the same for both sides")
    parser.add_argument("--baseline-examples", type=int, help="run the slow side on only the first N (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from tandem.evaluate import evaluate
    from tandem.settings import GenerationSettings
    from tandem.lm.local import LocalLM, matmul_flops
    from tandem.tasks import load_task

    task = load_task("gsm8k")
    examples = task.test[: args.examples]
    program = task.make_program()
    engine = LocalLM(args.model, dtype=args.dtype, max_batch=args.batch_size)
    model, tokenizer = engine.model, engine.tokenizer
    params = sum(p.numel() for p in model.parameters())
    peak = matmul_flops(engine.dtype, 1024, 5)
    print(f"model {args.model}: {params / 1e6:.0f}M params, {engine.dtype}, matmul peak {peak / 1e9:.0f} GFLOP/s, "
          f"{torch.get_num_threads()} threads")

    # (a) what a user gets calling the model per example
    baseline = examples[: args.baseline_examples or len(examples)]
    eos = set(engine._eos_ids())
    prompt_tokens = new_tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for ex in baseline:
            ids = torch.tensor([engine.encode(program.solve.messages(ex.inputs()))])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, top_k=None, pad_token_id=tokenizer.pad_token_id)
            row = out[0, ids.shape[1]:].tolist()
            prompt_tokens += ids.shape[1]
            new_tokens += next((j for j, t in enumerate(row) if t in eos), len(row))
    a_seconds = time.perf_counter() - started
    a = (len(baseline) / a_seconds, new_tokens / a_seconds, 2 * params * (prompt_tokens + new_tokens) / a_seconds / peak)

    # (b) tandem: concurrent program executions, dynamic batching
    result = evaluate(program, engine, examples, task.metric,
                      GenerationSettings(max_new_tokens=args.max_new_tokens, threads=args.batch_size), progress=False)
    u = result.usage
    b_tokens = u["prompt_tokens"] + u["completion_tokens"]
    b = (len(examples) / result.seconds, u["completion_tokens"] / result.seconds,
         2 * params * b_tokens / result.seconds / peak)

    print(f"{'side':<34}{'examples':>9}{'ex/s':>9}{'gen tok/s':>11}{'roofline':>10}")
    print(f"{'(a) model.generate, one at a time':<34}{len(baseline):>9}{a[0]:>9.3f}{a[1]:>11.1f}{a[2]:>10.1%}")
    print(f"{'(b) tandem engine, batched':<34}{len(examples):>9}{b[0]:>9.3f}{b[1]:>11.1f}{b[2]:>10.1%}")
    print(f"ratio b/a: {b[0] / a[0]:.1f}x examples/s, {b[1] / a[1]:.1f}x generated tok/s; "
          f"tandem score {result.score:.1f}% ({result.n_errors} unparsed)")
    engine.close()


if __name__ == "__main__":
    main()
