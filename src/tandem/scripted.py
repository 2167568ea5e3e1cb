"""A scripted LM for unit tests: replies come from a function of the request, no model needed; a
trainable one records what weight steps would train on."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable, Sequence

from .lm.base import Completion, Request, Usage
from .training.reports import TrainReport


class ScriptedLM:
    """Answers each request with `respond(request)` (text or a Completion); records every request it saw."""

    def __init__(self, respond: Callable[[Request], str], name: str = "scripted", trainable: bool = False):
        self.name = name
        self.respond = respond
        self.requests: list[Request] = []
        self.finetuned: list[list] = []  # conversations of each finetune call
        if not trainable:
            self.finetune = None  # type: ignore[assignment]  # weight steps then refuse this LM
        self.usage = Usage()
        self._lock = threading.Lock()

    def _complete(self, request: Request) -> Completion:
        reply = self.respond(request)  # a string, or a whole Completion (to script a reply cut at its limit)
        return reply if isinstance(reply, Completion) else Completion(reply, prompt_tokens=1, completion_tokens=1)

    def describe(self) -> dict[str, str]:
        return {"engine": "scripted", "model": self.name}

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        out = [self._complete(r) for r in requests]
        with self._lock:
            self.requests.extend(requests)
            self.usage.add(out)
        return out

    def finetune(self, conversations, out_dir, settings, progress: bool = True, checkpoint_dir=None):
        """Records the data and writes marker adapter folders: one optimizer step an epoch, a checkpoint
        after each (`checkpoint_dir/step-NNNN`, the last being `out_dir`); replies do not change unless
        `respond` reads `request.adapter`."""
        checkpoints = []
        for step in range(1, settings.epochs + 1):
            last = step == settings.epochs
            if not last and checkpoint_dir is None:
                continue
            out = Path(out_dir) if last else Path(checkpoint_dir) / f"step-{step:04d}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "adapter_config.json").write_text(json.dumps({"scripted": True, "seed": settings.seed, "step": step}))
            checkpoints.append({"step": step, "epoch": float(step), "path": str(out)})
        with self._lock:
            self.finetuned.append([getattr(c, "messages", c) for c in conversations])  # TrainingCall or messages
        return TrainReport(len(conversations), 0, 0, settings.epochs, 0.0, 0.0, 0.0, [], epochs=settings.epochs,
                           checkpoints=checkpoints if checkpoint_dir is not None else [])
