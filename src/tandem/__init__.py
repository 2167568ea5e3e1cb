"""tandem: optimize the prompts and the weights of LM programs in tandem (BetterTogether)."""

from .evaluate import EvalResult, evaluate
from .lm import LM, CachedLM, Completion, Request, load_lm
from .program import ChainOfThought, Example, Predict, Prediction, Program, Run, TraceEntry
from .prompts import Invalid, ModelOutputError, ParseError, Truncated, parse_reply, render_messages, reply_format
from .scripted import ScriptedLM
from .settings import GenerationSettings, OptimizeSettings
from .signatures import Field, Signature

__version__ = "0.1.0"
__all__ = [
    "Signature", "Field", "Predict", "ChainOfThought", "Program", "Run", "Example", "Prediction", "TraceEntry",
    "render_messages", "parse_reply", "ParseError", "LM", "Request", "Completion", "CachedLM", "ScriptedLM",
    "load_lm", "evaluate", "EvalResult", "ModelOutputError", "Truncated", "GenerationSettings", "OptimizeSettings",
    "Invalid", "reply_format",
]
