"""Optimizers, one call shape: (program, lm, train, val, metric, settings) -> new program + typed result."""

from ..settings import OptimizeSettings, PromptSettings, WeightSettings
from .better_together import BetterTogetherResult, better_together, parse_strategy
from .fewshot import PromptResult, bootstrap_fewshot_rs
from .weights import WeightResult, bootstrap_finetune

__all__ = [
    "better_together", "parse_strategy", "OptimizeSettings", "BetterTogetherResult",
    "bootstrap_fewshot_rs", "PromptSettings", "PromptResult",
    "bootstrap_finetune", "WeightSettings", "WeightResult",
]
