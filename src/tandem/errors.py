"""What can go wrong, by who must act on it.

- `UsageError`: the user's input is wrong (a setting, a strategy, a data folder, a run folder that
  holds another configuration). The CLI prints one line and exits 2.
- `EngineError`: the LM backend could not do its work (unreachable, out of memory). It stops the
  step; the CLI prints one line and exits 1.
- `ModelOutputError` (in prompts.py): what the model wrote cannot be used. Only this fails an
  example softly; it is counted by kind.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base of the errors tandem reports as one line."""


class UsageError(TandemError, ValueError):
    """Bad input from the user: a setting, a name, a file. Exit code 2."""


class ConfigError(UsageError):
    """A setting with a bad value; `field` names it (`temperature`, `lora.rank`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


class EngineError(TandemError, RuntimeError):
    """The LM backend failed: it stops the evaluation and the step. Exit code 1."""
