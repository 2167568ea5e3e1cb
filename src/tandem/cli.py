"""The `tandem` command line: thin wrappers over the library, one subcommand each."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from .lm.models import ModelNotFoundError, cache_root
from .tasks import LOADERS, DataNotFoundError, load_task

log = logging.getLogger("tandem")


def _add_common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--task", required=True, help=f"one of: {', '.join(sorted(LOADERS))}")
    p.add_argument(
        "--model",
        required=model_required,
        help="alias 'smollm2-135m' (embedded), a local model folder, a .gguf file, or a Hugging Face id",
    )
    p.add_argument("--data-dir", help="folder holding gsm8k/ and hotpotqa/ (default: $TANDEM_DATA_DIR or ../shared/data)")
    p.add_argument("--program", help="a program state JSON (instructions, demos, adapter) to load")


def _add_engine(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"], help="weights dtype; auto times bf16 against fp32 on this machine and takes the faster")
    g.add_argument("--batch-size", type=int, default=32, help="most requests per batched generate call")
    g.add_argument("--threads", type=int, default=32, help="program executions run concurrently (feeds the batcher)")
    g.add_argument("--max-new-tokens", type=int, default=384, help="cap on tokens generated per module call")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk LM call cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Optimize LM programs' prompts and weights in tandem.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="evaluate a program on a task split")
    _add_common(p)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, help="evaluate only the first N examples of the split")
    p.add_argument("--max-errors", type=int, help="stop once more than N examples have failed (default: never)")
    p.add_argument("--output", help="write per-example results (prediction, score, error, trace) as JSONL here")
    _add_engine(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("show-prompt", help="print the exact messages every module sends for one example")
    _add_common(p, model_required=False)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--index", type=int, default=0, help="which example of the split")
    _add_engine(p)
    p.set_defaults(func=cmd_show_prompt)

    p = sub.add_parser("optimize", help="run a BetterTogether strategy and keep the best step")
    _add_common(p)
    p.add_argument("--strategy", default="p -> w -> p", help="p (prompts) and w (weights) steps joined by '->'")
    p.add_argument("--run-dir", required=True, help="folder for config, step programs, adapters, scores; rerun to resume")
    p.add_argument("--seed", type=int, default=0, help="seeds candidate shuffles and LoRA init")
    g = p.add_argument_group("data")
    g.add_argument("--train-size", type=int, default=100, help="training examples used by the optimizers")
    g.add_argument("--val-size", type=int, default=100, help="validation examples: pick candidates and the best step")
    g.add_argument("--test-size", type=int, default=200, help="test examples: reported, never used to choose")
    g = p.add_argument_group("prompt steps (Π)")
    g.add_argument("--candidates", type=int, default=6, help="shuffled bootstrap candidates besides the named three")
    g.add_argument("--max-bootstrapped", type=int, default=3, help="most bootstrapped demos per module")
    g.add_argument("--max-labeled", type=int, default=3, help="most labeled demos per module")
    g = p.add_argument_group("weight steps (Θ)")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--lr", type=float, default=3e-4, help="LoRA learning rate")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank")
    g.add_argument("--alpha", type=int, default=32, help="LoRA alpha")
    g.add_argument("--with-demos", action="store_true", help="train and run with the program's demos (paper: without)")
    _add_engine(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("experiment", help="the paper's grid: strategies x seeds, with a report and charts")
    _add_common(p)
    p.add_argument("--strategies", default="all", help="'all' or a comma list: vanilla, p, w, p -> w, w -> p, ...")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; cells report mean ± std")
    p.add_argument("--run-dir", required=True, help="grid folder (seed-N/ holds each seed's shared steps); rerun to resume")
    p.add_argument("--budget", default="tiny", choices=["tiny", "small", "paper"], help="preset for every size below")
    g = p.add_argument_group("budget overrides (default: from --budget)")
    for name, kind in [("train-size", int), ("val-size", int), ("test-size", int), ("candidates", int),
                       ("max-bootstrapped", int), ("max-labeled", int), ("epochs", int), ("learning-rate", float),
                       ("rank", int)]:
        g.add_argument(f"--{name}", type=kind)
    _add_engine(p)
    p.set_defaults(func=cmd_experiment, max_new_tokens=None)

    p = sub.add_parser("report", help="rebuild report.md, CSV/JSON and charts of an experiment folder")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    return parser


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _program(task, args):
    program = task.make_program()
    return program.load(args.program) if args.program else program


def _lm(args):
    from .lm import load_lm

    cache = None if args.no_cache else str(cache_root() / "calls.sqlite")
    return load_lm(args.model, cache=cache, dtype=args.dtype, max_batch=args.batch_size)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    _check_positive(args, "limit", "batch_size", "threads", "max_new_tokens")
    task = load_task(args.task, args.data_dir)
    program = _program(task, args)
    examples = task.split(args.split)[: args.limit]
    lm = _lm(args)
    result = evaluate(
        program, lm, examples, task.metric, threads=args.threads, max_errors=args.max_errors,
        desc=f"{args.task}/{args.split}", temperature=args.temperature, max_new_tokens=args.max_new_tokens,
    )
    print(f"{args.task} {args.split}: {result.summary()}")
    for name, m in task.report_metrics.items():
        value = result.mean(m)
        print(f"  {name}: {'-' if value is None else f'{value:.1f}%'}")
    u = result.usage
    gen = u.get("engine_completion_tokens", u.get("completion_tokens", 0))
    hits = u.get("cache_hits", 0)
    print(f"LM calls: {int(u.get('requests', 0))} ({int(hits)} from cache), generated {int(gen)} new tokens, "
          f"{gen / result.seconds:.1f} tok/s")
    if args.output:
        from .program import trace_as_dict

        with open(args.output, "w", encoding="utf-8") as f:
            for r in result.results:
                row = {"example": dict(r.example), "prediction": r.prediction, "score": r.score, "error": r.error,
                       "trace": [trace_as_dict(t) for t in r.trace]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"per-example results: {args.output}")
    return 0


def cmd_show_prompt(args: argparse.Namespace) -> int:
    from .lm import ScriptedLM
    from .program import Run
    from .prompts import placeholder_reply

    task = load_task(args.task, args.data_dir)
    program = _program(task, args)
    examples = task.split(args.split)
    if not 0 <= args.index < len(examples):
        raise ValueError(f"--index must be in [0, {len(examples) - 1}] for the {args.split} split")
    if args.model:
        lm = _lm(args)
    else:
        # No model: every module answers with placeholders so the whole pipeline's prompts show.
        lm = ScriptedLM(lambda request: placeholder_reply(request.messages), name="placeholder")
    run: Run = program.execute(lm, examples[args.index].inputs(), temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    for entry in run.trace:
        print(f"===== module: {entry.module} =====")
        for m in entry.messages:
            print(f"--- {m['role']} ---\n{m['content']}")
        if args.model:
            print(f"--- reply ---\n{entry.reply}")
    if run.error:
        print(f"(the program failed here: {run.error})")
    return 0


def optimize_settings(args: argparse.Namespace):
    from .lm.training import LoraSettings
    from .optimizers import OptimizeSettings, PromptSettings, WeightSettings

    return OptimizeSettings(
        prompts=PromptSettings(args.max_bootstrapped, args.max_labeled, args.candidates),
        weights=WeightSettings(LoraSettings(rank=args.rank, alpha=args.alpha, learning_rate=args.lr, epochs=args.epochs),
                               with_demos=args.with_demos),
        seed=args.seed, temperature=args.temperature, max_new_tokens=args.max_new_tokens, threads=args.threads,
    )


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested settings as dotted names, so a refused change names the field: `resolved.epochs`."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_run_config(run_dir: Path, config: dict) -> None:
    """A run folder holds one configuration; strategies and seeds may change (each has its own folders), nothing else."""
    path = run_dir / "config.json"
    if path.exists():
        old, new = _flat(json.loads(path.read_text(encoding="utf-8"))), _flat(config)
        changed = sorted(k for k in set(old) | set(new) if k not in ("strategy", "seeds") and old.get(k) != new.get(k))
        if changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise ValueError(f"{run_dir} holds a run with another configuration ({detail}); use another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def cmd_optimize(args: argparse.Namespace) -> int:
    from .optimizers import better_together, parse_strategy
    from .optimizers.better_together import pretty

    _check_positive(args, "train_size", "val_size", "test_size", "batch_size", "threads", "max_new_tokens", "epochs")
    steps = parse_strategy(args.strategy)
    settings = optimize_settings(args)
    task = load_task(args.task, args.data_dir)
    train, val, test = task.train[: args.train_size], task.val[: args.val_size], task.test[: args.test_size]
    run_dir = Path(args.run_dir)
    config = {"task": args.task, "model": args.model, "strategy": pretty(steps), "program": args.program,
              "sizes": {"train": len(train), "val": len(val), "test": len(test)}, "dtype": args.dtype,
              "settings": settings.to_dict()}
    check_run_config(run_dir, config)
    lm = _lm(args)
    result = better_together(_program(task, args), lm, steps, train, val, test, task.metric, settings, run_dir=run_dir,
                             report_metrics=task.report_metrics)
    print(f"{args.task} on {args.model}, strategy {pretty(steps)} ({len(train)} train / {len(val)} val / {len(test)} test)")
    print(result.table())
    print(f"best program: {run_dir / result.best / 'program.json'}; all results: {run_dir / 'results.json'}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import parse_strategies, resolve_budget, run_grid, table, write_report

    _check_positive(args, "seeds", "batch_size", "threads")
    strategies = parse_strategies(args.strategies)
    overrides = {k: getattr(args, k) for k in ("train_size", "val_size", "test_size", "candidates", "max_bootstrapped",
                                                "max_labeled", "epochs", "learning_rate", "rank", "max_new_tokens")}
    budget = resolve_budget(args.budget, args.task, **overrides)
    args.max_new_tokens = budget.max_new_tokens
    task = load_task(args.task, args.data_dir)
    run_dir = Path(args.run_dir)
    config = {"task": args.task, "model": args.model, "strategy": list(strategies), "seeds": args.seeds,
              "budget": args.budget, "resolved": asdict(budget), "program": args.program, "dtype": args.dtype,
              "temperature": args.temperature}
    check_run_config(run_dir, config)
    lm = _lm(args)
    run_grid(task, _program(task, args), lm, strategies, range(args.seeds), budget, run_dir, threads=args.threads)
    report = write_report(run_dir)
    print(f"{args.task} on {args.model}, budget {args.budget}, {args.seeds} seed(s): test accuracy")
    print(table(run_dir))
    print(f"report: {report}; chart: {run_dir / (args.task + '.png')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .experiments import table, write_report

    report = write_report(Path(args.run_dir))
    print(table(args.run_dir))
    print(f"report: {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("tandem").setLevel(logging.DEBUG if args.verbose else logging.INFO)  # steps, candidates, resumes
    if getattr(args, "task", None) is not None and args.task not in LOADERS:
        parser.error(f"unknown task '{args.task}': choose one of {', '.join(sorted(LOADERS))}")
    try:
        return args.func(args)
    except (ModelNotFoundError, DataNotFoundError, FileNotFoundError, ValueError) as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
