"""R: group-relative policy optimization over whole program runs (mmGRPO, Ziems et al. 2025).

Θ learns only from runs that passed; a weak model passes few, and an adapter trained on them
learns the prior. R learns from every run, the failed ones too, by comparing runs of the same
example with each other:

- Rounds. A round takes `round_examples` training examples (cycling through a seeded shuffle of
  the training set) and samples `group_size` runs of the current program on each, at
  `rollout_temperature`, each request seeded, through the engine in use with the current adapter.
- Reward: the task's metric of a run; a failed run (an unparseable reply, say) scores 0 and is
  counted by kind. Advantage: the run's reward minus its group's mean. Not divided by the group's
  standard deviation by default (`scale_rewards`): Dr. GRPO (Liu et al. 2025) shows that dividing
  weights groups the model almost always gets right or wrong the most (a group of 3 passes and 1
  fail has std 0.43, and its one failure gets advantage -1.7), which on binary rewards means the
  examples that carry least information steer the update. A group whose runs all score the same
  carries no signal: it is skipped and counted.
- Every module call of a run takes the run's advantage; the update (training/policy.py `policy_update`)
  is the clipped policy-gradient objective on the reply tokens the model chose, with the policy
  that sampled the runs as the ratio's reference, averaged per module (mmGRPO's alignment). Tokens
  a grammar forced (labels, the rest of a choice) carry no loss. No KL term by default
  (`kl_coef`): DAPO and Dr. GRPO drop it, a LoRA at a small learning rate stays near its base,
  and it costs one more forward pass per call; with kl_coef > 0 it is taken against the base model
  with the adapter switched off, with no second model in memory.
- The adapter is ONE LoRA shared by all modules. It starts as the program's current adapter
  (`p -> w -> r` continues from Θ's) or a new one. Each round's adapter goes to its own folder
  (rounds/003/adapter), and the program points at it: every engine serves a new folder by path
  without restarting (tandem's engine loads it beside the others, vLLM takes a new LoRARequest, a
  server loads it at runtime).
- Val is scored (greedy, as every step is scored) every `val_every` rounds and after the last; the
  step keeps the round best on val (the start, round 0, included: a step that only hurt returns
  the program it was given). Test is never looked at.
- A round is finished when its round.json exists; a rerun continues after the last finished
  round. Sampled requests are seeded and cached, so even a round cut short replays its rollouts.

What was taken from TRL: nothing as code. TRL's GRPOTrainer samples completions of single prompts
itself (its own `generate` or a vLLM server it drives) and scores them with reward functions of
(prompt, completion); here a rollout is a whole program run through tandem's engines, several
module calls with one reward, so the sampling, grouping and masking are tandem's and only the
objective follows TRL's (and DAPO's) formulation: token-level clipped ratio with clip-higher,
the loss-type choices Dr. GRPO argues for, and the k3 KL estimator.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ..evaluate import EvalResult, Metric, evaluate
from ..lm.base import LM, can_train
from ..program import Example, Program
from ..prompts import forced_spans
from ..rundir import write_json
from ..settings import GenerationSettings, LoraSettings, PolicySettings
from ..training.policy import train_policy
from ..training.reports import PolicyCall

log = logging.getLogger(__name__)


@dataclass
class Group:
    """The runs sampled for one example in a round, and their advantages."""

    example: int  # index into the training set
    rewards: list[float]
    advantages: list[float]
    skipped: bool  # every run scored the same: no signal


def group_advantages(rewards: Sequence[float], scale: bool = False) -> tuple[list[float], bool]:
    """Each reward minus the group's mean (divided by the group's std if `scale`), and whether the
    group is skipped because every reward is the same (all advantages 0)."""
    mean = statistics.fmean(rewards)
    if max(rewards) - min(rewards) < 1e-9:
        return [0.0] * len(rewards), True
    std = statistics.pstdev(rewards) if scale else 1.0
    return [(r - mean) / std for r in rewards], False


@dataclass
class RoundRecord:
    round: int
    examples: list[int]  # training examples this round sampled on
    reward_mean: float  # mean metric over the round's runs, failed ones as 0
    groups: int
    skipped_groups: int
    failures: dict[str, int]  # failed runs by kind
    calls: int  # module calls trained on
    by_module: dict[str, int]
    val: float | None  # None where val was not scored this round
    adapter: str | None  # relative to the step folder
    rollout_seconds: float
    update_seconds: float
    seconds: float
    tokens_per_second: float  # trainer throughput (prompt and reply tokens)
    rollout_tokens_per_second: float  # generated tokens per second while sampling
    loss: float | None = None
    clip_fraction: float | None = None
    kl: float | None = None
    forced_tokens: int = 0
    trained_tokens: int = 0
    steps: int = 0  # optimizer steps this round made
    no_loss_calls: int = 0  # calls left out: every reply token was forced, none the model chose
    retokenized: int = 0  # calls trained on a re-tokenization of their text: the engine gave no token ids
    onpolicy_ratio_error: float = 0.0  # the update's first-step largest |ratio - 1| (0 up to rounding)


@dataclass
class PolicyResult:
    program: Program
    rounds: list[RoundRecord]
    start_val: float
    best_round: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"adapter": self.program.adapter, "start_val": self.start_val, "best_round": self.best_round,
                "rounds": [asdict(r) for r in self.rounds], "notes": self.notes,
                "skipped_groups": sum(r.skipped_groups for r in self.rounds),
                "groups": sum(r.groups for r in self.rounds)}


def _round_examples(n_train: int, per_round: int, round_: int, seed: int) -> list[int]:
    """Round `round_` (1-based)'s examples: consecutive slices of one seeded shuffle, wrapping around."""
    order = list(range(n_train))
    random.Random(seed).shuffle(order)
    start = (round_ - 1) * per_round
    return [order[(start + i) % n_train] for i in range(min(per_round, n_train))]


def _calls(program: Program, result: EvalResult, advantages: Sequence[float], constrained: bool) -> list[PolicyCall]:
    """Every module call of every run with a nonzero advantage (a zero one adds nothing to the loss)."""
    predictors = dict(program.named_predictors())
    out = []
    for run, advantage in zip(result.results, advantages):
        if advantage == 0:
            continue
        for entry in run.trace:
            if not entry.reply or entry.module not in predictors:
                continue
            forced = forced_spans(predictors[entry.module].signature, entry.reply) if constrained else ()
            out.append(PolicyCall(entry.module, list(entry.messages), entry.reply, advantage, forced,
                                  None if entry.token_ids is None else tuple(entry.token_ids), tuple(entry.forced),
                                  entry.finish_reason != "length"))
    return out


def round_seeds(seed: int, round_: int, runs: int) -> list[int]:
    """The sampling seeds of round `round_` (1-based)'s `runs` runs: consecutive, never one of another
    round's (nor, below a billion runs a step, of another seed's)."""
    first = seed * 1_000_000_000 + (round_ - 1) * runs
    return list(range(first, first + runs))


def _finished_rounds(out_dir: Path) -> list[RoundRecord]:
    """The leading finished rounds in `out_dir/rounds` (a round is finished once its round.json exists)."""
    rounds = []
    while (path := out_dir / "rounds" / f"{len(rounds) + 1:03d}" / "round.json").exists():
        rounds.append(RoundRecord(**json.loads(path.read_text(encoding="utf-8"))))
    return rounds


def policy_optimize(
    program: Program,
    lm: LM,
    train: Sequence[Example],
    val: Sequence[Example],
    metric: Metric,
    settings: PolicySettings = PolicySettings(),
    lora: LoraSettings = LoraSettings(),
    *,
    out_dir: str | Path,
    seed: int = 0,
    generation: GenerationSettings = GenerationSettings(),
    progress: bool = True,
    keep: str = "best",
) -> PolicyResult:
    """Return the program with the adapter of the round best on val (or `program` itself, if no
    round beat it), after up to `settings.rounds` rounds; finished rounds in `out_dir` are reused.
    `keep="last"`: the last round's, whatever val says (WeightSettings.keep_checkpoint)."""
    if not can_train(lm, "train_policy"):
        raise TypeError(f"LM '{lm.name}' cannot train: r steps need an engine that trains adapters")
    if not train or not val:
        raise ValueError(f"an r step needs training and validation examples (got {len(train)} train, {len(val)} val)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = replace(lora, seed=seed)
    start_file = out_dir / "start.json"
    if start_file.exists():
        start_val = json.loads(start_file.read_text(encoding="utf-8"))["val"]
    else:
        start_val = evaluate(program, lm, val, metric, generation, progress=progress, desc="r: val, round 0").score
        write_json(start_file, {"val": start_val})

    rounds = _finished_rounds(out_dir)
    if rounds:
        log.info("r step: reusing %d finished rounds in %s", len(rounds), out_dir / "rounds")
    current = program.clone()
    if rounds and rounds[-1].adapter:
        current.adapter = str((out_dir / rounds[-1].adapter).resolve())
    sampling = replace(generation, temperature=settings.rollout_temperature)
    for k in range(len(rounds) + 1, settings.rounds + 1):
        started = time.perf_counter()
        folder = out_dir / "rounds" / f"{k:03d}"
        chosen = _round_examples(len(train), settings.round_examples, k, seed)
        order = [i for i in chosen for _ in range(settings.group_size)]
        seeds = round_seeds(seed, k, len(order))
        sampled = evaluate(current, lm, [train[i] for i in order], metric, sampling, progress=progress,
                           desc=f"r: round {k}/{settings.rounds}, {len(order)} runs", seed=seeds)
        rollout_seconds = time.perf_counter() - started
        generated = sampled.usage.get("engine_completion_tokens", sampled.usage.get("completion_tokens", 0))
        groups, advantages = [], []
        for g, i in enumerate(chosen):
            rewards = [r.score for r in sampled.results[g * settings.group_size:(g + 1) * settings.group_size]]
            adv, skipped = group_advantages(rewards, settings.scale_rewards)
            groups.append(Group(i, rewards, adv, skipped))
            advantages += adv
        calls = _calls(current, sampled, advantages, generation.constrained)
        report = None
        if calls:
            report = train_policy(lm, calls, current.adapter, folder, lora, settings, progress=progress)
            current = current.clone()
            current.adapter = str((folder / "adapter").resolve())
        else:
            log.info("r round %d: every group scored alike, no update", k)
        val_score = None
        if k % settings.val_every == 0 or k == settings.rounds:
            val_score = evaluate(current, lm, val, metric, generation, progress=progress,
                                 desc=f"r: val, round {k}").score
        seconds = time.perf_counter() - started
        record = RoundRecord(
            round=k, examples=chosen, reward_mean=100.0 * statistics.fmean(r.score for r in sampled.results),
            groups=len(groups), skipped_groups=sum(g.skipped for g in groups), failures=sampled.failures(),
            calls=report.calls if report else 0, by_module=report.by_module if report else {}, val=val_score,
            adapter=str(Path(current.adapter).resolve().relative_to(out_dir.resolve())) if current.adapter and
            Path(current.adapter).resolve().is_relative_to(out_dir.resolve()) else None,
            rollout_seconds=rollout_seconds, update_seconds=report.seconds if report else 0.0, seconds=seconds,
            tokens_per_second=report.tokens_per_second if report else 0.0,
            rollout_tokens_per_second=generated / rollout_seconds if rollout_seconds else 0.0,
            loss=report.loss if report else None, clip_fraction=report.clip_fraction if report else None,
            kl=report.kl if report else None, forced_tokens=report.forced_tokens if report else 0,
            trained_tokens=report.tokens if report else 0, steps=report.steps if report else 0,
            no_loss_calls=report.no_loss_tokens if report else 0, retokenized=report.retokenized if report else 0,
            onpolicy_ratio_error=report.onpolicy_ratio_error if report else 0.0,
        )
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "groups.json", [asdict(g) for g in groups])
        write_json(folder / "round.json", asdict(record))  # written last: the round is finished
        rounds.append(record)
        log.info("r round %d/%d: reward %.1f%%, %d/%d groups skipped, %d calls trained, val %s, %.0f s", k,
                 settings.rounds, record.reward_mean, record.skipped_groups, record.groups, record.calls,
                 "-" if val_score is None else f"{val_score:.1f}%", seconds)

    scored = [(0, start_val)] + [(r.round, r.val) for r in rounds if r.val is not None]
    best_round, best_val = max(scored, key=lambda rv: rv[1]) if keep == "best" else scored[-1]  # ties: the earlier
    best = program.clone()
    if best_round:
        adapter = rounds[best_round - 1].adapter
        best.adapter = str((out_dir / adapter).resolve()) if adapter else program.adapter
    skipped = sum(r.skipped_groups for r in rounds)
    total = sum(r.groups for r in rounds)
    notes = [f"{len(rounds)} rounds of {settings.round_examples} examples x {settings.group_size} runs; "
             f"kept round {best_round} {'by val' if keep == 'best' else '(the last: keep_checkpoint=last)'} "
             f"({best_val:.1f}%, start {start_val:.1f}%)",
             f"{skipped}/{total} groups skipped (every run scored alike); "
             f"{sum(r.steps for r in rounds)} optimizer steps"]
    if best_round == 0:
        notes.append("no round beat the starting program on val: it is kept unchanged")
    return PolicyResult(best, rounds, start_val, best_round, notes)


