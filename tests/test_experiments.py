"""The experiment grid with a scripted LM: shared prefixes, resume, budgets, and the report."""

import json

import pytest

from tandem import ScriptedLM
from tandem.experiments import (
    BUDGETS, STRATEGIES, Cell, parse_strategies, read_cells, resolve_budget, run_grid, summarize, write_report,
)
from tandem.errors import ConfigError, UsageError
from tandem.settings import JobSettings
from tandem.tasks.base import Task

from test_optimizers import Double, data, metric, smart


def task():
    return Task("double", data([1, 2, 4, 6, 8]), data([3, 10]), data([5, 12, 14]), Double, metric)


def budget():
    return resolve_budget("tiny", "double", dict(num_candidates=1, max_bootstrapped_demos=1, max_labeled_demos=0,
                                                 epochs=1, threads=4))


def test_budget_presets_resolve_and_overrides_win():
    paper_iris, paper_gsm8k = resolve_budget("paper", "iris"), resolve_budget("paper", "gsm8k")
    assert paper_iris.data.train_size == 15 and paper_iris.data.val_size == 35
    assert paper_gsm8k.data.val_size == 250 and paper_gsm8k.optimize.weights.lora.rank == 32
    b = resolve_budget("tiny", "gsm8k", dict(epochs=7, val_size=None))
    assert b.optimize.weights.lora.epochs == 7 and b.data.val_size == BUDGETS["tiny"]["val_size"]
    assert resolve_budget(None, "gsm8k") == JobSettings()  # no budget: the dataclass defaults
    with pytest.raises(UsageError, match="unknown budget 'huge'"):
        resolve_budget("huge", "iris")
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        resolve_budget("tiny", "iris", dict(epochs=0))


def test_strategy_selection():
    assert list(parse_strategies("all")) == list(STRATEGIES)
    assert parse_strategies("vanilla, p -> w, w->w") == {"vanilla": "", "Π→Θ": "p -> w", "Θ→Θ": "w -> w"}
    with pytest.raises(ValueError, match="joined by '->'"):
        parse_strategies("p, q")


def test_grid_computes_shared_prefixes_once(tmp_path):
    lm = ScriptedLM(smart, trainable=True)
    cells = run_grid(task(), Double(), lm, parse_strategies("all"), [0], budget(), tmp_path, progress=False)
    assert [c.strategy for c in cells] == list(STRATEGIES)
    report = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Decoding: constrained to each module's reply format" in report and "Θ+ rows" not in report
    steps = sorted(p.name for p in (tmp_path / "seed-0").iterdir() if (p / "step.json").exists())
    # 8 strategies, but only 8 distinct prefixes: zero-shot, p, w, p-w, w-p, p-w-p, p-p, w-w
    assert steps == sorted(["zero-shot", "p", "w", "p-w", "w-p", "p-w-p", "p-p", "w-w"])
    assert len(lm.finetuned) == 3  # w, p-w, w-w: each weight step trained once
    by = {c.strategy: c for c in cells}
    assert by["vanilla"].val == 50.0 and by["Π"].val == 100.0


def test_extended_rows_sit_beside_the_papers_and_the_report_says_what_they_add(tmp_path):
    lm = ScriptedLM(smart, trainable=True)
    job = resolve_budget("tiny", "double", dict(num_candidates=1, epochs=1, threads=4, samples=1, constrained=False))
    run_grid(task(), Double(), lm, parse_strategies("p -> w, extended"), [0], job, tmp_path, progress=False)
    assert [r["strategy"] for r in summarize(read_cells(tmp_path))] == ["Θ+", "Π→Θ", "Π→Θ+", "Π→Θ+→Π"]
    report = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Decoding: free, parsed after the fact" in report
    assert "Θ+ rows: the weight step adds 1 sampled runs per example at temperature 0.7" in report


def test_interrupted_grid_resumes_and_a_finished_grid_only_reads(tmp_path):
    first = ScriptedLM(smart, trainable=True)
    run_grid(task(), Double(), first, parse_strategies("vanilla, p, p -> w"), [0, 1], budget(), tmp_path,
             progress=False)
    (tmp_path / "seed-1" / "p-w" / "step.json").unlink()  # killed during seed 1's last cell
    second = ScriptedLM(smart, trainable=True)
    cells = run_grid(task(), Double(), second, parse_strategies("vanilla, p, p -> w"), [0, 1], budget(), tmp_path,
                     progress=False)
    assert len(second.finetuned) == 1 and len(cells) == 6
    third = ScriptedLM(smart, trainable=True)
    run_grid(task(), Double(), third, parse_strategies("vanilla, p, p -> w"), [0, 1], budget(), tmp_path,
             progress=False)
    assert third.requests == [] and third.finetuned == []


def test_report_from_saved_cells(tmp_path):
    from tandem.experiments import write_cells

    cells = [Cell("iris", "vanilla", s, 10.0, t, 5.0, 5.0) for s, t in [(0, 20.0), (1, 40.0)]]
    cells += [Cell("iris", "Π", s, 50.0, t, 9.0, 14.0, "n", failed, {"F1": f1})
              for s, t, failed, f1 in [(0, 60.0, 3, 40.0), (1, 70.0, 2, 60.0)]]
    write_cells(tmp_path, cells)
    (tmp_path / "config.json").write_text(json.dumps({"task": "iris", "model": "m", "strategy": ["Π→Θ"]}))
    rows = summarize(read_cells(tmp_path))
    assert [r["strategy"] for r in rows] == ["vanilla", "Π"]
    assert rows[0]["test_mean"] == 30.0 and rows[0]["test_std"] == pytest.approx(14.142, abs=1e-3)
    report = write_report(tmp_path).read_text(encoding="utf-8")
    assert '"Π→Θ"' in report  # settings are shown as written, not as \\u escapes
    assert "| strategy | test % (mean ± std) | F1 % | val % |" in report
    assert "| vanilla | 30.0 ± 14.1 | - | 10.0 | - |" in report and "| Π | 65.0 ± 7.1 | 50.0 ± 14.1 | 50.0 | 2.5 |" in report
    png = (tmp_path / "iris.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    header = (tmp_path / "cells.csv").read_text().splitlines()[0]
    assert header.startswith("task,strategy,seed") and header.endswith(",test F1")


def test_a_smaller_call_merges_into_the_grid_and_a_changed_one_is_refused(tmp_path):
    from dataclasses import replace

    lm = ScriptedLM(smart, trainable=True)
    run_grid(task(), Double(), lm, parse_strategies("vanilla, p"), [0, 1], budget(), tmp_path, progress=False)
    again = run_grid(task(), Double(), lm, parse_strategies("vanilla"), [0], budget(), tmp_path, progress=False)
    assert len(again) == 1 and len(read_cells(tmp_path)) == 4  # merged, not overwritten
    assert (tmp_path / "seed-0" / "results-p.json").exists() and (tmp_path / "seed-0" / "results-zero-shot.json").exists()
    changed = replace(budget(), data=replace(budget().data, val_size=1))
    with pytest.raises(UsageError, match=r"settings\.data\.val_size: 20 -> 1"):
        run_grid(task(), Double(), lm, parse_strategies("vanilla"), [0], changed, tmp_path, progress=False)
