"""LoRA training speed on the embedded model against the compute roofline.

Trains on GSM8K chat examples (the program's prompt, the gold worked solution as the reply) with
tandem's training loop at a few micro-batch sizes, and prints tokens/s beside the roofline:
6 x params FLOPs per trained token at the matmul FLOP/s measured in the same run.

    python bench/finetune.py --examples 32
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--micro-batches", default="1,4,8", help="micro-batch sizes to compare")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from tandem.lm.local import LocalLM, matmul_flops
    from tandem.settings import LoraSettings
    from tandem.training.lora import finetune
    from tandem.prompts import render_messages, render_reply
    from tandem.tasks import load_task

    task = load_task("gsm8k")
    predictor = task.make_program().solve
    conversations = [
        render_messages(predictor.signature, [], ex.inputs())
        + [{"role": "assistant", "content": render_reply(predictor.signature, ex)}]
        for ex in task.train[: args.examples]
    ]
    engine = LocalLM(args.model, dtype=args.dtype)
    params = sum(p.numel() for p in engine.model.parameters())
    peak = matmul_flops(engine.dtype, 1024, 5)
    print(f"model {args.model}: {params / 1e6:.0f}M params, {engine.dtype}, matmul peak {peak / 1e9:.0f} GFLOP/s, "
          f"{torch.get_num_threads()} threads, {len(conversations)} conversations, LoRA r={args.rank} on all linear layers")
    print(f"{'micro-batch':>11}{'tokens':>9}{'seconds':>9}{'tok/s':>8}{'roofline':>10}{'loss':>15}")
    for micro in (int(m) for m in args.micro_batches.split(",")):
        settings = LoraSettings(rank=args.rank, alpha=2 * args.rank, epochs=1, batch_size=max(8, micro), micro_batch_size=micro)
        with tempfile.TemporaryDirectory() as tmp:
            report = finetune(engine, conversations, f"{tmp}/adapter", settings, progress=False)
        fraction = 6 * params * report.tokens_per_second / peak
        print(f"{micro:>11}{report.tokens:>9}{report.seconds:>9.1f}{report.tokens_per_second:>8.0f}{fraction:>10.1%}"
              f"{report.first_loss:>7.3f} -> {report.last_loss:.3f}")
    engine.close()


if __name__ == "__main__":
    main()
