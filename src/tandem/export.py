"""A finished run folder as something to ship, and the way back from it to a working program.

`export(run_dir, out)` writes a self-contained folder: the program state (`program.json`), the
task it belongs to (`task.json`: how to rebuild the program), the LoRA adapter if the step has
one (PEFT safetensors, loadable by peft and by `vllm serve --lora-modules` unchanged), and a
`README.md` model card with the scores, settings and the commands to use it.
`load_program(out)` is the way back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .errors import UsageError
from .optimizers.better_together import ZERO_SHOT, parse_strategy, results_path
from .program import Program, load_state
from .prompts import render_messages
from .rundir import CONFIG

ADAPTER_FILES = (".json", ".safetensors")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UsageError(f"{path.parent} is not {what}: no {path.name}")
    return json.loads(path.read_text(encoding="utf-8"))


def export(run_dir: str | Path, out: str | Path, step: str = "best") -> Path:
    """Export `step` ("best": the strategy's best step by val, or a prefix such as "p-w") of `run_dir` to `out`."""
    run_dir, out = Path(run_dir), Path(out)
    config = _read_json(run_dir / CONFIG, "a tandem run folder (tandem optimize writes one)")
    strategy = config.get("strategy", ZERO_SHOT)
    results = _read_json(results_path(run_dir, () if strategy == ZERO_SHOT else parse_strategy(strategy)),
                         "a finished run")
    chosen = results["best"] if step == "best" else step
    if not (run_dir / chosen / "step.json").is_file():
        finished = sorted(p.parent.name for p in run_dir.glob("*/step.json"))
        raise UsageError(f"{run_dir} has no finished step {chosen!r} (finished: {', '.join(finished)})")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty: export into a new folder")
    if "task_source" not in config:
        raise UsageError(f"{run_dir}/config.json does not say which task made it (run it again with this tandem)")

    state = load_state(run_dir / chosen / "program.json")  # the adapter path comes back absolute
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if state.get("adapter"):
        (tmp / "adapter").mkdir()
        for f in Path(state["adapter"]).iterdir():
            if f.suffix in ADAPTER_FILES:
                shutil.copy2(f, tmp / "adapter" / f.name)
        state["adapter"] = "adapter"
    (tmp / "program.json").write_text(json.dumps(state, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp / "task.json").write_text(json.dumps(config["task_source"], indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    (tmp / "README.md").write_text(model_card(config, results, chosen, state, out), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def load_program(folder: str | Path, data_dir: str | None = None) -> Program:
    """The program an export (or any folder with task.json and program.json) holds, ready for an LM."""
    from .tasks import program_from_source

    folder = Path(folder)
    source = _read_json(folder / "task.json", "an exported program (tandem export writes one)")
    return program_from_source(source, data_dir).load(folder / "program.json")


def model_card(config: dict[str, Any], results: dict[str, Any], chosen: str, state: dict[str, Any], out: Path) -> str:
    from . import __version__

    model = config.get("model") or config.get("lm", {}).get("model", "MODEL")
    base = config.get("lm", {}).get("model", model)
    task = config.get("task", "?")
    source = config["task_source"]
    task_flag = f"--task {source['spec']}" if "spec" in source else f"--task {source['builtin']}" if "builtin" in source else ""
    lines = [f"# {task}: {chosen} ({results.get('strategy', '')}), exported by tandem {__version__}", "",
             f"Base model `{model}`" + (f" (weights: `{base}`)" if base != model else "") + "; "
             + ("LoRA adapter in `adapter/` (PEFT, safetensors)." if state.get("adapter") else "no adapter (prompts only)."),
             "", "## Scores", "", "| step | val % | test % | failed (test) |", "|---|---|---|---|"]
    for s in results["steps"]:
        mark = " **(exported)**" if s["prefix"] == chosen else ""
        test = "-" if s["test"] is None else f"{s['test']:.1f}"
        lines.append(f"| {s['prefix']}{mark} | {s['val']:.1f} | {test} | {s.get('test_errors', 0)} |")
    data = config.get("data", {})
    lines += ["", "Data: " + ", ".join(f"{k} {v['size']}" for k, v in data.items()) + ". Selection used val only.", "",
              "## Use it", "", "With tandem, on any engine it has:", "", "```bash",
              f"tandem run {out} '{{...inputs as JSON...}}' --model {model}",
              f"tandem run {out} --model {model} < inputs.jsonl > predictions.jsonl", "```"]
    if state.get("adapter"):
        lines += ["", "Served by vLLM (the adapter loads unchanged):", "", "```bash",
                  f"vllm serve {model if '/' in model and not model.startswith(('/', '.')) else base} "
                  f"--enable-lora --lora-modules {task}-{chosen}={out}/adapter --max-lora-rank "
                  f"{config.get('settings', {}).get('weights', {}).get('lora', {}).get('rank', 16)}", "```", "",
                  f"then send chat requests with `model: {task}-{chosen}` and the messages below."]
    lines += ["", "## Prompts", "", "Each module sends these messages (system, demos as earlier turns, then the inputs as",
              "`Label: value` lines) and reads its outputs back from `Label: value` lines.", ""]
    program = _program_for_card(source, state)
    for name, predictor in (program.named_predictors() if program else []):
        placeholder = {f: f"<{f}>" for f in predictor.signature.input_names}
        messages = render_messages(predictor.signature, predictor.demos, placeholder)
        lines += [f"### module `{name}`", "", "```json", json.dumps(messages, indent=1, ensure_ascii=False), "```", ""]
    lines += ["## Settings", "", "```json", json.dumps(config.get("settings", {}), indent=1, ensure_ascii=False), "```",
              "", f"Recreate: `tandem optimize {task_flag} --model {model} ...` with the settings above.", ""]
    return "\n".join(lines)


def _program_for_card(source: dict[str, Any], state: dict[str, Any]) -> Program | None:
    from .tasks import program_from_source

    try:
        program = program_from_source(source)
    except UsageError:  # a built-in task whose data is elsewhere: the card goes without its prompts
        return None
    return program.with_state({**state, "adapter": None})
