"""The `tandem` command line: thin wrappers over the library, one subcommand each."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, TandemError, UsageError
from .kinds import KINDS, parse_strategy, prefix_name, pretty, results_path
from .evaluate import evaluate
from .lm import honest_generation, load_lm
from .lm.models import cache_root
from .settings import (
    BUDGETS, ENGINES, DataSettings, EngineSettings, GenerationSettings, JobSettings, OptimizeSettings, TrackingSettings,
    add_arguments, flag_of, overrides_from_args, resolve_budget, to_dict, with_overrides,
)
from .program import Run, trace_as_dict
from .prompts import placeholder_reply, reply_format
from .rundir import describe_lm, read_settings, recorded_lm, refuse_changes
from .scripted import ScriptedLM
from .tasks import LOADERS, data_task, load_task
from .tasks.custom import PROGRAMS
from .tasks.metrics import COMPARISONS
from .tracking import open_tracker, track_eval

log = logging.getLogger("tandem")


def _add_common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--task", help=f"a built-in task ({', '.join(sorted(LOADERS))}), or your own: "
                                  "path/to/file.py:NAME or package.module:NAME (a Task or a function returning one)")
    p.add_argument(
        "--model",
        required=model_required,
        help="alias 'smollm2-135m' (embedded), a local model folder, a .gguf file, or a Hugging Face id",
    )
    p.add_argument("--data-dir", help="folder holding gsm8k/ and hotpotqa/ (default: $TANDEM_DATA_DIR or ../shared/data)")
    p.add_argument("--state", help="a program state JSON (instructions, demos, adapter) to start from")
    g = p.add_argument_group("a task from data files (instead of --task)")
    g.add_argument("--data", metavar="FILE", help="training rows, JSON Lines or CSV; val and test are carved from it "
                                                 "(a quarter each, fixed seed) unless --val/--test give them")
    g.add_argument("--val", metavar="FILE", help="validation rows")
    g.add_argument("--test", metavar="FILE", help="test rows")
    g.add_argument("--signature", help="the fields, e.g. 'review -> sentiment' or 'question, context -> answer'")
    g.add_argument("--instructions", default="", help="what the module is asked to do")
    g.add_argument("--metric", default="exact", choices=sorted(COMPARISONS),
                   help="how each output field is compared with the row's (normalized exact match, gold contained in "
                        "the reply, token F1, same number; default: exact)")
    g.add_argument("--program", default="cot", choices=PROGRAMS,
                   help="one module: cot (reasoning, then the outputs) or predict (the outputs only; default: cot)")


def _task(args: argparse.Namespace):
    """--task (built-in or your own code) or --data with a signature: one Task either way."""
    if args.data:
        if args.task:
            raise UsageError("give --task or --data, not both")
        if not args.signature:
            raise UsageError("--data needs --signature, e.g. --signature 'text -> label'")
        return data_task(args.data, args.signature, val=args.val, test=args.test, instructions=args.instructions,
                         metric=args.metric, program=args.program)
    if not args.task:
        raise UsageError("name a task: --task iris (or gsm8k, hotpotqa, path/to/file.py:NAME), or --data FILE")
    for flag in ("val", "test", "signature"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} goes with --data, not --task")
    return load_task(args.task, args.data_dir)


def _add_job(p: argparse.ArgumentParser, budget_default: str | None) -> None:
    """The flags of `optimize` and `experiment`: the same settings under the same names."""
    p.add_argument("--run-dir", required=True, help="folder for config, step programs, adapters, scores; rerun to resume")
    p.add_argument("--budget", default=budget_default, choices=sorted(BUDGETS),
                   help="a named preset of the settings below (sizes, candidates, demos, LoRA, tokens); "
                        f"flags still override it (default: {budget_default or 'none: the defaults shown'})")
    add_arguments(p, DataSettings, "data")
    add_arguments(p, OptimizeSettings, "optimizers (Π: prompts, Θ: weights, and sampling)")
    add_arguments(p, EngineSettings, "engine")
    add_arguments(p, TrackingSettings, "experiment tracking (never part of the run's configuration)")
    g = p.add_argument_group("the reflection LM of g steps (default: the task's own LM)")
    g.add_argument("--reflection-model", metavar="MODEL", help="the model that reads traces and writes instructions: "
                   "an alias, a folder, a .gguf file or a hub id (default: --model)")
    g.add_argument("--reflection-engine", choices=ENGINES, help="its engine (default: --engine)")
    g.add_argument("--reflection-base-url", metavar="URL", action="append",
                   help="its server, for --reflection-engine openai, once per server (default: --base-url)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Optimize LM programs' prompts and weights in tandem.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details; show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="evaluate a program on a task split")
    _add_common(p)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, help="evaluate only the first N examples of the split")
    p.add_argument("--max-errors", type=int, help="stop once more than N examples have failed (default: never)")
    p.add_argument("--output", help="write per-example results (prediction, score, error, trace) as JSONL here")
    add_arguments(p, GenerationSettings, "sampling")
    add_arguments(p, EngineSettings, "engine")
    add_arguments(p, TrackingSettings, "experiment tracking")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("show-prompt", help="print the exact messages every module sends for one example")
    _add_common(p, model_required=False)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--index", type=int, default=0, help="which example of the split")
    add_arguments(p, GenerationSettings, "sampling")
    add_arguments(p, EngineSettings, "engine")
    p.set_defaults(func=cmd_show_prompt)

    p = sub.add_parser("optimize", help="run a BetterTogether strategy and keep the best step")
    _add_common(p)
    p.add_argument("--strategy", default="p -> w -> p", help="steps joined by '->': p (demos), g (instructions, "
                   "GEPA), w (weights, the paper's), w+ (weights, extended), r (policy optimization)")
    _add_job(p, budget_default=None)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("experiment", help="the paper's grid: strategies x seeds, with a report and charts")
    _add_common(p)
    p.add_argument("--strategies", default="all", help="a comma list of groups ('all': the paper's rows, 'extended': "
                   "the Θ+ rows, 'policy': the R rows, 'reflect': the G rows), labels or strategies: vanilla, p, g, "
                   "w, p -> w, g -> w -> g, ...")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds, from --seed on; cells report mean ± std")
    _add_job(p, budget_default="tiny")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("export", help="a run's best (or chosen) step as a folder to ship: program, adapter, model card")
    p.add_argument("run_dir", help="a folder `tandem optimize` wrote")
    p.add_argument("--step", default="best", help="best (by val) or a step's prefix such as p-w (default: best)")
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--format", default="tandem", choices=("tandem", "dspy"),
                   help="tandem: for `tandem run` and load_program; dspy: program.json as DSPy's Program.load reads "
                        "it, for the DSPy program with the same modules (its README shows it), plus the adapter "
                        "(default: tandem)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="answer inputs with an exported program: one JSON object, or JSON Lines on stdin")
    p.add_argument("folder", help="a folder `tandem export` wrote")
    p.add_argument("input", nargs="?", help="one input as a JSON object; without it, JSON Lines are read from stdin")
    p.add_argument("--model", required=True, help="the base model the program was optimized on")
    p.add_argument("--data-dir", help="data folder, for built-in tasks whose program needs it (HotPotQA's corpus)")
    add_arguments(p, GenerationSettings, "sampling")
    add_arguments(p, EngineSettings, "engine")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild report.md, CSV/JSON and charts of an experiment folder")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", allow_abbrev=False, help="vLLM's OpenAI-compatible server as tandem's weight steps "
                       "need it, on a node that shares no files with the optimizer; any other flag goes to vLLM",
                       usage="tandem serve --model WEIGHTS [--rank N] [--adapter-dir DIR] [vLLM's server flags]")
    p.add_argument("--model", required=True, help="the weights to serve: an alias, a folder or a hub id (the "
                   "optimizer's --model names the same)")
    p.add_argument("--rank", type=int, default=16, help="the largest LoRA rank adapters will have: sets vLLM's "
                   "--max-lora-rank unless given (default: 16, tandem's)")
    p.add_argument("--adapter-dir", help="where adapters sent to this server are kept (default: a new temporary "
                   "folder)")
    p.add_argument("--max-adapter-mb", type=int, help="the largest adapter upload it takes, in MiB; larger ones "
                   "are answered 413 (default: 2048; a rank-64 LoRA on every linear layer of a 7B model is ~650 MB "
                   "in fp32)")
    p.set_defaults(func=cmd_serve)
    return parser


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _settings(cls: type, args: argparse.Namespace):
    return with_overrides(cls(), overrides_from_args(cls, args))


def _program(task, args):
    program = task.make_program()
    return program.load(args.state) if args.state else program


def _lm(args, engine: EngineSettings, lora_rank: int = 16, model: str | None = None):

    cache = str(cache_root() / "calls.sqlite") if engine.cache else None
    options = {k: v for k, v in to_dict(engine).items() if k != "cache"}
    return load_lm(model or args.model, cache=cache, lora_rank=lora_rank, **options)


def _reflection_lm(args, engine: EngineSettings, reflects: bool):
    """The LM g steps reflect with, loaded only where a step reflects: --reflection-model on
    --reflection-engine at --reflection-base-url, each defaulting to the task's; None (no flag): the
    task's own LM, not loaded twice."""
    given = [name for name in ("reflection_model", "reflection_engine", "reflection_base_url") if getattr(args, name)]
    if not given:
        return None
    if not reflects:
        log.warning("--%s is not used: no step of the strategy reflects (g)", given[0].replace("_", "-"))
        return None
    kind = args.reflection_engine or engine.engine
    # --served-model-name is the task model's name on its server: another model or server has its own.
    same_server = kind == "openai" and args.reflection_model is None and args.reflection_base_url is None
    urls = tuple(args.reflection_base_url) if args.reflection_base_url else engine.base_url
    settings = with_overrides(engine, {"engine": kind, "base_url": urls,
                                       "served_model_name": engine.served_model_name if same_server else None})
    if settings.engine == "openai" and not settings.base_url:
        raise UsageError("--reflection-engine openai needs --reflection-base-url, e.g. http://127.0.0.1:8000/v1")
    return _lm(args, settings, model=args.reflection_model)



def _decoding(generation: GenerationSettings) -> str:
    return "constrained" if generation.constrained else "free"


def cmd_eval(args: argparse.Namespace) -> int:
    _check_positive(args, "limit")
    generation, engine = _settings(GenerationSettings, args), _settings(EngineSettings, args)
    task = _task(args)
    tracker = open_tracker(_settings(TrackingSettings, args), None, f"tandem-{task.name}")
    program = _program(task, args)
    examples = task.split(args.split)[: args.limit]
    lm = _lm(args, engine)
    generation = honest_generation(lm, generation)
    with tracker.child("eval", f"eval {task.name} {args.split}", {"tandem.split": args.split}) as run:
        result = evaluate(program, lm, examples, task.metric, generation, max_errors=args.max_errors,
                          desc=f"{task.name}/{args.split}")
        also = {name: result.mean(m) for name, m in task.report_metrics.items()}
        track_eval(run, result, args.split, also, {
            "task": task.name, "task_source": task.source, "model": args.model, "lm": describe_lm(lm),
            "split": args.split, "limit": args.limit, "state": args.state, "generation": to_dict(generation)})
    print(f"{task.name} {args.split} ({_decoding(generation)}): {result.summary()}")
    for name, value in also.items():
        print(f"  {name}: {'-' if value is None else f'{value:.1f}%'}")
    u = result.usage
    gen = u.get("engine_completion_tokens", u.get("completion_tokens", 0))
    hits = u.get("cache_hits", 0)
    print(f"LM calls: {int(u.get('requests', 0))} ({int(hits)} from cache), generated {int(gen)} new tokens, "
          f"{gen / result.seconds:.1f} tok/s")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for r in result.results:
                row = {"example": dict(r.example), "prediction": r.prediction, "score": r.score, "error": r.error,
                       "failure": r.failure, "trace": [trace_as_dict(t) for t in r.trace]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"per-example results: {args.output}")
    return 0


def cmd_show_prompt(args: argparse.Namespace) -> int:
    task = _task(args)
    program = _program(task, args)
    examples = task.split(args.split)
    if not 0 <= args.index < len(examples):
        raise UsageError(f"--index must be in [0, {len(examples) - 1}] for the {args.split} split")
    generation = _settings(GenerationSettings, args)
    if args.model:
        lm = _lm(args, _settings(EngineSettings, args))
    else:
        # No model: every module answers with placeholders so the whole pipeline's prompts show.
        lm = ScriptedLM(lambda request: placeholder_reply(request.messages, request.format), name="placeholder")
    run: Run = program.execute(lm, examples[args.index].inputs(), **generation.run_kwargs())
    predictors = dict(program.named_predictors())
    for entry in run.trace:
        print(f"===== module: {entry.module} =====")
        for m in entry.messages:
            print(f"--- {m['role']} ---\n{m['content']}")
        if generation.constrained:
            grammar = reply_format(predictors[entry.module].signature).grammar()
            print(f"--- reply grammar (constrained decoding; --no-constrained turns it off) ---\n{grammar}")
        if args.model:
            print(f"--- reply ---\n{entry.reply}")
    if run.error:
        print(f"(the program failed here: {run.error})")
    return 0


def _job(args: argparse.Namespace) -> JobSettings:
    """Defaults, then the budget preset, then the flags given: the one way settings are resolved."""
    overrides = {**overrides_from_args(DataSettings, args), **overrides_from_args(OptimizeSettings, args)}
    return resolve_budget(args.budget, args.task, overrides)


# The optimizers, the grid and export import torch (training, engines): each command that runs them imports
# them itself, so `tandem --help`, show-prompt and a usage error answer without waiting for torch.


def cmd_optimize(args: argparse.Namespace) -> int:
    from .optimizers import better_together

    steps = parse_strategy(args.strategy)
    job, engine = _job(args), _settings(EngineSettings, args)
    task = _task(args)
    train, val, test = task.sized(job.data)
    run_dir = Path(args.run_dir)
    _check_folder(run_dir, args, job)
    tracker = open_tracker(_settings(TrackingSettings, args), run_dir, f"tandem-{task.name}")
    reflection_lm = _reflection_lm(args, engine, any(KINDS[s].reflects for s in steps))
    lm = _lm(args, _resumed(run_dir, engine), job.optimize.weights.lora.rank)
    _check_adapters(lm, run_dir, job, steps)
    job = replace(job, optimize=replace(job.optimize, generation=honest_generation(lm, job.optimize.generation)))
    name = f"{run_dir.name} {pretty(steps)}"
    with tracker.child(prefix_name(steps), name, {"tandem.strategy": pretty(steps)}) as run:
        result = better_together(_program(task, args), lm, steps, train, val, test, task.metric, job.optimize,
                                 run_dir=run_dir, report_metrics=task.report_metrics,
                                 config={"task": task.name, "task_source": task.source, "model": args.model,
                                         "budget": args.budget}, reflection_lm=reflection_lm, feedback=task.feedback,
                                 tracker=run)
    print(f"{task.name} on {args.model}, strategy {pretty(steps)} ({len(train)} train / {len(val)} val / {len(test)} test, "
          f"{_decoding(job.optimize.generation)} decoding)")
    print(result.table())
    print(f"best program: {run_dir / result.best / 'program.json'}; all results: {results_path(run_dir, steps)}; "
          f"report: {result.report}")
    return 0


def _check_adapters(lm, run_dir: Path, job: JobSettings, steps) -> None:
    """Where a step trains weights, servers that could not load its adapters are refused now, before the
    first step runs (and again before each training, by the training functions)."""
    check = getattr(lm, "check_adapters", None)
    if check is not None and any(KINDS[s].weights for s in steps):
        check(run_dir, job.optimize.weights.lora.rank)


def _check_folder(run_dir: Path, args: argparse.Namespace, job: JobSettings) -> None:
    """Refuse a folder made with other settings before the model loads (the library checks all of it again).
    Not for a server: whether it can constrain decoding, which the settings record, is known once it is
    asked, and asking costs nothing like loading a model."""
    if getattr(args, "engine", None) == "openai":
        return
    new = job.optimize if args.command == "optimize" else job
    old = read_settings(run_dir, type(new))
    if old is not None:
        refuse_changes(run_dir, {"settings": to_dict(old)}, {"settings": to_dict(new)})


def _resumed(run_dir: Path, engine: EngineSettings) -> EngineSettings:
    """`--dtype auto` resumes a folder in the dtype it recorded: a probe that decides otherwise
    today would make the run refuse its own folder. A dtype named on the command line is still checked."""
    dtype = recorded_lm(run_dir).get("dtype")
    if engine.dtype != "auto" or not dtype:
        return engine
    log.info("dtype auto: %s recorded %s; resuming in it (--dtype names another)", run_dir, dtype)
    return with_overrides(engine, {"dtype": dtype})


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import parse_strategies, run_grid, table, write_report

    _check_positive(args, "seeds")
    strategies = parse_strategies(args.strategies)
    job, engine = _job(args), _settings(EngineSettings, args)
    task = _task(args)
    run_dir = Path(args.run_dir)
    _check_folder(run_dir, args, job)
    tracker = open_tracker(_settings(TrackingSettings, args), run_dir, f"tandem-{task.name}")
    reflects = any(KINDS[s].reflects for strategy in strategies.values() if strategy for s in parse_strategy(strategy))
    reflection_lm = _reflection_lm(args, engine, reflects)
    lm = _lm(args, _resumed(run_dir, engine), job.optimize.weights.lora.rank)
    _check_adapters(lm, run_dir, job, [s for strategy in strategies.values() if strategy for s in parse_strategy(strategy)])
    seeds = range(job.optimize.seed, job.optimize.seed + args.seeds)
    with tracker.child("experiment", f"{run_dir.name} (experiment)") as grid:
        run_grid(task, _program(task, args), lm, strategies, seeds, job, run_dir,
                 config={"model": args.model, "budget": args.budget, "state": args.state, "task_source": task.source},
                 reflection_lm=reflection_lm, tracker=grid)
        report = write_report(run_dir)
        grid.artifacts([report, run_dir / "cells.csv", run_dir / "cells.json", *sorted(run_dir.glob("*.png"))])
    print(f"{task.name} on {args.model}, budget {args.budget}, {args.seeds} seed(s): test accuracy")
    print(table(run_dir))
    print(f"report: {report}; chart: {run_dir / (task.name + '.png')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    out = export(args.run_dir, args.out, args.step, args.format)
    print(f"exported {args.step} of {args.run_dir} to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One JSON object in, one prediction out; or JSON Lines on stdin, one result line each, in order.

    A line that is not a JSON object with the program's inputs, or whose run fails on what the model
    wrote, gets an error line and the stream goes on; an engine failure stops it (exit 1)."""
    from concurrent.futures import ThreadPoolExecutor

    from .export import load_program

    generation, engine = _settings(GenerationSettings, args), _settings(EngineSettings, args)
    program = load_program(args.folder, args.data_dir)
    needed = _input_names(program)

    def parse(line: str) -> dict:
        value = json.loads(line)
        if not isinstance(value, dict):
            raise ValueError(f"an input must be a JSON object, got {type(value).__name__}")
        return value

    if args.input is not None:
        try:
            lines = [(1, parse(args.input))]
        except ValueError as exc:
            raise UsageError(f"input: {exc}") from None
    else:
        lines = []
        for n, line in enumerate(sys.stdin, 1):
            if line.strip():
                try:
                    lines.append((n, parse(line)))
                except ValueError as exc:  # json.JSONDecodeError is a ValueError
                    lines.append((n, exc))
    lm = _lm(args, engine)
    generation = honest_generation(lm, generation)

    def answer(item) -> dict:
        n, inputs = item
        if isinstance(inputs, Exception):
            return {"line": n, "error": f"not a JSON object: {inputs}"}
        missing = [k for k in needed if k not in inputs]
        if missing:
            return {"line": n, "error": f"missing input {missing[0]!r} (the program reads {', '.join(needed)})"}
        run = program.execute(lm, inputs, **generation.run_kwargs())
        if run.failure:
            return {"line": n, "error": run.error, "failure": run.failure}
        return {"line": n, "prediction": dict(run.prediction)}

    failed = 0
    with ThreadPoolExecutor(max_workers=generation.threads) as pool:
        for result in pool.map(answer, lines):  # in input order, as each finishes
            failed += "error" in result
            print(json.dumps(result, ensure_ascii=False), flush=True)
    return 1 if args.input is not None and failed else 0


def _input_names(program) -> list[str]:
    """What `forward` takes: its named parameters, or (for `**inputs`) its first module's input fields."""
    import inspect

    params = list(inspect.signature(program.forward).parameters.values())[1:]  # after `run`
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return program.predictors()[0].signature.input_names
    return [p.name for p in params if p.default is p.empty]


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve  # vLLM (an extra)

    _check_positive(args, "rank")
    _check_positive(args, "max_adapter_mb")
    return serve(args.model, args.rank, args.adapter_dir, args.extra, args.max_adapter_mb)


def cmd_report(args: argparse.Namespace) -> int:
    from .experiments import table, write_report

    report = write_report(Path(args.run_dir))
    print(table(args.run_dir))
    print(f"report: {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a usage error (bad flag, value, name or file), 1 a runtime error
    (the model or engine failed, the error budget ran out, a bug), 130 interrupted. Each error is
    one line; -v shows its traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":  # only `tandem serve` passes flags on (to vLLM)
        parser.parse_args(argv)
    args.extra = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("tandem").setLevel(logging.DEBUG if args.verbose else logging.INFO)  # steps, candidates, resumes
    # --track mlflow: MLflow's own INFO lines (a new store's tables, its trace queue's flush at exit) only with -v
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if args.verbose else "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a link per nested run; tracking logs one
    try:
        return args.func(args)
    except ConfigError as exc:
        _fail(args, f"{_flag(exc.field)} {exc.message}")
        return 2
    except UsageError as exc:
        _fail(args, str(exc))
        return 2
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return 130
    except TandemError as exc:
        _fail(args, str(exc))
        return 1
    except Exception as exc:  # a runtime failure or a bug: one line, the traceback with -v
        _fail(args, f"{type(exc).__name__}: {exc}" + ("" if args.verbose else " (rerun with -v for the traceback)"))
        return 1


def _flag(field: str) -> str:
    """`temperature` -> `--temperature`, for every settings class the command line derives flags from."""
    for cls in (GenerationSettings, EngineSettings, DataSettings, OptimizeSettings):
        flag = flag_of(cls, field)
        if flag != field:
            return flag
    return field


def _fail(args: argparse.Namespace, line: str) -> None:
    if args.verbose:
        traceback.print_exc()
    print(f"tandem: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
