"""LoRA training speed on the trainer copy that `--engine openai` and `--engine vllm` train on
(lm/trainer_copy.py), in the checkpoint's own dtype (what `--engine openai` trained in before #24: the
copy was loaded without a dtype) beside the dtype `--dtype auto` chooses on this machine, and fp32.

On a CPU without native bf16 (an AVX2-only EPYC) a bf16 checkpoint's copy trained at 2-3 tokens/s where
fp32 trains at ~100; on a CPU with AVX-512 BF16 bf16 is the faster one. The probe decides per machine.

    python bench/trainer_copy.py --examples 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="weights (the embedded model's are bf16)")
    parser.add_argument("--examples", type=int, default=8, help="GSM8K training calls, one epoch")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tandem.lm.base import chat_prompt
    from tandem.lm.local import pick_dtype
    from tandem.lm.models import resolve_model
    from tandem.lm.trainer_copy import TrainerCopy
    from tandem.prompts import render_messages, render_reply
    from tandem.settings import LoraSettings
    from tandem.tasks import load_task
    from tandem.training.lora import train_lora

    path = resolve_model(args.model)
    config = json.loads((Path(path) / "config.json").read_text())
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"  # transformers 5 / 4 spelling
    chosen = str(pick_dtype("auto", "cpu", path)).removeprefix("torch.")
    task = load_task("gsm8k")
    predictor = task.make_program().solve
    conversations = [render_messages(predictor.signature, [], ex.inputs())
                     + [{"role": "assistant", "content": render_reply(predictor.signature, ex)}]
                     for ex in task.train[: args.examples]]
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = LoraSettings(rank=args.rank, alpha=2 * args.rank, epochs=1, min_steps=1)
    print(f"model {args.model} ({saved} checkpoint), {torch.get_num_threads()} threads, {len(conversations)} "
          f"GSM8K calls, one epoch, LoRA r={args.rank}; --dtype auto chooses {chosen} here")
    print(f"{'trainer copy in':<34}{'tokens':>8}{'seconds':>9}{'tok/s':>8}")
    rows = [(f"{saved} (the checkpoint's: before)", saved), (f"{chosen} (--dtype auto: now)", chosen),
            ("float32", "float32")]
    for label, dtype in rows:
        copy = TrainerCopy(path, dtype, "cpu")
        with tempfile.TemporaryDirectory() as tmp, copy.lend(tokenizer, lambda m: chat_prompt(tokenizer, m)) as trainee:
            report, trainee.model = train_lora(trainee.model, tokenizer, trainee.render, conversations,
                                               f"{tmp}/adapter", settings, progress=False)
        print(f"{label:<34}{report.tokens:>8}{report.seconds:>9.1f}{report.tokens_per_second:>8.0f}")


if __name__ == "__main__":
    main()
