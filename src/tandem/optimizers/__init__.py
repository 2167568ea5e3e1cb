"""Optimizers, one call shape: (program, lm, train, val, metric, settings) -> new program + typed result:
prompts (fewshot.py, reflect.py), weights (weights.py, policy.py), and the orchestrator that chains them
(better_together.py).

May import: program, evaluate, prompts, lm, training, kinds, answers, report, rundir, settings. Nothing
below imports an optimizer; the grid (experiments.py), export and the CLI sit above."""

from ..settings import OptimizeSettings, PromptSettings, WeightSettings
from .better_together import BetterTogetherResult, better_together, parse_strategy
from .fewshot import PromptResult, bootstrap_fewshot_rs
from .weights import WeightResult, bootstrap_finetune

__all__ = [
    "better_together", "parse_strategy", "OptimizeSettings", "BetterTogetherResult",
    "bootstrap_fewshot_rs", "PromptSettings", "PromptResult",
    "bootstrap_finetune", "WeightSettings", "WeightResult",
]
