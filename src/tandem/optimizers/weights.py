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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ..evaluate import Metric, evaluate
from ..lm.base import LM
from ..lm.training import TrainReport
from ..program import Example, Program
from ..prompts import render_messages, render_reply
from ..settings import GenerationSettings, WeightSettings

log = logging.getLogger(__name__)

NO_TRACES = "no successful traces, weights unchanged"


@dataclass
class WeightResult:
    program: Program
    trained: bool
    successful_runs: int
    conversations: int
    report: TrainReport | None = None
    notes: list[str] = field(default_factory=list)
    with_demos: bool = False
    trace_failures: dict[str, int] = field(default_factory=dict)  # failed training runs by kind

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trained": self.trained, "successful_runs": self.successful_runs,
                               "conversations": self.conversations, "adapter": self.program.adapter,
                               "with_demos": self.with_demos, "notes": self.notes,
                               "trace_failures": self.trace_failures}
        if self.report:
            r = self.report
            out["training"] = {"examples": r.examples, "tokens": r.tokens, "steps": r.steps, "seconds": round(r.seconds, 1),
                               "tokens_per_second": round(r.tokens_per_second, 1), "first_loss": round(r.first_loss, 4),
                               "last_loss": round(r.last_loss, 4), "dropped_too_long": r.dropped_too_long}
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
    generation: GenerationSettings = GenerationSettings(),
    progress: bool = True,
) -> WeightResult:
    """Return a new program that points at a freshly trained adapter in `out_dir/adapter`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = evaluate(program, lm, train, metric, generation, progress=progress, desc="traces")
    passing = [r.trace for r in runs.results if r.error is None and r.score >= settings.metric_threshold]
    if not passing:
        log.warning("weight step: %s", NO_TRACES)
        return WeightResult(program.clone(), False, 0, 0, notes=[NO_TRACES], with_demos=settings.with_demos,
                            trace_failures=runs.failures())

    rows = training_conversations(program, passing, settings.with_demos)
    with open(out_dir / "train.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    finetune = getattr(lm, "finetune", None)
    if finetune is None:
        raise TypeError(f"LM '{lm.name}' cannot fine-tune: weight steps need the local engine")
    lora = replace(settings.lora, seed=seed)
    report = finetune([row["messages"] for row in rows], out_dir / "adapter", lora, progress=progress)

    new = program.clone()
    new.adapter = str((out_dir / "adapter").resolve())
    if not settings.with_demos:
        for predictor in new.predictors():
            predictor.demos = []
    demos = "with" if settings.with_demos else "without"
    notes = [f"trained on {len(rows)} module calls from {len(passing)} passing runs, prompts {demos} demos"]
    if report.dropped_too_long:
        notes.append(f"{report.dropped_too_long} calls longer than max_length={lora.max_length} left out")
    return WeightResult(new, True, len(passing), len(rows), report, notes, settings.with_demos, runs.failures())
