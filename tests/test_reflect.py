"""G steps (instruction evolution with GEPA) with scripted task and reflection LMs: offline, exact.

The task LMs read the instructions from the system message; the reflection LMs read the current
instructions from GEPA's reflection prompt (its first ``` block) and answer with a new one."""

import json
import re

import pytest

from tandem import ChainOfThought, Example, GenerationSettings, Program, ScriptedLM
from tandem.errors import UsageError
from tandem.evaluate import ExampleResult
from tandem.optimizers import OptimizeSettings, better_together
from tandem.optimizers.reflect import JOURNAL, evolve_instructions, feedback_text
from tandem.program import Prediction, TraceEntry
from tandem.settings import ReflectionSettings, WeightSettings

REASONING = "Reasoning: I read the level off the instructions above"  # a chain of thought needs 5 words


class Solve(Program):
    def __init__(self, instructions="Level 0"):
        self.solve = ChainOfThought("question -> answer", instructions)

    def forward(self, run, question):
        return self.solve(run, question=question)


def level(text):
    return int(re.search(r"Level (-?\d+)", text).group(1))


def current(request):
    """The instructions GEPA's reflection prompt shows: its first ``` block."""
    return request.messages[-1]["content"].split("```")[1].strip()


def leveled(request):
    """Answers the level its instructions name."""
    return f"{REASONING}\nAnswer: {level(request.messages[0]['content'])}"


def by_level(example, prediction):
    """Graded: level 10 and up is perfect, so every step up the levels is a strict improvement."""
    return min(1.0, int(prediction.answer) / 10)


def questions(prefix, n):
    return [Example(question=f"{prefix}{i}", answer="7", inputs=("question",)) for i in range(n)]


def evolve(program, lm, reflection, metric, budget, *, train=None, val=None, minibatch=2, **kwargs):
    settings = ReflectionSettings(max_metric_calls=budget, reflection_minibatch_size=minibatch)
    return evolve_instructions(program, lm, train or questions("t", 4), val or questions("v", 3), metric, settings,
                               reflection_lm=reflection, progress=False, generation=GenerationSettings(threads=1),
                               **kwargs)


def test_an_instruction_the_metric_rewards_is_adopted(tmp_path):
    up = ScriptedLM(lambda r: f"```\nLevel {level(current(r)) + 1}\n```")
    result = evolve(Solve(), ScriptedLM(leveled), up, by_level, 30, out_dir=tmp_path)
    assert result.before == {"solve": "Level 0"}
    assert level(result.after["solve"]) >= 2 and result.program.solve.signature.instructions == result.after["solve"]
    best = result.candidates[result.best]
    assert best.val == 10.0 * level(result.after["solve"]) and best.val > result.candidates[0].val == 0.0
    assert all(c.changed == ["solve"] and c.parents for c in result.candidates[1:])  # the lineage: who came from whom
    details = result.summary()
    assert details["changed"] == ["solve"]
    assert "kept candidate" in details["notes"][0] and (tmp_path / JOURNAL).exists()


def test_a_worse_instruction_is_not_adopted(tmp_path):
    down = ScriptedLM(lambda r: f"```\nLevel {level(current(r)) - 1}\n```")
    result = evolve(Solve("Level 5"), ScriptedLM(leveled), down, by_level, 30, out_dir=tmp_path)
    assert result.after == result.before == {"solve": "Level 5"} and result.best == 0
    assert result.proposals and all(p.candidate is None for p in result.proposals)  # lost on the minibatch
    assert len(result.candidates) == 1  # none reached val


def test_val_decides_not_the_minibatch(tmp_path):
    """A proposal better on the training minibatch but worse on val is scored on val, and not kept."""
    def split_minded(request):  # training questions like high levels, val questions low ones
        n = level(request.messages[0]["content"])
        return f"{REASONING}\nAnswer: {n if 'Question: t' in request.messages[-1]['content'] else 10 - n}"

    high = ScriptedLM(lambda r: "```\nLevel 9\n```")
    result = evolve(Solve("Level 5"), ScriptedLM(split_minded), high, by_level, 20, out_dir=tmp_path)
    assert any(c.instructions == {"solve": "Level 9"} and c.val < 50.0 for c in result.candidates[1:])
    assert result.best == 0 and result.after == {"solve": "Level 5"}


@pytest.mark.parametrize("budget", range(11, 22))
def test_metric_calls_never_exceed_the_budget(tmp_path, budget):
    """Every proposal passes its minibatch, so each one asks for a val evaluation GEPA would overrun the budget
    with; the default feedback's probes of the gold answer are metric calls too."""
    calls = []

    def counted(example, prediction):
        calls.append(example)
        return by_level(example, prediction)

    lm, up = ScriptedLM(leveled), ScriptedLM(lambda r: f"```\nLevel {level(current(r)) + 1}\n```")
    result = evolve(Solve(), lm, up, counted, budget, minibatch=1, out_dir=tmp_path)
    assert len(calls) == result.metric_calls <= budget and result.proposals  # every call counted, none past it
    assert len(calls) > len(lm.requests)  # the probes among them


def test_a_budget_too_small_for_one_proposal_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--max-metric-calls 9 is too small.*feedback's probes .2 each. take 12"):
        evolve(Solve(), ScriptedLM(leveled), ScriptedLM(lambda r: ""), by_level, 9, out_dir=tmp_path)


class Killed(Exception):
    pass


def test_a_killed_step_resumes_without_repeating_finished_runs(tmp_path):
    def up(request):
        return f"```\nLevel {level(current(request)) + 1}\n```"

    reference_lm, reference_reflection = ScriptedLM(leveled), ScriptedLM(up)
    reference = evolve(Solve(), reference_lm, reference_reflection, by_level, 30, out_dir=tmp_path / "reference")

    asked = []

    def dies_at_the_14th_call(request):
        asked.append(request)
        if len(asked) == 14:
            raise Killed("the machine went away")
        return leveled(request)

    first, first_reflection = ScriptedLM(dies_at_the_14th_call), ScriptedLM(up)
    with pytest.raises(Killed):
        evolve(Solve(), first, first_reflection, by_level, 30, out_dir=tmp_path / "g")
    assert len(first.requests) == 13 and first_reflection.requests  # it died after reflecting
    second, second_reflection = ScriptedLM(leveled), ScriptedLM(up)
    resumed = evolve(Solve(), second, second_reflection, by_level, 30, out_dir=tmp_path / "g")
    # Every run and reflection the first attempt finished is read back, none asked again.
    assert len(first.requests) + len(second.requests) == len(reference_lm.requests)
    assert len(first_reflection.requests) + len(second_reflection.requests) == len(reference_reflection.requests)
    assert resumed.after == reference.after and resumed.metric_calls == reference.metric_calls
    assert resumed.read_back >= 13 and f"resumed: {resumed.read_back} runs read back" in resumed.summary()["notes"][1]


def test_g_then_w_trains_on_prompts_with_the_evolved_instructions(tmp_path):
    def answers(request):  # right only with instructions past level 0
        right = level(request.messages[0]["content"]) > 0
        return f"{REASONING}\nAnswer: {'7' if right else '0'}"

    def exact(example, prediction):
        return float(prediction.answer == example.answer)

    lm = ScriptedLM(answers, trainable=True)
    reflection = ScriptedLM(lambda r: f"```\nLevel {level(current(r)) + 1}\n```")
    settings = OptimizeSettings(generation=GenerationSettings(threads=2), weights=WeightSettings(min_calls=1),
                                reflection=ReflectionSettings(max_metric_calls=14, reflection_minibatch_size=2))
    result = better_together(Solve(), lm, "g -> w", questions("t", 4), questions("v", 3), questions("x", 2), exact,
                             settings, run_dir=tmp_path, progress=False, reflection_lm=reflection)
    assert [s.prefix for s in result.steps] == ["zero-shot", "g", "g-w"]
    evolved = result.steps[1].details["instructions_after"]["solve"]
    assert evolved != "Level 0" and result.steps[1].val == 100.0
    (conversations,) = lm.finetuned
    assert conversations and all(c[0]["content"].startswith(evolved + "\n") for c in conversations)
    report = result.report.read_text(encoding="utf-8")
    assert f"| solve (changed) | Level 0 | {evolved} |" in report and "Reflection LM: scripted" in report
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["reflection_lm"] == {"engine": "scripted", "model": "scripted"}


def test_the_folder_refuses_another_reflection_lm_but_not_a_strategy_without_g(tmp_path):
    lm, up = ScriptedLM(leveled), ScriptedLM(lambda r: f"```\nLevel {level(current(r)) + 1}\n```")
    settings = OptimizeSettings(reflection=ReflectionSettings(max_metric_calls=14, reflection_minibatch_size=2))
    args = (questions("t", 4), questions("v", 3), questions("x", 2), by_level, settings)
    better_together(Solve(), lm, "g", *args, run_dir=tmp_path, progress=False, reflection_lm=up)
    better_together(Solve(), lm, (), *args, run_dir=tmp_path, progress=False)  # no g step: no reflection LM asked
    assert json.loads((tmp_path / "config.json").read_text())["reflection_lm"]["model"] == "scripted"
    other = ScriptedLM(up.respond, name="bigger")
    with pytest.raises(UsageError, match="reflection_lm.model: 'scripted' -> 'bigger'"):
        better_together(Solve(), lm, "g", *args, run_dir=tmp_path, progress=False, reflection_lm=other)


def test_feedback_carries_the_gold_answer_and_the_failure_kind(tmp_path):
    def garbled(request):
        return "I would rather not say."

    prompts = []

    def reflect(request):
        prompts.append(request.messages[-1]["content"])
        return "```\nLevel 1\n```"

    evolve(Solve(), ScriptedLM(garbled), ScriptedLM(reflect), lambda e, p: 1.0, 12, out_dir=tmp_path)
    assert prompts and "unparsed" in prompts[0] and "The correct answer is answer: '7'" in prompts[0]
    assert "I would rather not say." in prompts[0]  # what the module wrote, beside its feedback

    example = Example(question="q", answer="7", inputs=("question",))
    failed = ExampleResult(example, None, 0.0, [], "truncated at 9 tokens before Answer: ...",
                           "truncated at 9 tokens before Answer")
    text = feedback_text(failed, Solve(), lambda e, p: float(p.answer == e.answer), None)
    assert "Score: 0" in text and "truncated at 9 tokens before Answer" in text and "'7'" in text
    told = feedback_text(failed, Solve(), lambda e, p: 1.0, lambda e, p, t: f"gold {e.answer}, given {p}")
    assert told.endswith("gold 7, given None")


def test_the_built_in_tasks_feedback():
    from tandem.tasks import gsm8k, hotpotqa, iris

    flower = Example(sepal_length=5.0, species="virginica", inputs=("sepal_length",))
    assert iris.feedback(flower, Prediction(species="Setosa"), []) == \
        "The correct species is 'virginica'; the answer given was 'setosa'."
    math = Example(question="q", answer="18", inputs=("question",))
    assert gsm8k.feedback(math, Prediction(answer="16 apples"), []) == \
        "The correct answer is 18; the answer given was 16."
    assert "no answer was given" in gsm8k.feedback(math, None, [])

    question = Example(question="Who?", answer="Ann", gold_titles=["A", "B"], inputs=("question",))
    trace = [TraceEntry("generate_query[0]", {"context": [], "question": "Who?"}, [], outputs={"search_query": "a"}),
             TraceEntry("generate_query[1]", {"context": ["A | a text", "C | c"], "question": "Who?"}, [],
                        outputs={"search_query": "c"}),
             TraceEntry("generate_answer", {"context": ["A | a text", "C | c", "D | d"], "question": "Who?"}, [])]
    text = hotpotqa.feedback(question, Prediction(answer="Bob", context=["A | a text", "C | c", "D | d"]), trace)
    assert "The correct answer is 'Ann'; the answer given was 'Bob'." in text
    assert "Hop 1 searched 'a' and retrieved gold passage(s): A." in text
    assert "Hop 2 searched 'c' and retrieved no gold passage." in text


class TwoHop(Program):
    """HotPotQA-shaped: a query module, a lookup, an answer module."""

    def __init__(self):
        self.generate_query = ChainOfThought("question -> search_query", "Write a query.")
        self.generate_answer = ChainOfThought("context, question -> answer", "Answer from the context.")

    def forward(self, run, question):
        query = self.generate_query(run, question=question).search_query
        return self.generate_answer(run, context=[f"passage for {query}"], question=question)


def test_a_two_module_program_changes_only_the_module_gepa_chose(tmp_path):
    def modules(request):
        system = request.messages[0]["content"]
        if "Search Query" in system:  # the query module: a good query only with the evolved instructions
            return f"{REASONING}\nSearch Query: {'good' if 'Search well.' in system else 'bad'}"
        good = "passage for good" in request.messages[-1]["content"]
        return f"{REASONING}\nAnswer: {'7' if good else '0'}"

    prompts = []

    def reflect(request):
        prompts.append(request.messages[-1]["content"])
        return "```\nSearch well.\n```" if current(request) == "Write a query." else f"```\n{current(request)}\n```"

    def exact(example, prediction):
        return float(prediction.answer == example.answer)

    result = evolve(TwoHop(), ScriptedLM(modules), ScriptedLM(reflect), exact, 20, out_dir=tmp_path)
    assert result.after == {"generate_query": "Search well.", "generate_answer": "Answer from the context."}
    assert result.summary()["changed"] == ["generate_query"]
    assert result.candidates[result.best].changed == ["generate_query"] and result.candidates[result.best].val == 100.0
    first = prompts[0]  # the query module's reflection reads its own calls: its inputs and outputs, no context
    assert "Write a query." in first and "search_query" in first and "### context" not in first


def test_g_rows_in_the_grid():
    from tandem.experiments import GROUPS, parse_strategies

    assert parse_strategies("reflect") == GROUPS["reflect"]
    assert parse_strategies("g, g -> w -> g, p->w->g") == \
        {"G": "g", "G→Θ→G": "g -> w -> g", "Π→Θ→G": "p -> w -> g"}


def test_optimize_with_a_g_step_from_the_command_line(tiny_model_dir, cache_dir, tmp_path):
    from test_cli import tandem

    run_dir, env = tmp_path / "run", {"TANDEM_CACHE_DIR": str(cache_dir)}
    args = ["optimize", "--task", "iris", "--model", tiny_model_dir, "--strategy", "g", "--run-dir", str(run_dir),
            "--train-size", "3", "--val-size", "2", "--test-size", "2", "--max-new-tokens", "6", "--threads", "4",
            "--max-metric-calls", "10", "--reflection-minibatch-size", "2", "--reflection-max-tokens", "16"]
    no_url = tandem(*args, "--reflection-engine", "openai", env_extra=env)
    assert no_url.returncode == 2 and "--reflection-engine openai needs --reflection-base-url" in no_url.stderr
    out = tandem(*args, env_extra=env)
    assert out.returncode == 0, out.stderr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["reflection_lm"] == config["lm"]  # no --reflection-model: the task's own LM
    report = (run_dir / "report-g.md").read_text(encoding="utf-8")
    assert "| module | instructions before | instructions after |" in report and "(the task's own LM)" in report
    details = json.loads((run_dir / "g" / "step.json").read_text())["details"]
    assert details["metric_calls"] <= 10 and details["proposals"]
    assert any(json.loads(line)["kind"] == "reflection" for line in (run_dir / "g" / JOURNAL).read_text().splitlines())

    state = json.loads((run_dir / "g" / "program.json").read_text())  # show-prompt shows a state's instructions
    state["predictors"]["classify"]["instructions"] = "Look at the petals first."
    (tmp_path / "evolved.json").write_text(json.dumps(state))
    shown = tandem("show-prompt", "--task", "iris", "--state", str(tmp_path / "evolved.json"))
    assert shown.returncode == 0 and "--- system ---\nLook at the petals first." in shown.stdout


def test_a_grid_with_g_rows_passes_the_reflection_lm_and_the_tasks_feedback(tmp_path):
    from tandem.experiments import parse_strategies, run_grid, write_report
    from tandem.settings import resolve_budget
    from tandem.tasks.base import Task

    told = []

    def feedback(example, prediction, trace):
        told.append(example)
        return "the task's own words"

    task = Task("levels", questions("t", 4), questions("v", 3), questions("x", 2), Solve, by_level, feedback=feedback)
    up = ScriptedLM(lambda r: f"```\nLevel {level(current(r)) + 1}\n```", name="reflector")
    job = resolve_budget(None, "levels", dict(max_metric_calls=14, reflection_minibatch_size=2, threads=2))
    cells = run_grid(task, Solve(), ScriptedLM(leveled), parse_strategies("vanilla, g"), [0], job, tmp_path,
                     progress=False, reflection_lm=up)
    assert [c.strategy for c in cells] == ["vanilla", "G"] and cells[1].val > cells[0].val
    assert told and up.requests and "the task's own words" in up.requests[0].messages[-1]["content"]
    assert json.loads((tmp_path / "config.json").read_text())["reflection_lm"]["model"] == "reflector"
    assert "G rows: GEPA evolves the instructions, 14 metric calls per step, the reflection LM reflector" in \
        write_report(tmp_path).read_text(encoding="utf-8")


def test_a_reused_folder_with_another_lm_metric_or_adapter_reads_back_none_of_its_runs(tmp_path):
    up = ScriptedLM(lambda r: f"```\nLevel {level(current(r)) + 1}\n```")
    evolve(Solve(), ScriptedLM(leveled), up, by_level, 14, out_dir=tmp_path)
    same = ScriptedLM(leveled)
    assert evolve(Solve(), same, up, by_level, 14, out_dir=tmp_path).read_back > 0 and not same.requests
    other = ScriptedLM(lambda r: f"{REASONING}\nAnswer: 10", name="another model")
    result = evolve(Solve(), other, up, by_level, 14, out_dir=tmp_path)
    assert result.read_back == 0 and result.candidates[0].val == 100.0  # its own runs, not the journal's

    def stricter(example, prediction):
        return float(prediction.answer == example.answer)

    assert evolve(Solve(), ScriptedLM(leveled), up, stricter, 14, out_dir=tmp_path).read_back == 0
    adapted = Solve()
    adapted.adapter = str(tmp_path / "adapter")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert evolve(adapted, ScriptedLM(leveled), up, by_level, 14, out_dir=tmp_path).read_back == 0
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"r": 8}')  # retrained at the same path
    assert evolve(adapted, ScriptedLM(leveled), up, by_level, 14, out_dir=tmp_path).read_back == 0


def test_no_val_example_ever_appears_in_a_reflection_prompt(tmp_path):
    prompts = []

    def reflect(request):
        prompts.append(request.messages[-1]["content"])
        return f"```\nLevel {level(current(request)) + 1}\n```"

    train, val = questions("train-question-", 4), questions("val-question-", 3)
    result = evolve(Solve(), ScriptedLM(leveled), ScriptedLM(reflect), by_level, 30, train=train, val=val,
                    out_dir=tmp_path)
    assert len(result.candidates) > 1 and len(prompts) >= 2
    assert all("train-question-" in p and "val-question-" not in p for p in prompts)


def test_a_reflection_lm_that_raises_stops_the_step(tmp_path):
    def broken(request):
        raise ConnectionError("the reflection server went away")

    with pytest.raises(ConnectionError, match="went away"):
        evolve(Solve(), ScriptedLM(leveled), ScriptedLM(broken), by_level, 30, out_dir=tmp_path)


def test_a_metric_that_raises_in_the_feedback_stops_the_step(tmp_path):
    from tandem.evaluate import MetricError

    def fussy(example, prediction):  # scores runs; its bug shows on the feedback's gold-only probe
        if "reasoning" not in prediction:
            raise RuntimeError("a bug in the metric")
        return by_level(example, prediction)

    up = ScriptedLM(lambda r: f"```\nLevel {level(current(r)) + 1}\n```")
    with pytest.raises(MetricError, match="RuntimeError on the gold answers.*a bug in the metric"):
        evolve(Solve(), ScriptedLM(leveled), up, fussy, 30, out_dir=tmp_path)
    assert not up.requests  # stopped before any reflection
