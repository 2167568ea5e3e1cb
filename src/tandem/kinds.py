"""The step kinds of a strategy (`p -> w -> p`): their tokens, row symbols and names, and how strategies
and their steps are named. Plain data that the orchestrator, the grid, the CLI and the reports all read;
it imports none of them. How a kind runs is the orchestrator's (`optimizers/better_together.py` RUNS),
how it is reported is the report's (`report.py` SECTIONS): a new kind is one entry in each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import UsageError


@dataclass(frozen=True)
class StepKind:
    token: str  # in a strategy string: "p"
    symbol: str  # in a grid's row label: "Π"
    name: str  # what it is, for help texts and reports
    weights: bool  # trains an adapter: its answers on val are checked for collapse
    reflects: bool = False  # uses the reflection LM: the run folder records which one


KINDS: dict[str, StepKind] = {k.token: k for k in (
    StepKind("p", "Π", "prompts: bootstrapped demos, random search (BootstrapFewShotRS)", False),
    StepKind("w", "Θ", "weights: one LoRA on the passing runs' calls (BootstrapFinetune, the paper's)", True),
    StepKind("w+", "Θ+", "weights, extended: sampled runs, rationalization, class balance", True),
    StepKind("r", "R", "weights by policy optimization over whole program runs (group-relative, mmGRPO)", True),
    StepKind("g", "G", "instructions evolved by reflection on traces and feedback (GEPA)", False, reflects=True),
)}
ZERO_SHOT = "zero-shot"


def parse_strategy(text: str) -> tuple[str, ...]:
    """`"p -> w -> p"` -> ("p", "w", "p"); anything else is refused with the valid form."""
    steps = tuple(part.strip().lower().replace(" ", "") for part in str(text).split("->"))
    if not steps or any(s not in KINDS for s in steps):
        kinds = ", ".join(f"'{k.token}' ({k.name})" for k in KINDS.values())
        raise UsageError(f"invalid strategy {text!r}: write steps joined by '->', e.g. 'p -> w -> p'; the steps are "
                         f"{kinds}")
    return steps


def label(steps: Sequence[str]) -> str:
    """A grid's row label: ("p", "w") -> "Π→Θ"; no steps: "vanilla"."""
    return "→".join(KINDS[s].symbol for s in steps) if steps else "vanilla"


def prefix_name(steps: Sequence[str]) -> str:
    """A step's folder in a run: ("p", "w") -> "p-w"; no steps: "zero-shot"."""
    return "-".join(steps) if steps else ZERO_SHOT


def pretty(steps: Sequence[str]) -> str:
    return " -> ".join(steps) if steps else ZERO_SHOT


def results_path(run_dir: str | Path, steps: Sequence[str]) -> Path:
    """A strategy's results file in a run folder (strategies share the folder, each has its own file)."""
    return Path(run_dir) / f"results-{prefix_name(steps)}.json"
