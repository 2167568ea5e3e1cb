"""A finished run folder as something to ship, and the way back from it to a working program.

`export(run_dir, out)` writes a self-contained folder: the program state (`program.json`), the
task it belongs to (`task.json`: how to rebuild the program), the LoRA adapter if the step has
one (PEFT safetensors, loadable by peft and by `vllm serve --lora-modules` unchanged), and a
`README.md` model card with the scores, settings and the commands to use it.
`load_program(out)` is the way back.

`export(..., format="dspy")` writes the same step for DSPy instead: `program.json` in the layout DSPy's
`Program.load` reads (`dspy_state`) for the DSPy program with the same modules and signatures, the
adapter, and a `README.md` with that program, the lines that load it and the server command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .errors import UsageError
from .kinds import ZERO_SHOT, parse_strategy, results_path
from .program import ChainOfThought, Predict, Program, load_state
from .prompts import render_messages
from .rundir import CONFIG
from .signatures import REASONING

ADAPTER_FILES = (".json", ".safetensors")
FORMATS = ("tandem", "dspy")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UsageError(f"{path.parent} is not {what}: no {path.name}")
    return json.loads(path.read_text(encoding="utf-8"))


def export(run_dir: str | Path, out: str | Path, step: str = "best", format: str = "tandem") -> Path:
    """Export `step` ("best": the strategy's best step by val, or a prefix such as "p-w") of `run_dir` to `out`,
    for tandem or (`format="dspy"`) for DSPy."""
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
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
    if format == "dspy":
        from .tasks import program_from_source

        program = program_from_source(config["task_source"]).with_state({**state, "adapter": None})
        (tmp / "program.json").write_text(json.dumps(dspy_state(program), indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        (tmp / "README.md").write_text(dspy_card(config, chosen, program, bool(state.get("adapter")), out),
                                       encoding="utf-8")
    else:
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


# -- DSPy -------------------------------------------------------------------------------------------

DSPY_TYPES = {"int": "int", "number": "float"}  # a choice is a Literal, text is DSPy's default (str)


def dspy_name(name: str, predictor: Predict) -> str:
    """The module's name in DSPy's state: a dspy.ChainOfThought holds its Predict as `.predict`."""
    return f"{name}.predict" if isinstance(predictor, ChainOfThought) else name


def dspy_signature(predictor: Predict) -> str:
    """The module's signature in DSPy's shorthand, typed outputs included; without the reasoning field,
    which dspy.ChainOfThought adds itself."""

    def typed(f) -> str:
        if f.type == "choice":
            return f"{f.name}: Literal[{', '.join(repr(c) for c in f.choices)}]"
        return f"{f.name}: {DSPY_TYPES[f.type]}" if f.type in DSPY_TYPES else f.name

    return f"{', '.join(predictor.signature.input_names)} -> {', '.join(typed(f) for f in _dspy_outputs(predictor))}"


def _dspy_outputs(predictor: Predict) -> list:
    """The output fields a DSPy signature declares: dspy.ChainOfThought adds the reasoning field itself."""
    return [f for f in predictor.signature.outputs if not (isinstance(predictor, ChainOfThought) and f == REASONING)]


def dspy_state(program: Program) -> dict[str, Any]:
    """`program`'s instructions and demos in the JSON layout DSPy's `Program.load` reads (DSPy 3.4's
    `Predict.dump_state`: traces, train, demos, signature {instructions, fields [{prefix, description}]}, lm),
    for the DSPy program with the same module names and signatures. The fields are listed in DSPy's order
    (inputs, then outputs, reasoning first), which is tandem's; `dependency_versions` is left empty: DSPy
    compares it with its own and warns on a difference, and tandem did not save this with DSPy."""
    from . import __version__

    state: dict[str, Any] = {}
    for name, predictor in program.named_predictors():
        signature = predictor.signature
        fields = [{"prefix": f"{f.label}:", "description": f.description or "${" + f.name + "}"}
                  for f in signature.fields]
        demos = [{k: v for k, v in demo.items() if k in {f.name for f in signature.fields}} for demo in predictor.demos]
        instructions = signature.instructions or dspy_default_instructions(predictor)
        state[dspy_name(name, predictor)] = {"traces": [], "train": [], "demos": demos,
                                             "signature": {"instructions": instructions, "fields": fields},
                                             "lm": None}
    state["metadata"] = {"dependency_versions": {}, "exported_by": f"tandem {__version__}"}
    return state


def dspy_default_instructions(predictor: Predict) -> str:
    """What DSPy writes where a signature has no instructions (its `_default_instructions`), so a module
    without any loads as a fresh DSPy module would read."""
    inputs = ", ".join(f"`{name}`" for name in predictor.signature.input_names)
    outputs = ", ".join(f"`{f.name}`" for f in _dspy_outputs(predictor))
    return f"Given the fields {inputs}, produce the fields {outputs}."


def dspy_module_lines(program: Program) -> list[str]:
    """The `__init__` lines of the equivalent DSPy program: one attribute per module (a list for `name[i]`);
    a module nested deeper is named in a comment, for the user to place."""
    import re

    groups: dict[str, list[str]] = {}
    listed: set[str] = set()
    nested = []
    for name, predictor in program.named_predictors():
        kind = "dspy.ChainOfThought" if isinstance(predictor, ChainOfThought) else "dspy.Predict"
        made = f"{kind}({dspy_signature(predictor)!r})"
        found = re.fullmatch(r"(\w+)(\[\d+\])?", name)
        if not found:
            nested.append(f"# {name} = {made}")
            continue
        groups.setdefault(found.group(1), []).append(made)
        if found.group(2):
            listed.add(found.group(1))
    return [f"self.{attr} = [{', '.join(made)}]" if attr in listed else f"self.{attr} = {made[0]}"
            for attr, made in groups.items()] + nested


def dspy_card(config: dict[str, Any], chosen: str, program: Program, adapter: bool, out: Path) -> str:
    """The README of a DSPy export: the server command, the DSPy program and the lines that load it."""
    from . import __version__
    from .lm.vllm import lora_rank_slot

    task = config.get("task", "program")
    base = config.get("lm", {}).get("model") or config.get("model", "MODEL")
    name = f"{task}-{chosen}" if adapter else "MODEL"
    rank = config.get("settings", {}).get("weights", {}).get("lora", {}).get("rank", 16)
    predictors = program.named_predictors()
    single = len(predictors) == 1 and "." not in predictors[0][0] and "[" not in predictors[0][0]
    forward = [f"return self.{predictors[0][0]}(**inputs)"] if single else \
        ["raise NotImplementedError  # the pipeline: call the modules as tandem's forward does"]
    inputs = ", ".join(f"{n}=..." for n in predictors[0][1].signature.input_names)
    lines = [f"# {task}: {chosen} for DSPy, exported by tandem {__version__}", "",
             "`program.json` holds every module's instructions and demos in the layout DSPy's `Program.load` reads"
             + (f"; `adapter/` the LoRA adapter (PEFT, safetensors) trained on `{base}`." if adapter else
                f" (no adapter: the step changed prompts only; base model `{base}`)."), "",
             "## Serve the model", "", "```bash",
             f"vllm serve {base} --enable-lora --lora-modules {name}={out}/adapter "
             f"--max-lora-rank {lora_rank_slot(rank)}"
             if adapter else f"vllm serve {base} --served-model-name MODEL", "```", "",
             "## Load it in DSPy", "", "```python", "from typing import Literal", "", "import dspy", "", "",
             "class Program(dspy.Module):  # the tandem program's modules, under the same names and signatures",
             "    def __init__(self):", "        super().__init__()"]
    lines += [f"        {line}" for line in dspy_module_lines(program)]
    lines += ["", "    def forward(self, **inputs):"] + [f"        {line}" for line in forward]
    lines += ["", "", "program = Program()", f'program.load("{out}/program.json")',
              f'program.set_lm(dspy.LM("openai/{name}", api_base="http://127.0.0.1:8000/v1", api_key="none"))',
              f"print(program({inputs}))" if single else "", "```", "",
              "DSPy renders its own prompts (its ChatAdapter's `[[ ## field ## ]]` sections), not tandem's "
              "`Label: value` lines: the instructions and demos carry over as they are, but "
              + ("the adapter was trained on tandem's prompts and sees DSPy's for the first time; score the program in "
                 "DSPy before you rely on it." if adapter else "score the program in DSPy before you rely on it."), ""]
    return "\n".join(lines)
