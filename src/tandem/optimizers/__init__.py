"""Optimizers, one call shape: (program, lm, train, val, metric, settings) -> new program + typed result."""

from .better_together import BetterTogetherResult, OptimizeSettings, better_together, parse_strategy
from .prompts import PromptResult, PromptSettings, bootstrap_fewshot_rs
from .weights import WeightResult, WeightSettings, bootstrap_finetune

__all__ = [
    "better_together", "parse_strategy", "OptimizeSettings", "BetterTogetherResult",
    "bootstrap_fewshot_rs", "PromptSettings", "PromptResult",
    "bootstrap_finetune", "WeightSettings", "WeightResult",
]
