"""What training takes and gives back, as plain data (no torch): a LoRA run's `TrainingCall`s and `TrainReport`, a policy
update's `PolicyCall`s and `PolicyReport`. The scripted LM of the tests returns these too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..lm.base import Message


@dataclass(frozen=True)
class TrainingCall:
    """One chat example to train on, with what the loop may know of it besides its messages.

    `group`: the class its answer names (a choice field's canonical value), where it has one: each
    optimizer step then holds the classes in their proportions (`stratified`), so a step's gradient is
    not the pull toward whichever class its few calls happen to share. `loss_from`: the character of the
    reply where the loss starts: the reply before it (the reasoning) stays in the sequence, read by the
    model, but is not taught (0: the whole reply is)."""

    messages: Sequence[Message]
    group: str | None = None
    loss_from: int = 0

    @classmethod
    def of(cls, row: dict) -> "TrainingCall":
        """A row of a weight step's train.jsonl."""
        return cls(row["messages"], row.get("group"), row.get("loss_from", 0))


@dataclass
class TrainReport:
    examples: int  # training calls trained on
    tokens: int  # tokens processed over all epochs, padding excluded
    target_tokens: int
    steps: int  # optimizer steps taken, counted in the loop
    seconds: float
    first_loss: float
    last_loss: float
    losses: list[float]
    dropped_too_long: int = 0  # calls left out because they exceed max_length
    learning_rates: list[float] = field(default_factory=list)  # per optimizer step
    step_losses: list[float] = field(default_factory=list)  # per optimizer step: its micro-batches' mean
    epochs: int = 0  # passes over the data: the setting's, or more to reach min_steps
    # The adapters saved on the way, the last one the adapter itself: {"step", "epoch", "path"} each,
    # `epoch` the passes over the data done by then (2.5: half-way through the third).
    checkpoints: list[dict] = field(default_factory=list)
    device: str = ""  # where it trained (cpu, cuda:0) and the base weights' dtype (bfloat16, float32)
    dtype: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class PolicyCall:
    """One module call of a sampled program run, with its run's advantage."""

    module: str
    messages: list[Message]  # the prompt exactly as it was sent
    reply: str  # what came back
    advantage: float
    forced: tuple[tuple[int, int], ...] = ()  # character spans of `reply` the grammar wrote, not the model
    # The reply as the engine sampled it (`Completion.token_ids`, the end token included) and the indices of
    # the tokens the engine wrote itself; None where the engine could not say: the reply is re-tokenized.
    token_ids: tuple[int, ...] | None = None
    engine_forced: tuple[int, ...] = ()
    ended: bool = True  # it ended by itself (not cut at the token limit): a re-tokenized reply gets the end token


@dataclass
class PolicyReport:
    calls: int  # calls trained on
    tokens: int  # reply tokens the model chose: the ones that carry loss
    forced_tokens: int  # reply tokens the grammar wrote: no loss
    prompt_tokens: int
    steps: int  # optimizer steps
    seconds: float
    loss: float  # mean over steps
    clip_fraction: float  # share of loss tokens whose ratio was clipped
    kl: float | None  # mean per-token KL estimate to the base model, when kl_coef > 0
    by_module: dict[str, int] = field(default_factory=dict)  # calls trained on per module
    dropped_too_long: int = 0
    no_loss_tokens: int = 0  # calls left out because every reply token was forced: nothing to learn from
    retokenized: int = 0  # calls trained on a re-tokenization of the reply text: the engine gave no token ids
    onpolicy_ratio_error: float = 0.0  # largest |ratio - 1| of the first step (on-policy: 0 up to rounding)
    micro_batch: int = 1  # calls per forward pass

    @property
    def tokens_per_second(self) -> float:
        """Sequence tokens through the trainer (prompt and reply, each forward and backward) per second."""
        return (self.prompt_tokens + self.tokens + self.forced_tokens) / self.seconds if self.seconds else 0.0
