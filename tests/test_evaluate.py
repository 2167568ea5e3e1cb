import threading

import pytest

from tandem import ChainOfThought, Example, GenerationSettings, Program, ScriptedLM, evaluate
from tandem.evaluate import ErrorBudgetExceeded, MetricError
from tandem.lm.batching import Cancelled, DynamicBatcher


class Echo(Program):
    def __init__(self):
        self.solve = ChainOfThought("question -> answer")

    def forward(self, run, question):
        return self.solve(run, question=question)


def reply(request):
    q = request.messages[-1]["content"].removeprefix("Question: ")
    return "gibberish" if q.startswith("bad") else f"Reasoning: the answer is the question upper-cased\nAnswer: {q.upper()}"


def exact(example, prediction):
    return float(prediction.answer == example.answer)


def data(n_good: int, n_bad: int):
    good = [Example(question=f"q{i}", answer=f"Q{i}", inputs=("question",)) for i in range(n_good)]
    bad = [Example(question=f"bad{i}", answer="x", inputs=("question",)) for i in range(n_bad)]
    return good + bad


def test_scores_in_order_and_counts_failures():
    examples = data(6, 2)
    examples[0] = Example(question="q0", answer="WRONG", inputs=("question",))
    result = evaluate(Echo(), ScriptedLM(reply), examples, exact, GenerationSettings(threads=4), progress=False)
    assert [r.example for r in result.results] == examples
    assert result.score == pytest.approx(100 * 5 / 8)
    assert result.n_errors == 2
    assert result.failures() == {"unparsed": 2}
    assert "2 failed (2 unparsed)" in result.summary()


def test_error_budget_stops_the_evaluation():
    with pytest.raises(ErrorBudgetExceeded, match="max_errors=1"):
        evaluate(Echo(), ScriptedLM(reply), data(2, 5), exact, GenerationSettings(threads=2), max_errors=1, progress=False)
    result = evaluate(Echo(), ScriptedLM(reply), data(2, 5), exact, GenerationSettings(threads=2), max_errors=5, progress=False)
    assert result.n_errors == 5


def test_report_metrics_count_failed_runs_as_zero_and_skip_what_they_cannot_judge():
    examples = data(3, 1) + [Example(question="qx", answer="", inputs=("question",))]
    result = evaluate(Echo(), ScriptedLM(reply), examples, exact, progress=False)
    length = lambda e, p: None if not e.answer else float(len(p.answer) == 2)  # noqa: E731
    assert result.mean(length) == pytest.approx(75.0)  # 3 of 4 judged examples; the failed one counts 0
    assert result.mean(lambda e, p: None) == 0.0  # only the failed run is left: it counts 0
    clean = evaluate(Echo(), ScriptedLM(reply), data(2, 0), exact, progress=False)
    assert clean.mean(lambda e, p: None) is None


def test_a_metric_that_cannot_read_the_prediction_fails_only_that_example():
    def numeric(example, prediction):
        if example.question == "q1":
            return float(prediction.answer)  # "Q1": what the model wrote is no number
        if example.question == "q2":
            return 1 / 0
        return 1.0

    result = evaluate(Echo(), ScriptedLM(reply), data(4, 0), numeric, progress=False)
    assert result.score == pytest.approx(50.0)
    assert [r.failure for r in result.results] == [None, "metric could not score", "metric could not score", None]
    assert "ValueError" in result.results[1].error and "ZeroDivisionError" in result.results[2].error


@pytest.mark.parametrize("bug", [KeyError, TypeError, AttributeError])
def test_a_bug_in_the_metric_stops_the_evaluation_naming_the_example(bug):
    def buggy(example, prediction):
        if example.question == "q1":
            raise bug("oops")
        return 1.0

    where = rf"the metric raised {bug.__name__} on example 1 \(question='q1'\)"
    with pytest.raises(MetricError, match=where) as caught:
        evaluate(Echo(), ScriptedLM(reply), data(3, 0), buggy, progress=False)
    assert isinstance(caught.value.__cause__, bug)


def test_a_metric_that_returns_no_number_stops_the_evaluation():
    with pytest.raises(MetricError, match=r"returned None on example 0 .*must return a number"):
        evaluate(Echo(), ScriptedLM(reply), data(1, 0), lambda e, p: None, progress=False)


def test_batcher_gathers_concurrent_calls_into_one_batch():
    sizes = []
    gate = threading.Barrier(8)

    def run_batch(items):
        sizes.append(len(items))
        return [i * 10 for i in items]

    batcher = DynamicBatcher(run_batch, max_batch=8, max_wait=2.0)
    out = [None] * 8

    def call(i):
        gate.wait()
        out[i] = batcher.submit([i])[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [i * 10 for i in range(8)]
    assert sizes == [8]  # max_batch reached: no waiting out the full 2 s


def test_batcher_hands_errors_to_every_caller():
    def run_batch(items):
        raise RuntimeError("engine down")

    batcher = DynamicBatcher(run_batch, max_batch=4, max_wait=0.0)
    with pytest.raises(RuntimeError, match="engine down"):
        batcher.submit([1, 2])


def test_cancel_fails_waiting_calls_and_stops_the_running_batch():
    started, seen = threading.Event(), []

    def run_batch(items):
        started.set()
        while not batcher.cancelling:  # a long batch that checks between steps, like the decode loop
            threading.Event().wait(0.01)
        seen.append(items)
        raise Cancelled("stopped")

    batcher = DynamicBatcher(run_batch, max_batch=2, max_wait=0.0)
    errors = []

    def call(i):
        try:
            batcher.submit([i])
        except Cancelled as exc:
            errors.append(str(exc))

    first = threading.Thread(target=call, args=(1,))
    first.start()
    started.wait(5)
    second = threading.Thread(target=call, args=(2,))  # waits behind the running batch
    second.start()
    while not batcher._pending:
        threading.Event().wait(0.01)
    batcher.cancel()
    first.join(5)
    second.join(5)
    assert sorted(errors) == ["cancelled before it ran", "stopped"] and seen == [[1]]


def test_an_interrupted_evaluation_cancels_the_lm():
    class Cancellable(ScriptedLM):
        cancelled = 0

        def cancel(self):
            self.cancelled += 1

    def interrupt(example, prediction):
        raise KeyboardInterrupt

    lm = Cancellable(reply)
    with pytest.raises(KeyboardInterrupt):
        evaluate(Echo(), lm, [Example(question="a", answer="A", inputs=("question",))], interrupt, progress=False)
    assert lm.cancelled == 1


def test_a_reply_cut_at_its_token_limit_is_counted_as_truncated_before_the_field_it_never_reached():
    from tandem.lm import Completion

    def cut(request):
        if request.messages[-1]["content"].endswith("q0"):
            return Completion("Reasoning: first, let us consider", finish_reason="length")
        return reply(request)

    result = evaluate(Echo(), ScriptedLM(cut), data(3, 1), exact, GenerationSettings(max_new_tokens=96), progress=False)
    assert result.failures() == {"truncated at 96 tokens before Answer": 1, "unparsed": 1}
    assert "1 truncated at 96 tokens before Answer, 1 unparsed" in result.summary()


def test_an_lm_that_raises_stops_the_evaluation_instead_of_failing_examples():
    def down(request):
        raise ConnectionError("engine unreachable")

    with pytest.raises(ConnectionError, match="engine unreachable"):
        evaluate(Echo(), ScriptedLM(down), data(4, 0), exact, progress=False)


def test_a_bug_in_the_program_surfaces_as_an_error_not_a_wrong_answer():
    class Buggy(Echo):
        def forward(self, run, question):
            return self.solve(run, question=question).no_such_field

    with pytest.raises(AttributeError, match="no_such_field"):
        evaluate(Buggy(), ScriptedLM(reply), data(3, 0), exact, progress=False)
