"""A weight step's training in processes of its own, one per GPU, started by an existing launcher.

    torchrun --nproc-per-node 4 -m tandem.training.launch --model PATH --data train.jsonl --out adapter \\
        --settings '{"rank": 16, ...}' --dtype bfloat16

The weight step runs this itself when `--launcher "torchrun --nproc-per-node 4"` (or `"accelerate
launch --num_processes 4"`) is given: it writes the training calls (train.jsonl, as always), starts
the launcher, and reads the adapter and training.json back. Each process loads the model on its
device, and `train_lora` trains with `accelerate` in data parallel (DDP); the main process saves.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from ..errors import EngineError
from ..lm.base import chat_prompt
from ..settings import LoraSettings, from_dict, to_dict
from .lora import TrainingCall, TrainReport, train_lora

log = logging.getLogger(__name__)


def launch(launcher: str, model: str, dtype: str, data: Path, out_dir: Path, settings: LoraSettings,
           checkpoint_dir: Path | None = None):
    """Run the training under `launcher` and return its TrainReport (read from training.json);
    `checkpoint_dir` as `train_lora` takes it."""
    command = shlex.split(launcher) + ["-m", "tandem.training.launch", "--model", model, "--data", str(data),
                                       "--out", str(out_dir), "--dtype", dtype, "--settings",
                                       json.dumps(to_dict(settings))]
    if checkpoint_dir is not None:
        command += ["--checkpoints", str(checkpoint_dir)]
    log.info("training under a launcher: %s", " ".join(shlex.quote(c) for c in command))
    done = subprocess.run(command)
    if done.returncode != 0 or not (out_dir / "training.json").exists():
        raise EngineError(f"the training launcher exited with {done.returncode} (command: {' '.join(command[:4])} ...)")
    saved = json.loads((out_dir / "training.json").read_text())
    saved.pop("settings", None)
    saved.pop("processes", None)
    return TrainReport(**saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the base model's folder")
    parser.add_argument("--data", required=True, help="train.jsonl as a weight step writes it")
    parser.add_argument("--out", required=True, help="adapter folder to write")
    parser.add_argument("--settings", required=True, help="LoraSettings as JSON")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--checkpoints", help="folder for the adapters saved on the way (settings.checkpoint_every)")
    args = parser.parse_args(argv)

    # accelerate: only a launched training process needs it (imported here, not when a step starts one).
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # on CPUs: gloo across processes
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(accelerator.device)

    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    settings = from_dict(LoraSettings, json.loads(args.settings))
    torch.manual_seed(settings.seed)
    report, _ = train_lora(model, tokenizer, lambda m: chat_prompt(tokenizer, m), [TrainingCall.of(r) for r in rows], args.out, settings,
                           progress=accelerator.is_main_process, accelerator=accelerator,
                           checkpoint_dir=args.checkpoints)
    if accelerator.is_main_process:
        path = Path(args.out) / "training.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "processes": accelerator.num_processes}, indent=1))
    accelerator.end_training() if hasattr(accelerator, "end_training") else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
