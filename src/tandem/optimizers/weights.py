"""Θ: weight optimization by BootstrapFinetune.

Run the current program over the training set, keep the runs that pass the metric, turn every
module call of those runs into one chat example (the rendered prompt and the reply), and train
ONE LoRA adapter on all modules' examples together. The new program runs base model + adapter.

Each weight step trains a fresh adapter on the base model from traces of the current program
(which may itself run with an earlier adapter), as BetterTogether does. By default training
prompts are rendered without demos and the returned program has none, the paper's setting;
`with_demos=True` keeps the demos in both.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..evaluate import Metric, evaluate
from ..lm.base import LM
from ..lm.training import LoraSettings, TrainReport
from ..program import Example, Program
from ..prompts import render_messages, render_reply

log = logging.getLogger(__name__)

NO_TRACES = "no successful traces, weights unchanged"


@dataclass(frozen=True)
class WeightSettings:
    lora: LoraSettings = LoraSettings()
    with_demos: bool = False
    metric_threshold: float = 1.0


@dataclass
class WeightResult:
    program: Program
    trained: bool
    successful_runs: int
    conversations: int
    report: TrainReport | None = None
    notes: list[str] = field(default_factory=list)
    with_demos: bool = False

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trained": self.trained, "successful_runs": self.successful_runs,
                               "conversations": self.conversations, "adapter": self.program.adapter,
                               "with_demos": self.with_demos, "notes": self.notes}
        if self.report:
            r = self.report
            out["training"] = {"examples": r.examples, "tokens": r.tokens, "steps": r.steps, "seconds": round(r.seconds, 1),
                               "tokens_per_second": round(r.tokens_per_second, 1), "first_loss": round(r.first_loss, 4),
                               "last_loss": round(r.last_loss, 4)}
        return out


def training_conversations(program: Program, traces: Sequence[Sequence], with_demos: bool) -> list[dict[str, Any]]:
    """One chat example per module call: the messages the module would send, then the reply it gave."""
    predictors = dict(program.named_predictors())
    rows = []
    for trace in traces:
        for entry in trace:
            if entry.outputs is None or entry.module not in predictors:
                continue
            predictor = predictors[entry.module]
            messages = render_messages(predictor.signature, predictor.demos if with_demos else [], entry.inputs)
            messages.append({"role": "assistant", "content": render_reply(predictor.signature, entry.outputs)})
            rows.append({"module": entry.module, "messages": messages})
    return rows


def bootstrap_finetune(
    program: Program,
    lm: LM,
    train: Sequence[Example],
    val: Sequence[Example],
    metric: Metric,
    settings: WeightSettings = WeightSettings(),
    *,
    out_dir: str | Path,
    seed: int = 0,
    threads: int = 32,
    progress: bool = True,
    **run_settings: Any,
) -> WeightResult:
    """Return a new program that points at a freshly trained adapter in `out_dir/adapter`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = evaluate(program, lm, train, metric, threads=threads, progress=progress, desc="traces", **run_settings)
    passing = [r.trace for r in runs.results if r.error is None and r.score >= settings.metric_threshold]
    if not passing:
        log.warning("weight step: %s", NO_TRACES)
        return WeightResult(program.clone(), False, 0, 0, notes=[NO_TRACES], with_demos=settings.with_demos)

    rows = training_conversations(program, passing, settings.with_demos)
    with open(out_dir / "train.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    finetune = getattr(lm, "finetune", None)
    if finetune is None:
        raise TypeError(f"LM '{lm.name}' cannot fine-tune: weight steps need the local engine")
    lora = LoraSettings(**{**settings.lora.__dict__, "seed": seed})
    report = finetune([row["messages"] for row in rows], out_dir / "adapter", lora, progress=progress)

    new = program.clone()
    new.adapter = str((out_dir / "adapter").resolve())
    if not settings.with_demos:
        for predictor in new.predictors():
            predictor.demos = []
    demos = "with" if settings.with_demos else "without"
    notes = [f"trained on {len(rows)} module calls from {len(passing)} passing runs, prompts {demos} demos"]
    return WeightResult(new, True, len(passing), len(rows), report, notes, settings.with_demos)
