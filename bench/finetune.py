"""LoRA training speed on the embedded model against the compute roofline.

Trains on GSM8K chat examples (the program's prompt, the gold worked solution as the reply) with
tandem's training loop at a few micro-batch sizes, and prints tokens/s beside the roofline:
6 x params FLOPs per trained token at the matmul FLOP/s measured in the same run. Then a policy
update (an r step's, two optimizer steps) on the same replies as scored calls, at each size: its
tokens/s counts prompt and reply tokens through the trainer (the old log-probs' pass included).

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
    parser.add_argument("--no-policy", action="store_true", help="skip the policy update (r step) timing")
    args = parser.parse_args()

    from tandem.lm.local import LocalLM, matmul_flops
    from tandem.prompts import render_messages, render_reply
    from tandem.settings import LoraSettings, PolicySettings
    from tandem.tasks import load_task
    from tandem.training.lora import finetune
    from tandem.training.policy import train_policy
    from tandem.training.reports import PolicyCall

    task = load_task("gsm8k")
    predictor = task.make_program().solve
    examples = task.train[: args.examples]
    conversations = [render_messages(predictor.signature, [], ex.inputs())
                     + [{"role": "assistant", "content": render_reply(predictor.signature, ex)}] for ex in examples]
    # The same replies as scored calls of an r round: half rewarded, half punished
    calls = [PolicyCall("solve", c[:-1], c[-1]["content"], 0.5 if i % 2 else -0.5) for i, c in enumerate(conversations)]
    engine = LocalLM(args.model, dtype=args.dtype)
    params = sum(p.numel() for p in engine.model.parameters())
    peak = matmul_flops(engine.dtype, 1024, 5)
    print(f"model {args.model}: {params / 1e6:.0f}M params, {engine.dtype}, matmul peak {peak / 1e9:.0f} GFLOP/s, "
          f"{torch.get_num_threads()} threads, {len(conversations)} conversations, LoRA r={args.rank} on all linear layers")
    print(f"{'micro-batch':>11}{'lora tok/s':>12}{'roofline':>10}{'lora loss':>17}{'policy tok/s':>14}{'policy s':>10}")
    for micro in (int(m) for m in args.micro_batches.split(",")):
        settings = LoraSettings(rank=args.rank, alpha=2 * args.rank, epochs=1, batch_size=max(8, micro),
                                micro_batch_size=micro, min_steps=1)
        with tempfile.TemporaryDirectory() as tmp:
            report = finetune(engine, conversations, f"{tmp}/adapter", settings, progress=False)
            fraction = 6 * params * report.tokens_per_second / peak
            line = (f"{micro:>11}{report.tokens_per_second:>12.0f}{fraction:>10.1%}"
                    f"{report.first_loss:>8.3f} -> {report.last_loss:.3f}")
            if not args.no_policy:
                policy = train_policy(engine, calls, None, f"{tmp}/round", settings, PolicySettings(updates_per_round=2),
                                      progress=False)
                line += f"{policy.tokens_per_second:>14.0f}{policy.seconds:>10.1f}"
        print(line, flush=True)
    engine.close()


if __name__ == "__main__":
    main()
