"""Every setting tandem has, as typed dataclasses: the one place where defaults live.

Each field carries a one-line help text and its bounds. The command line is derived from these
classes (`add_arguments`), budgets are named overrides of the same fields, and a run folder's
config.json stores `to_dict(settings)`, read back through `from_dict`. A bad value is refused up
front with the field's name (`ConfigError`).

Flag names are the field names (`learning_rate` -> `--learning-rate`); where two nested classes
share a field name, the flag carries its parent's name (`--prompts-metric-threshold`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .errors import ConfigError, UsageError


def setting(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, lt: float | None = None,
            choices: tuple | None = None, cli: bool = True, repeat: bool = False) -> Any:
    """A dataclass field with its help text and bounds (checked by `validate`); `repeat`: a tuple whose
    flag is given once per value (`--base-url A --base-url B`)."""
    meta = {"help": help, "ge": ge, "gt": gt, "lt": lt, "choices": choices, "cli": cli, "repeat": repeat}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not settings")
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def validate(obj: Any) -> None:
    """Check every field against its bounds; raise ConfigError naming the first bad one."""
    for f in dataclasses.fields(obj):
        value, m = getattr(obj, f.name), f.metadata
        if value is None or dataclasses.is_dataclass(value) or isinstance(value, (bool, tuple, list)):
            continue
        if m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f.name, f"must be one of {', '.join(map(str, m['choices']))}, got {value!r}")
        if m.get("ge") is not None and value < m["ge"]:
            raise ConfigError(f.name, f"must be >= {m['ge']}, got {value}")
        if m.get("gt") is not None and value <= m["gt"]:
            raise ConfigError(f.name, f"must be > {m['gt']}, got {value}")
        if m.get("lt") is not None and value >= m["lt"]:
            raise ConfigError(f.name, f"must be < {m['lt']}, got {value}")


class Settings:
    """Mixin: validation on construction."""

    def __post_init__(self) -> None:
        validate(self)


# -- the settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings(Settings):
    """How every module call is sampled, and how many program executions run at once."""

    temperature: float = setting(0.0, "sampling temperature (0 = greedy)", ge=0)
    max_new_tokens: int = setting(384, "cap on tokens generated per module call", ge=1)
    threads: int = setting(32, "program executions run concurrently (their calls meet in the engine's batches)", ge=1)
    constrained: bool = setting(True, "constrain decoding to the reply format: every field, in order, typed values "
                                      "(off: the model writes freely and the reply is parsed after the fact)")

    def run_kwargs(self) -> dict[str, Any]:
        """What `Program.execute` takes."""
        return {"temperature": self.temperature, "max_new_tokens": self.max_new_tokens, "constrained": self.constrained}


ENGINES = ("auto", "transformers", "vllm", "openai")


@dataclass(frozen=True)
class EngineSettings(Settings):
    """Which engine runs the model, and its options."""

    engine: str = setting("auto", "transformers: tandem's own engine; vllm: vLLM in process; openai: a server at "
                                  "--base-url; auto: vllm where a CUDA GPU and vLLM are present, else transformers",
                          choices=ENGINES)
    base_url: tuple[str, ...] | None = setting(None, "openai engine: the server's URL, e.g. http://127.0.0.1:8000/v1; "
                                                     "once per server where several serve the same weights",
                                               repeat=True)
    adapter_share: str | None = setting(None, "openai engine: a folder the servers read too (NFS, a volume, a "
                                              "mounted bucket): adapters are copied there and the servers load them "
                                              "from it; LOCAL=SERVER_PATH where the servers mount it elsewhere "
                                              "(unset: sent to `tandem serve` servers, else loaded by their path "
                                              "here)")
    dtype: str = setting("auto", "weights dtype; auto times bf16 against fp32 on the model's matmul shape and takes bf16 "
                                         "where it is clearly (1.5x) faster; a resumed run keeps the dtype it recorded",
                         choices=("auto", "bfloat16", "float32", "float16"))
    device: str = setting("auto", "torch device for inference and training: auto (the first CUDA GPU where there is "
                                  "one, else the CPU), cpu, cuda, cuda:1, ...")
    max_batch: int = setting(32, "most requests in one batched generation", ge=1)
    cache: bool = setting(True, "read and write the on-disk LM call cache")
    max_model_len: int = setting(4096, "vllm engine: longest prompt plus reply, in tokens", ge=128)
    kv_cache_fraction: float | None = setting(None, "vllm engine: share of GPU memory (of RAM on its CPU build) it "
                                                    "takes; default 0.85 on a GPU, 0.25 on a CPU", gt=0, lt=1)
    tensor_parallel_size: int = setting(1, "vllm engine: GPUs each model is split across", ge=1)
    eager: bool = setting(True, "vllm engine: no torch.compile or CUDA graphs (starts in seconds; turn off for long "
                                "GPU runs)")
    concurrency: int = setting(32, "openai engine: requests in flight at once", ge=1)
    request_timeout: float = setting(600.0, "openai engine: seconds one reply may take; the client then asks again, 4 "
                                            "times in all, before the request counts as unanswered (a server that "
                                            "leaves 3 in a row unanswered is taken out): lower it to find a hung "
                                            "server sooner, raise it for long replies on a loaded one", gt=0)
    served_model_name: str | None = setting(None, "openai engine: the name the server serves the model under (vLLM's "
                                                  "--served-model-name); --model then names its weights, which weight "
                                                  "steps train and whose tokenizer prices replies (unset: --model "
                                                  "names both)")


TRACKERS = ("none", "mlflow")


@dataclass(frozen=True)
class TrackingSettings(Settings):
    """Where a run is reported besides its folder. Never part of a run's configuration: tracking changes
    no result, so a run started without it may be resumed with it, and the other way round."""

    track: str = setting("none", "report the run to an experiment tracker: mlflow (needs pip install "
                                 "'tandem[mlflow]'; the store: $MLFLOW_TRACKING_URI, else <run-dir>/mlflow/)",
                         choices=TRACKERS)
    track_experiment: str | None = setting(None, "the MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else "
                                                 "tandem-<task>)")
    track_traces: str = setting("10", "traces per evaluation: the first N examples of each split scored (the same at "
                                      "every step), or all")
    track_adapters: bool = setting(False, "also upload each weight step's adapter (off: its path is recorded)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.track_traces != "all" and not (self.track_traces.isdigit()):
            raise ConfigError("track_traces", f"must be a number >= 0 or all, got {self.track_traces!r}")


@dataclass(frozen=True)
class LoraSettings(Settings):
    """LoRA hyperparameters. The defaults suit ~0.1-1B models with a few hundred examples."""

    rank: int = setting(16, "LoRA rank", ge=1)
    alpha: int = setting(32, "LoRA alpha (scale = alpha / rank)", ge=1)
    dropout: float = setting(0.0, "LoRA dropout", ge=0, lt=1)
    learning_rate: float = setting(3e-4, "peak learning rate", gt=0, lt=1)
    epochs: int = setting(3, "passes over the training calls", ge=1)
    batch_size: int = setting(8, "sequences per optimizer step (fewer when the data is smaller than two batches)", ge=1)
    micro_batch_size: int | None = setting(None, "sequences per forward pass (padded to the longest); default by "
                                                 "device: 1 on a CPU, 8 on a GPU", ge=1)
    max_length: int = setting(2048, "longest training sequence in tokens; longer calls are dropped and counted", ge=32)
    warmup_ratio: float = setting(0.1, "share of optimizer steps spent warming the learning rate up", ge=0, lt=1)
    min_lr_ratio: float = setting(0.1, "the learning rate decays to this share of its peak at the last step", gt=0, lt=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    min_steps: int = setting(10, "fewest optimizer steps a weight step makes: small data is repeated (more epochs) "
                                 "until it reaches them; the report says how many it made", ge=1)
    untaught_kl: float = setting(0.0, "weight of a KL term holding the reply tokens the loss leaves untaught (a chain of "
                                      "thought's reasoning under --reasoning answer) to the base model's distribution "
                                      "(the adapter switched off), so teaching the answer does not rewrite the "
                                      "reasoning (the loss reported includes it); 0: none", ge=0)
    checkpoint_every: int = setting(0, "optimizer steps between the checkpoints a weight step scores on val (the last "
                                       "step always is one); 0: one at the end of every epoch", ge=0)
    stratify: bool = setting(True, "where the training calls' answers are choices, order them so that every optimizer "
                                   "step holds the classes in their shares of the data (off: random order, calls of "
                                   "similar length together)")
    target_modules: str | tuple[str, ...] = setting("all-linear", "modules that get LoRA weights", cli=False)
    seed: int = setting(0, "initialisation and shuffling seed (set per step by the optimizer)", cli=False)


@dataclass(frozen=True)
class PromptSettings(Settings):
    """Π: BootstrapFewShot with random search."""

    max_bootstrapped_demos: int = setting(3, "most bootstrapped demos per module", ge=0)
    max_labeled_demos: int = setting(3, "most labeled demos per module", ge=0)
    num_candidates: int = setting(6, "shuffled bootstrap candidates, besides zero-shot, labeled-only and unshuffled", ge=0)
    metric_threshold: float = setting(1.0, "a teacher run gives demos when its metric is at least this")


@dataclass(frozen=True)
class ExtendedWeightSettings(Settings):
    """Θ+ (`w+` in a strategy): the weight step with more to learn from than the paper's passing runs."""

    samples: int = setting(4, "w+ steps: sampled runs per training example; every distinct passing one is "
                              "kept (rejection sampling)", ge=0)
    sample_temperature: float = setting(0.7, "w+ steps: temperature of those sampled runs", gt=0)
    rationalize: bool = setting(True, "w+ steps: an example with no passing run gets one run with its final answers "
                                      "(the gold outputs the metric reads) as a hint; kept, without the hint, if it "
                                      "passes and no reply talks about the hint (STaR)")
    balance: bool = setting(True, "w+ steps: where the answer is a choice field, no class (a canonical choice) keeps "
                                  "more than twice the runs of the smallest class that has any; earlier sources first")


REASONING_MODES = ("answer", "consistent", "all")


@dataclass(frozen=True)
class WeightSettings(Settings):
    """Θ: BootstrapFinetune."""

    lora: LoraSettings = setting(LoraSettings(), "LoRA hyperparameters")
    extended: ExtendedWeightSettings = setting(ExtendedWeightSettings(), "what a `w+` step adds")
    with_demos: bool = setting(False, "train and run with the program's demos (the paper: without)")
    train_curve: int = setting(20, "training examples a weight step also scores at every checkpoint, for its "
                                   "learning curve (train beside val in the report; never used to choose); 0: none",
                               ge=0)
    min_calls: int = setting(8, "fewest training calls a weight step trains on; with fewer, one class only, or reasoning "
                                "against every answer it says so in one line and returns its program unchanged (1: "
                                "trains on whatever it gathered)", ge=1)
    reasoning: str = setting("answer", "what a weight step teaches of a chain-of-thought reply: answer, the answer "
                                       "only (the reasoning stays in each training call as the context the model "
                                       "read, untaught, so reasoning that argues for another class teaches "
                                       "nothing wrong); consistent, the whole reply, leaving out calls whose "
                                       "reasoning names another choice and never the one answered; all, the whole "
                                       "reply of every call (the paper)", choices=REASONING_MODES)
    launcher: str | None = setting(None, "train in processes of their own, one per GPU, under this launcher: "
                                         "'torchrun --nproc-per-node 4' or 'accelerate launch --num_processes 4' "
                                         "(data parallel); default: in this process")
    metric_threshold: float = setting(1.0, "a run gives training calls when its metric is at least this")
    keep_checkpoint: str = setting("best", "which program a weight step (w, w+, r) returns: best, the best on val of "
                                           "its checkpoints (w, w+: see --checkpoint-every; r: its rounds) and the "
                                           "program it started from, so a step never returns a program worse on "
                                           "val than its start; last, its last checkpoint, as the paper did",
                                   choices=("best", "last"))


@dataclass(frozen=True)
class PolicySettings(Settings):
    """R (`r` in a strategy): group-relative policy optimization over whole program runs (mmGRPO).

    The adapter's shape (rank, alpha, target modules, max length) is the weight steps' LoRA settings."""

    rounds: int = setting(6, "r steps: rounds of sampling then updating", ge=1)
    round_examples: int = setting(8, "r steps: training examples per round (cycled through the training set)", ge=1)
    group_size: int = setting(4, "r steps: runs sampled per example; a group whose runs all score the same teaches "
                                 "nothing and is skipped", ge=2)
    rollout_temperature: float = setting(1.0, "r steps: sampling temperature of the runs", gt=0)
    policy_learning_rate: float = setting(1e-4, "r steps: AdamW learning rate (constant)", gt=0, lt=1)
    updates_per_round: int = setting(2, "r steps: optimizer steps per round; the round's calls are split among them, "
                                        "so later steps are off-policy and the clip bounds them", ge=1)
    clip_low: float = setting(0.2, "r steps: the probability ratio is clipped below at 1 - this", gt=0, lt=1)
    clip_high: float = setting(0.28, "r steps: ... and above at 1 + this (DAPO's clip-higher)", gt=0)
    kl_coef: float = setting(0.0, "r steps: weight of a KL penalty to the base model (the adapter switched off; "
                                  "no second model); 0: none, as in Dr. GRPO and DAPO", ge=0)
    scale_rewards: bool = setting(False, "r steps: divide advantages by the group's standard deviation (GRPO's "
                                         "original); off: reward minus the group mean (Dr. GRPO)")
    val_every: int = setting(1, "r steps: score val after every this many rounds (and after the last); the best "
                                "round by val is kept", ge=1)


@dataclass(frozen=True)
class ReflectionSettings(Settings):
    """G (`g` in a strategy): instruction evolution with GEPA, a reflection LM rewriting each module's
    instructions from its traces and the metric's feedback."""

    max_metric_calls: int = setting(400, "g steps: most program runs scored per step (GEPA's metric calls), the "
                                         "starting instructions' val score included; never exceeded", ge=1)
    reflection_minibatch_size: int = setting(3, "g steps: training examples the reflection LM reads per proposal; a "
                                                "proposal must beat its parent on them to be scored on val", ge=1)
    reflection_max_tokens: int = setting(512, "g steps: most tokens the reflection LM writes per proposal", ge=16)
    reflection_temperature: float = setting(1.0, "g steps: sampling temperature of the reflection LM", ge=0)


@dataclass(frozen=True)
class OptimizeSettings(Settings):
    """A BetterTogether run: the optimizers' settings, how calls are sampled, and the seed."""

    seed: int = setting(0, "seeds candidate shuffles and LoRA initialisation", ge=0)
    generation: GenerationSettings = setting(GenerationSettings(), "sampling")
    prompts: PromptSettings = setting(PromptSettings(), "prompt steps")
    weights: WeightSettings = setting(WeightSettings(), "weight steps")
    policy: PolicySettings = setting(PolicySettings(), "policy optimization steps (r)")
    reflection: ReflectionSettings = setting(ReflectionSettings(), "instruction evolution steps (g)")


@dataclass(frozen=True)
class DataSettings(Settings):
    """How many examples of each split the optimizers see."""

    train_size: int = setting(100, "training examples the optimizers learn from", ge=1)
    val_size: int = setting(100, "validation examples: they pick candidates and the best step", ge=1)
    test_size: int = setting(200, "test examples: reported, never used to choose", ge=1)


@dataclass(frozen=True)
class JobSettings(Settings):
    """Everything `tandem optimize` and `tandem experiment` resolve: data sizes and optimizer settings."""

    data: DataSettings = setting(DataSettings(), "data sizes")
    optimize: OptimizeSettings = setting(OptimizeSettings(), "optimizers")


# -- budgets -----------------------------------------------------------------------------------

# Named presets of the same settings the command line sets (by flag name); any flag still wins.
# tiny: minutes on a 2-core CPU with a 135M model; small: an hour or so; paper: the paper's settings
# (prompt optimization on 100 train / 250 val, Iris 15 / 35; LoRA rank 32, alpha 64, 5 epochs; free decoding).
# Their LoRA is a small model's: a 135M model on 50 gold Iris calls sat at chance for ~50 optimizer steps of 6
# at lr 3e-3 and scale alpha/rank 2 (steps stratified by class), then learned (val 88% at step 96); at scale 8
# and lr 2e-3 it left chance at step ~25 (val 90% at step 48, 98% at 96); at 3e-4 in 32 steps, or 1e-2, it never
# did (docs/RESULTS.md). A 7B model wants a lower rate and scale (--learning-rate 2e-4 --alpha 32).
# small holds a chain of thought's untaught reasoning to the base model (untaught_kl): without it the answer-only
# checkpoints wrote 'Reasoning: setosa' and failed every val run; with it none failed, at about twice the time.
BUDGETS: dict[str, dict[str, Any]] = {
    "tiny": dict(train_size=15, val_size=20, test_size=50, num_candidates=2, max_bootstrapped_demos=3,
                 max_labeled_demos=3, epochs=2, learning_rate=2e-3, batch_size=6, rank=16, alpha=128, max_new_tokens=96,
                 rounds=4, round_examples=6, group_size=8, policy_learning_rate=5e-4, val_every=2,
                 max_metric_calls=46, reflection_max_tokens=128, checkpoint_every=4),
    "small": dict(train_size=50, val_size=50, test_size=100, num_candidates=4, max_bootstrapped_demos=3,
                  max_labeled_demos=3, epochs=3, learning_rate=2e-3, batch_size=6, min_steps=96, warmup_ratio=0.05,
                  checkpoint_every=12, rank=16, alpha=128, untaught_kl=1.0, max_new_tokens=256,
                  rounds=8, round_examples=8, group_size=8, policy_learning_rate=2e-4, val_every=2,
                  max_metric_calls=250, reflection_max_tokens=512),
    "paper": dict(train_size=100, val_size=250, test_size=1500, num_candidates=6, max_bootstrapped_demos=3,
                  max_labeled_demos=3, epochs=5, learning_rate=1e-4, rank=32, alpha=64, max_new_tokens=1024,
                  constrained=False, rounds=20, round_examples=16, group_size=8, policy_learning_rate=5e-5,
                  max_metric_calls=2000, reflection_max_tokens=1024, keep_checkpoint="last",
                  reasoning="all", stratify=False),
}
PAPER_IRIS = {"train_size": 15, "val_size": 35}


def resolve_budget(name: str | None, task: str, overrides: Mapping[str, Any] | None = None) -> JobSettings:
    """The dataclass defaults, then the named budget's values, then `overrides` (flag names)."""
    if name is not None and name not in BUDGETS:
        raise UsageError(f"unknown budget '{name}': choose one of {', '.join(BUDGETS)}")
    preset = dict(BUDGETS[name]) if name else {}
    if name == "paper" and task == "iris":
        preset.update(PAPER_IRIS)
    return with_overrides(JobSettings(), {**preset, **{k: v for k, v in (overrides or {}).items() if v is not None}})


# -- plain data in and out ------------------------------------------------------------------------


def to_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Rebuild settings from `to_dict` output; an unknown or ill-typed key is a ConfigError naming it."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}", f"is not a setting of {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{name}", f"must be a mapping, got {value!r}")
            value = from_dict(kind, value, f"{where}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, type) of every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, hints[f.name]


def flag_names(cls: type) -> dict[tuple[str, ...], str]:
    """Path -> flag name (without dashes): the field name, or parent_name where two leaves share it."""
    paths = [path for path, f, _ in leaves(cls) if f.metadata.get("cli", True)]
    counts: dict[str, int] = {}
    for path in paths:
        counts[path[-1]] = counts.get(path[-1], 0) + 1
    names = {path: (path[-1] if counts[path[-1]] == 1 else "_".join(path[-2:])) for path in paths}
    if len(set(names.values())) != len(names):
        raise TypeError(f"settings of {cls.__name__} have clashing flag names")
    return names


def replace_path(settings: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(settings, **{path[0]: value})
    inner = getattr(settings, path[0])
    return dataclasses.replace(settings, **{path[0]: replace_path(inner, path[1:], value)})


def with_overrides(settings: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy with fields replaced by flag name (`learning_rate`) or dotted path (`optimize.seed`)."""
    names = {name: path for path, name in flag_names(type(settings)).items()}
    names.update({".".join(path): path for path, _, _ in leaves(type(settings))})
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(key, f"is not a setting (known: {', '.join(sorted(n for n in names if '.' not in n))})")
        settings = replace_path(settings, names[key], value)
    return settings


def get_path(settings: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        settings = getattr(settings, name)
    return settings


# -- the command line ---------------------------------------------------------------------------


def _plain(kind: Any) -> Any:
    """`str | None` -> str: the type a flag's value is read as."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args and type(None) in typing.get_args(kind) else kind


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """One flag per field of `cls` (nested included), help and default from the field.

    Every flag defaults to None ("not given"), so presets can sit between the dataclass defaults
    and what the user typed; `overrides_from_args` collects what was typed.
    """
    group = parser.add_argument_group(title) if title else parser
    defaults, names = cls(), flag_names(cls)
    for path, f, kind in leaves(cls):
        if not f.metadata.get("cli", True):
            continue
        name, kind = names[path], _plain(kind)
        default = get_path(defaults, path)
        text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            group.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        elif f.metadata.get("repeat"):
            group.add_argument(f"--{name.replace('_', '-')}", dest=name, action="append", default=None, help=text,
                               metavar="TEXT")
        else:
            choices = f.metadata.get("choices")
            group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, choices=choices,
                               help=text, metavar=None if choices else {int: "N", float: "X"}.get(kind, "TEXT"))


def overrides_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The flags of `cls` that were given on the command line, by flag name (a repeated flag's values as a tuple)."""
    given = {name: getattr(args, name) for name in flag_names(cls).values() if getattr(args, name, None) is not None}
    return {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()}


def flag_of(cls: type, field_name: str) -> str:
    """`--flag` for a field name reported by ConfigError, if `cls` has a flag for it."""
    for path, name in flag_names(cls).items():
        if path[-1] == field_name or ".".join(path) == field_name:
            return "--" + name.replace("_", "-")
    return field_name


__all__ = [
    "setting", "validate", "GenerationSettings", "EngineSettings", "LoraSettings", "PromptSettings", "WeightSettings",
    "ExtendedWeightSettings", "PolicySettings", "ReflectionSettings", "TrackingSettings", "TRACKERS",
    "OptimizeSettings", "DataSettings", "JobSettings", "to_dict", "from_dict", "with_overrides", "add_arguments",
    "overrides_from_args", "flag_names", "BUDGETS", "resolve_budget",
]
