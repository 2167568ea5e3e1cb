"""Optimizer logic with a scripted LM: fast, offline, exact."""

import json
import re

import pytest

from tandem import ChainOfThought, Example, GenerationSettings, Program, ScriptedLM
from tandem.optimizers import (
    OptimizeSettings, PromptSettings, WeightSettings, better_together, bootstrap_fewshot_rs, bootstrap_finetune,
    parse_strategy,
)
from tandem.optimizers.weights import NO_TRACES


class Double(Program):
    """Two modules: one rewrites the number, one answers; only the final answer has a label."""

    def __init__(self):
        self.rewrite = ChainOfThought("number -> rewritten")
        self.answer = ChainOfThought("rewritten -> double")

    def forward(self, run, number):
        rewritten = self.rewrite(run, number=number).rewritten
        return self.answer(run, rewritten=rewritten)


class Solve(Program):
    """One module, labeled: its fields are the example's own."""

    def __init__(self):
        self.solve = ChainOfThought("question -> answer")

    def forward(self, run, question):
        return self.solve(run, question=question)


def exact(example, prediction):
    return float(prediction.answer == example.answer)


def number_of(request):
    return int(re.findall(r"-?\d+", request.messages[-1]["content"])[-1])


def demos_in(request):
    """Demos as turns (complete ones) and as examples in the system message (labeled rows, no reasoning)."""
    system = request.messages[0]["content"]
    examples = system.split("\nExamples:", 1)[1].count("\n\n") if "\nExamples:" in system else 0
    return sum(m["role"] == "assistant" for m in request.messages) + examples


def smart(request):
    """Right for even numbers always; right for odd numbers only when the prompt has demos."""
    n = number_of(request)
    if "Rewritten" in request.messages[-1]["content"]:
        ok = n % 2 == 0 or demos_in(request) > 0
        return f"Reasoning: twice the number, step by step\nDouble: {2 * n if ok else n}"
    return f"Reasoning: the same number, written again\nRewritten: {n}"


def metric(example, prediction):
    return float(int(prediction.double) == 2 * example.number)


def data(numbers):
    return [Example(number=n, inputs=("number",)) for n in numbers]


def test_strategy_parsing():
    assert parse_strategy("p -> w -> p") == ("p", "w", "p")
    assert parse_strategy("W") == ("w",)
    assert parse_strategy("p->p") == ("p", "p")
    for bad in ["", "p w", "p -> x", "p ->", "prompts -> weights"]:
        with pytest.raises(ValueError, match="joined by '->'"):
            parse_strategy(bad)


def test_bootstrap_keeps_only_passing_traces_and_respects_limits():
    lm = ScriptedLM(smart)
    train = data([1, 2, 3, 4, 6, 8, 10])  # odd numbers fail with no demos
    settings = PromptSettings(max_bootstrapped_demos=2, max_labeled_demos=2, num_candidates=3)
    result = bootstrap_fewshot_rs(Double(), lm, train, data([5, 7, 12]), metric, settings, seed=1, progress=False)
    assert result.teacher_runs == 7 and result.successful_runs == 5
    names = [c.name for c in result.candidates]
    # no labeled-only candidate: the examples lack the modules' output fields
    assert names == ["zero-shot", "bootstrap-unshuffled", "bootstrap-seed-0", "bootstrap-seed-1", "bootstrap-seed-2"]
    for c in result.candidates[1:]:
        for name, pred in c.state["predictors"].items():
            assert 1 <= len(pred["demos"]) <= 2
            for demo in pred["demos"]:
                assert demo.get("number", demo.get("rewritten")) in (2, "2", 4, "4", 6, "6", 8, "8", 10, "10")
    unshuffled = result.candidates[1].state["predictors"]["answer"]["demos"]
    assert [d["rewritten"] for d in unshuffled] == ["2", "4"]  # training order, passing runs only
    assert unshuffled[0]["double"] == "4" and unshuffled[0]["reasoning"] == "twice the number, step by step"


def test_random_search_picks_the_best_candidate_and_reports_all():
    lm = ScriptedLM(smart)
    result = bootstrap_fewshot_rs(Double(), lm, data([2, 4, 6]), data([1, 3, 5, 8]), metric,
                                  PromptSettings(2, 0, 2), progress=False)
    scores = {c.name: c.val_score for c in result.candidates}
    assert scores["zero-shot"] == 25.0  # only 8 is even
    assert scores["bootstrap-unshuffled"] == 100.0
    assert result.best == "bootstrap-unshuffled"  # ties go to the earlier candidate
    assert all(p.demos for p in result.program.predictors())


def test_equal_scores_go_to_the_candidate_whose_runs_fail_less():
    def reply(request):  # never right; parses only with demos
        return "Reasoning: it is what the demos say\nAnswer: 0" if demos_in(request) else "no idea"

    train = [Example(question=f"q{i}", answer="42", inputs=("question",)) for i in range(4)]
    result = bootstrap_fewshot_rs(Solve(), ScriptedLM(reply), train, train[:2], exact,
                                  PromptSettings(1, 1, 0), progress=False)
    scores = {c.name: (c.val_score, c.val_errors) for c in result.candidates}
    assert scores["zero-shot"] == (0.0, 2) and scores["labeled-only"] == (0.0, 0)
    assert result.best == "labeled-only"


def test_labeled_only_candidate_and_teacher_use_labels_where_fields_allow():
    def reply(request):
        return "Reasoning: it is what the demos say\nAnswer: 42" if demos_in(request) else "no idea"

    train = [Example(question=f"q{i}", answer="42", inputs=("question",)) for i in range(5)]
    lm = ScriptedLM(reply)
    result = bootstrap_fewshot_rs(Solve(), lm, train, train[:2], exact,
                                  PromptSettings(1, 2, 1), progress=False)
    assert "labeled-only" in [c.name for c in result.candidates]
    assert result.successful_runs == 5  # the teacher ran with labeled demos
    assert result.best == "labeled-only" and len(result.program.solve.demos) == 2


def test_module_labels_give_intermediate_modules_labeled_demos():
    def labeled(n):
        labels = {"rewrite": {"number": n, "rewritten": str(n)}, "answer": {"rewritten": str(n), "double": str(2 * n)}}
        return Example(number=n, module_labels=labels, inputs=("number",))

    train = [labeled(n) for n in (1, 3, 5)] + data([7])  # odd numbers pass only with demos; 7 has no labels
    lm = ScriptedLM(smart)
    result = bootstrap_fewshot_rs(Double(), lm, train, data([9, 11]), metric, PromptSettings(0, 2, 0), seed=3,
                                  progress=False)
    assert [c.name for c in result.candidates] == ["zero-shot", "labeled-only"]
    assert result.successful_runs == 4  # the teacher ran with labeled demos on both modules
    assert result.best == "labeled-only"
    demos = result.program.get_state()["predictors"]
    for demo in demos["answer"]["demos"]:
        assert int(demo["double"]) == 2 * int(demo["rewritten"]) and int(demo["rewritten"]) in (1, 3, 5)
    assert len(demos["rewrite"]["demos"]) == 2 and "number" not in demos["answer"]["demos"][0]


def test_program_given_to_an_optimizer_is_not_changed():
    program = Double()
    before = json.dumps(program.get_state())
    bootstrap_fewshot_rs(program, ScriptedLM(smart), data([2, 4]), data([6]), metric, PromptSettings(1, 1, 1),
                         progress=False)
    assert json.dumps(program.get_state()) == before


def test_weight_step_with_no_passing_runs_is_skipped_with_the_message(tmp_path):
    lm = ScriptedLM(smart, trainable=True)
    result = bootstrap_finetune(Double(), lm, data([1, 3, 5]), data([7]), metric, out_dir=tmp_path, progress=False)
    assert not result.trained and result.notes == [NO_TRACES]
    assert result.program.adapter is None and lm.finetuned == []


def test_weight_step_trains_one_adapter_on_every_modules_calls(tmp_path):
    lm = ScriptedLM(smart, trainable=True)
    program = Double()
    program.answer.demos = [{"rewritten": "9", "reasoning": "r", "double": "18"}]
    result = bootstrap_finetune(program, lm, data([1, 2, 4]), data([7]), metric, WeightSettings(keep_checkpoint="last", min_calls=1),
                                out_dir=tmp_path, progress=False)
    assert result.trained and result.successful_runs == 3 and result.conversations == 6
    (conversations,) = lm.finetuned
    assert len(conversations) == 6
    assert all(c[-1]["role"] == "assistant" for c in conversations)
    assert all(m["role"] != "assistant" for c in conversations for m in c[:-1])  # paper: no demos in training prompts
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert sorted({r["module"] for r in rows}) == ["answer", "rewrite"]
    assert result.program.adapter == str((tmp_path / "adapter").resolve())
    assert all(not p.demos for p in result.program.predictors())
    assert result.summary()["with_demos"] is False and "without demos" in result.notes[0]


def test_weight_step_needs_an_lm_that_can_finetune(tmp_path):
    with pytest.raises(TypeError, match="cannot fine-tune"):
        bootstrap_finetune(Double(), ScriptedLM(smart), data([2]), data([4]), metric, WeightSettings(min_calls=1),
                           out_dir=tmp_path, progress=False)


def test_better_together_scores_every_step_and_resumes_without_redoing(tmp_path):
    settings = OptimizeSettings(prompts=PromptSettings(1, 0, 1), generation=GenerationSettings(threads=4))
    args = (data([1, 2, 4, 6]), data([3, 8]), data([5, 10]), metric)
    lm = ScriptedLM(smart, trainable=True)
    small = {"small number": lambda e, p: float(int(p.double) < 10)}  # reported only, never optimized
    first = better_together(Double(), lm, "p -> w", *args, settings, run_dir=tmp_path, progress=False,
                            report_metrics=small)
    assert [s.prefix for s in first.steps] == ["zero-shot", "p", "p-w"]
    # test is [5, 10]: zero-shot doubles only the even one (5 stays 5 < 10); with demos both are doubled
    assert [s.test_metrics["small number"] for s in first.steps[:2]] == [50.0, 0.0]
    assert json.loads((tmp_path / "p" / "step.json").read_text())["test_metrics"] == {"small number": 0.0}
    assert first.steps[0].val == 50.0 and first.steps[1].val == 100.0
    assert first.best == "p"  # p-w scores the same on val; ties go to the earlier step
    calls = len(lm.requests)

    again = ScriptedLM(smart, trainable=True)
    second = better_together(Double(), again, "p -> w", *args, settings, run_dir=tmp_path, progress=False)
    assert again.requests == [] and again.finetuned == []  # everything was finished: nothing redone
    assert [s.val for s in second.steps] == [s.val for s in first.steps]

    # A killed run: the last step never wrote step.json. Only that step runs again.
    (tmp_path / "p-w" / "step.json").unlink()
    third = ScriptedLM(smart, trainable=True)
    better_together(Double(), third, "p -> w", *args, settings, run_dir=tmp_path, progress=False)
    assert len(third.finetuned) == 1
    assert 0 < len(third.requests) < calls

    # A longer strategy sharing the prefix reuses the finished steps.
    fourth = ScriptedLM(smart, trainable=True)
    longer = better_together(Double(), fourth, "p -> w -> p", *args, settings, run_dir=tmp_path, progress=False)
    assert [s.prefix for s in longer.steps] == ["zero-shot", "p", "p-w", "p-w-p"]
    assert fourth.finetuned == []
    results = json.loads((tmp_path / "results-p-w-p.json").read_text())
    assert results["strategy"] == "p -> w -> p" and len(results["steps"]) == 4


def test_better_together_with_a_weight_step_that_finds_nothing_goes_on(tmp_path):
    def hopeless(request):
        return "Reasoning: I work it out step by step.\nRewritten: 0" if "Number" in request.messages[-1]["content"] else "Reasoning: I work it out step by step.\nDouble: 0"

    lm = ScriptedLM(hopeless, trainable=True)
    result = better_together(Double(), lm, "w -> p", data([1, 2]), data([3]), data([4]), metric,
                             OptimizeSettings(prompts=PromptSettings(1, 0, 1)), run_dir=tmp_path, progress=False)
    assert [s.prefix for s in result.steps] == ["zero-shot", "w", "w-p"]
    assert result.steps[1].details["notes"] == [NO_TRACES]
    assert "no successful traces" in result.table()


def test_weight_step_with_demos_trains_and_runs_with_them(tmp_path):
    lm = ScriptedLM(smart, trainable=True)
    program = Double()
    program.answer.demos = [{"rewritten": "9", "reasoning": "r", "double": "18"}]
    result = bootstrap_finetune(program, lm, data([2]), data([4]), metric, WeightSettings(with_demos=True, min_calls=1),
                                out_dir=tmp_path, progress=False)
    answer_calls = [c for c in lm.finetuned[0] if "Double" in c[0]["content"]]
    assert answer_calls and all(any(m["role"] == "assistant" for m in c[:-1]) for c in answer_calls)
    assert result.program.answer.demos == program.answer.demos and result.summary()["with_demos"] is True


def test_an_lm_that_raises_aborts_the_step_and_writes_no_finished_step(tmp_path):
    def down(request):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        better_together(Double(), ScriptedLM(down, trainable=True), "p", data([1, 2]), data([3]), data([4]), metric,
                        run_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*/step.json"))  # resume will redo it, not trust a 0% that never ran


def test_a_resumed_step_builds_on_the_loaded_program(tmp_path):
    settings = OptimizeSettings(prompts=PromptSettings(1, 0, 1))
    args = (data([1, 2, 4, 6]), data([3, 8]), data([5]), metric)
    better_together(Double(), ScriptedLM(smart, trainable=True), "p -> w", *args, settings, run_dir=tmp_path,
                    progress=False)
    (tmp_path / "p-w" / "step.json").unlink()
    resumed = ScriptedLM(smart, trainable=True)
    better_together(Double(), resumed, "p -> w", *args, settings, run_dir=tmp_path, progress=False)
    # The weight step's traces come from the loaded Π program: its calls carry Π's demos as earlier turns.
    trace_calls = resumed.requests[: 2 * len(args[0])]
    assert trace_calls and all(any(m["role"] == "assistant" for m in r.messages) for r in trace_calls)


def test_the_best_step_is_chosen_by_val_even_when_test_disagrees(tmp_path):
    val_numbers, test_numbers = [3, 8], [5, 10]

    def contrary(request):
        # With demos: right on val numbers, wrong on test numbers; without: the other way round.
        demos = any(m["role"] == "assistant" for m in request.messages)
        text = request.messages[-1]["content"]
        n = int(text.split(": ")[1])
        if "Number" in text:
            return f"Reasoning: I work it out step by step.\nRewritten: {n}"
        right = (n in val_numbers) == demos if n in val_numbers + test_numbers else True
        return f"Reasoning: I work it out step by step.\nDouble: {2 * n if right else 0}"

    result = better_together(Double(), ScriptedLM(contrary), "p", data([1, 2, 4]), data(val_numbers),
                             data(test_numbers), metric, OptimizeSettings(prompts=PromptSettings(1, 0, 1)),
                             run_dir=tmp_path, progress=False)
    zero, p = result.steps
    assert p.val > zero.val and p.test < zero.test
    assert result.best == "p"


def test_the_python_api_refuses_a_changed_configuration_in_a_used_run_folder(tmp_path):
    from tandem.errors import UsageError

    args = (data([1, 2]), data([3]), data([4]), metric)
    better_together(Double(), ScriptedLM(smart), (), *args, run_dir=tmp_path, progress=False)
    with pytest.raises(UsageError, match=r"settings\.seed: 0 -> 1"):
        better_together(Double(), ScriptedLM(smart), (), *args, OptimizeSettings(seed=1), run_dir=tmp_path,
                        progress=False)
    with pytest.raises(UsageError, match=r"data\.val\.size: 1 -> 2"):
        better_together(Double(), ScriptedLM(smart), (), args[0], data([3, 5]), *args[2:], run_dir=tmp_path,
                        progress=False)
    assert not list(tmp_path.glob("results-*.json"))[1:]  # only the first call wrote results


def test_settings_are_read_back_typed_and_a_bad_hand_edit_names_its_field(tmp_path):
    from tandem.errors import ConfigError
    from tandem.rundir import read_settings

    settings = OptimizeSettings(seed=3, prompts=PromptSettings(1, 0, 1))
    better_together(Double(), ScriptedLM(smart), (), data([1]), data([3]), data([4]), metric, settings,
                    run_dir=tmp_path, progress=False)
    assert read_settings(tmp_path, OptimizeSettings) == settings and read_settings(tmp_path / "new", OptimizeSettings) is None
    config = json.loads((tmp_path / "config.json").read_text())
    config["settings"]["generation"]["temperature"] = -1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        read_settings(tmp_path, OptimizeSettings)
