"""The r step: group-relative policy optimization over program runs. Optimizer logic with a scripted
LM that trains marker adapters; the update itself on the tiny model with real peft."""

from dataclasses import replace
from pathlib import Path

import pytest

from tandem import ChainOfThought, Example, GenerationSettings, Program, ScriptedLM
from tandem.training.policy import policy_tokens, reply_logps, train_policy
from tandem.training.reports import PolicyCall, PolicyReport
from tandem.optimizers import better_together
from tandem.optimizers.policy import group_advantages, policy_optimize
from tandem.prompts import forced_spans
from tandem.settings import LoraSettings, OptimizeSettings, PolicySettings, WeightSettings

SPECIES = ("setosa", "versicolor", "virginica")


class Classify(Program):
    def __init__(self):
        self.classify = ChainOfThought(f"flower -> species: {'|'.join(SPECIES)}")

    def forward(self, run, flower):
        return self.classify(run, flower=flower)


class TwoHop(Program):
    """Two modules, as HotPotQA's program has: a query writer and an answerer."""

    def __init__(self):
        self.query = ChainOfThought("flower -> query")
        self.answer = ChainOfThought(f"query -> species: {'|'.join(SPECIES)}")

    def forward(self, run, flower):
        return self.answer(run, query=self.query(run, flower=flower).query)


def metric(example, prediction):
    return float(prediction.species == example.species)


def flowers(prefix, n):
    return [Example(flower=f"{prefix} flower {i}", species=SPECIES[i % 3], inputs=("flower",)) for i in range(n)]


def round_of(adapter):
    """The round number in an adapter path (rounds/002/adapter -> 2); 0 for none."""
    return int(Path(adapter).parent.name) if adapter else 0


class Trainer(ScriptedLM):
    """A scripted LM whose policy updates write marker adapters and record what they were given."""

    def __init__(self, respond, fail_at_round=None):
        super().__init__(respond)
        self.updates = []  # (calls, start adapter, out folder) per update
        self.fail_at_round = fail_at_round

    def train_policy(self, calls, start, out_dir, lora, policy, progress=True):
        if self.fail_at_round == int(Path(out_dir).name):
            self.fail_at_round = None
            raise KeyboardInterrupt  # as a kill would stop it mid-update
        (Path(out_dir) / "adapter").mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "adapter" / "adapter_config.json").write_text("{}")
        self.updates.append((list(calls), start, Path(out_dir)))
        return PolicyReport(len(calls), 10, 2, 100, 1, 0.1, 0.5, 0.0, None, {"classify": len(calls)})


def sampled_reply(request):
    """Sampled runs are right on even seeds; greedy runs are right only with round 1's adapter on val
    flowers and round 2's on test flowers."""
    prompt = request.messages[-1]["content"]
    gold = SPECIES[int(prompt.split("flower ")[1].split()[0]) % 3]
    if request.temperature > 0:
        right = request.seed % 2 == 0
    else:
        right = round_of(request.adapter) == (1 if "val flower" in prompt else 2 if "test flower" in prompt else -1)
    return f"Reasoning: the petals look like this one\nSpecies: {gold if right else 'setosa' if gold != 'setosa' else 'virginica'}"


SETTINGS = PolicySettings(rounds=3, round_examples=2, group_size=4)


def test_advantages_are_zero_mean_per_group_and_groups_that_scored_alike_are_skipped():
    advantages, skipped = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert advantages == [0.5, -0.5, -0.5, 0.5] and not skipped and sum(advantages) == 0
    assert group_advantages([1.0, 1.0, 1.0, 1.0]) == ([0.0] * 4, True)
    assert group_advantages([0.0, 0.0, 0.0, 0.0]) == ([0.0] * 4, True)
    scaled, _ = group_advantages([1.0, 0.0, 0.0, 0.0], scale=True)  # GRPO's original: divided by the std
    assert abs(sum(scaled)) < 1e-9 and scaled[0] == pytest.approx(0.75 / 0.4330127)


def test_rounds_sample_groups_train_on_every_call_and_count_skipped_groups(tmp_path):
    lm = Trainer(sampled_reply)
    train, val = flowers("train", 6), flowers("val", 3)
    result = policy_optimize(Classify(), lm, train, val, metric, SETTINGS, out_dir=tmp_path, progress=False)
    assert [r.round for r in result.rounds] == [1, 2, 3] and len(lm.updates) == 3
    sampled = [r for r in lm.requests if r.temperature > 0]
    assert len(sampled) == 3 * 2 * 4 and len({r.seed for r in sampled}) == len(sampled)  # every run seeded apart
    calls, start, _ = lm.updates[1]
    assert start.endswith("rounds/001/adapter")  # round 2 continues from round 1's adapter
    assert sorted(c.advantage for c in calls) == [-0.5] * 4 + [0.5] * 4  # 2 groups x (2 right, 2 wrong)
    assert all(c.reply.startswith("Reasoning:") and c.messages[-1]["role"] == "user" for c in calls)
    assert all(r.skipped_groups == 0 and r.groups == 2 for r in result.rounds)
    # rounds 2 and 3 sampled with the adapter the round before them trained
    assert {round_of(r.adapter) for r in sampled} == {0, 1, 2}


def test_groups_where_every_run_scored_alike_teach_nothing(tmp_path):
    lm = Trainer(lambda r: "Reasoning: it always says the same thing\nSpecies: setosa")
    result = policy_optimize(Classify(), lm, flowers("train", 6), flowers("val", 3), metric, SETTINGS,
                             out_dir=tmp_path, progress=False)
    assert lm.updates == [] and [r.skipped_groups for r in result.rounds] == [2, 2, 2]
    assert result.best_round == 0 and result.program.adapter is None
    assert "6/6 groups skipped" in " ".join(result.notes)


def test_the_best_round_is_chosen_by_val_even_where_test_disagrees(tmp_path):
    lm = Trainer(sampled_reply)
    settings = OptimizeSettings(policy=replace(SETTINGS, rounds=2))
    result = better_together(Classify(), lm, "r", flowers("train", 6), flowers("val", 3), flowers("test", 3), metric,
                             settings, run_dir=tmp_path, progress=False)
    step = result.steps[-1]
    assert step.details["best_round"] == 1 and round_of(result.program.adapter) == 1
    assert step.val == 100.0 and step.test == 0.0  # round 2 is right on test; test never chooses
    report = (tmp_path / "report-r.md").read_text()
    assert "rounds.png" in report and (tmp_path / "r" / "rounds.png").exists() and "| 1 ← kept |" in report


def test_a_killed_step_resumes_after_the_last_finished_round(tmp_path):
    train, val = flowers("train", 6), flowers("val", 3)
    lm = Trainer(sampled_reply, fail_at_round=2)
    with pytest.raises(KeyboardInterrupt):
        policy_optimize(Classify(), lm, train, val, metric, SETTINGS, out_dir=tmp_path, progress=False)
    assert len(lm.updates) == 1 and (tmp_path / "rounds" / "001" / "round.json").exists()
    assert not (tmp_path / "rounds" / "002" / "round.json").exists()
    again = Trainer(sampled_reply)
    result = policy_optimize(Classify(), again, train, val, metric, SETTINGS, out_dir=tmp_path, progress=False)
    assert [int(out.name) for _, _, out in again.updates] == [2, 3]  # round 1 is not redone
    assert again.updates[0][1].endswith("rounds/001/adapter")
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert all(r.temperature == 0 or round_of(r.adapter) >= 1 for r in again.requests)


def test_every_module_of_a_two_module_program_is_trained(tmp_path):
    def reply(request):
        prompt = request.messages[-1]["content"]
        if "Query:" in prompt:
            gold = SPECIES[int(prompt.split("flower ")[1].split()[0]) % 3]
            right = request.temperature > 0 and request.seed % 2 == 0
            return f"Reasoning: the query names the flower\nSpecies: {gold if right else 'virginica'}"
        return f"Reasoning: write a query for this flower\nQuery: {prompt.split('Flower: ')[1].splitlines()[0]}"

    lm = Trainer(reply)
    policy_optimize(TwoHop(), lm, flowers("train", 6), flowers("val", 3), metric, replace(SETTINGS, rounds=1),
                    out_dir=tmp_path, progress=False)
    (calls, _, _), = lm.updates
    assert {c.module for c in calls} == {"query", "answer"}
    assert len([c for c in calls if c.module == "query"]) == len([c for c in calls if c.module == "answer"])


def test_forced_text_is_the_labels_and_the_rest_of_a_choice():
    signature = Classify().classify.signature  # Reasoning, then Species
    reply = "Reasoning: small petals, so it is one kind\nSpecies: versicolor"
    spans = forced_spans(signature, reply)
    assert [reply[a:b] for a, b in spans] == ["Reasoning: ", "Species: ", "rsicolor"]  # "ve" tells it from virginica


# -- the update itself, on the tiny model with real peft ------------------------------------------------


def test_a_policy_update_raises_rewarded_replies_and_lowers_punished_ones(tiny_model_dir, tmp_path):
    import torch

    from tandem.lm.local import LocalLM

    lm = LocalLM(tiny_model_dir, dtype="float32")
    messages = [{"role": "system", "content": "Name the species."}, {"role": "user", "content": "Flower: small"}]
    good, bad = "Species: setosa", "Species: virginica"
    calls = [PolicyCall("classify", messages, good, 0.5), PolicyCall("classify", messages, bad, -0.5)]
    lora = LoraSettings(rank=4, alpha=8)
    policy = PolicySettings(policy_learning_rate=5e-3, updates_per_round=1)
    report = train_policy(lm, calls, None, tmp_path / "round", lora, policy, progress=False)
    assert report.calls == 2 and report.steps == 1 and report.by_module == {"classify": 2}

    def logp(reply, adapter):
        ids, mask, prompt, _ = policy_tokens(lm.tokenizer, lm.prompt_text, PolicyCall("c", messages, reply, 0))
        with lm.using_adapter(adapter) as model, torch.no_grad():
            return float(reply_logps(model, [(ids, prompt)], 0, torch.device("cpu"))[0].sum())

    adapter = str(tmp_path / "round" / "adapter")
    assert logp(good, adapter) > logp(good, None) + 1e-3
    assert logp(bad, adapter) < logp(bad, None) - 1e-3
    assert (tmp_path / "round" / "optimizer.safetensors").exists()
    # The next round starts from this adapter and its optimizer state, and moves it further.
    again = train_policy(lm, calls, adapter, tmp_path / "next", lora, policy, progress=False)
    assert again.steps == 1 and logp(good, str(tmp_path / "next" / "adapter")) > logp(good, adapter)
    lm.close()


def test_only_the_reply_tokens_the_model_chose_carry_loss(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Flower: small"}]
    reply = "Reasoning: small petals\nSpecies: setosa"
    render = lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731
    free = PolicyCall("c", messages, reply, 1.0)
    ids, mask, prompt, retokenized = policy_tokens(tokenizer, render, free)
    assert ids[:prompt] == tokenizer(render(messages), add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids) - prompt and all(mask)  # free decoding: every reply token is the model's
    forced = replace(free, forced=((0, len("Reasoning: ")), (reply.index("Species"), reply.index("setosa") + 1)))
    _, mask, _, _ = policy_tokens(tokenizer, render, forced)
    kept = tokenizer.decode([i for i, m in zip(ids[prompt:], mask) if m])
    assert "Reasoning" not in kept and "Species" not in kept and "small petals" in kept and "etosa" in kept


def test_the_engine_serves_each_rounds_adapter_without_restarting(tiny_model_dir, tmp_path):
    from tandem.lm.local import LocalLM

    lm = LocalLM(tiny_model_dir, dtype="float32")
    program = Classify()
    train, val = flowers("train", 4), flowers("val", 2)
    generation = GenerationSettings(max_new_tokens=24, constrained=True)
    settings = PolicySettings(rounds=2, round_examples=2, group_size=4, policy_learning_rate=1e-2)
    result = policy_optimize(program, lm, train, val, lambda e, p: float(len(p.reasoning) % 2 == 0), settings,
                             LoraSettings(rank=4, alpha=8), out_dir=tmp_path, generation=generation, progress=False)
    trained = [r for r in result.rounds if r.calls]
    assert trained, "the tiny model's sampled species should differ within some group"
    served = {Path(key[0]) for key in lm._adapters}
    for r in trained:
        assert (tmp_path / r.adapter).resolve() in served  # loaded by path into the running engine
        assert r.forced_tokens > 0  # constrained: labels and the rest of each choice carry no loss
    lm.close()


def test_a_weight_step_that_answers_one_class_is_flagged_as_collapsed(tmp_path):
    """Kept as the paper would (its last checkpoint), a collapsed adapter is flagged; kept by val (the
    default), the step returns its start and says the checkpoints collapsed."""
    def reply(request):
        if request.adapter:  # after the weight step: one class for everything
            return "Reasoning: they all look alike to me now\nSpecies: setosa"
        gold = SPECIES[int(request.messages[-1]["content"].split("flower ")[1].split()[0]) % 3]
        return f"Reasoning: the petals look like this one\nSpecies: {gold}"

    lm = ScriptedLM(reply, trainable=True)
    val = flowers("val", 6)
    by_val = better_together(Classify(), lm, "p -> w", flowers("train", 6), val, flowers("test", 3), metric,
                             OptimizeSettings(), run_dir=tmp_path / "best", progress=False)
    assert by_val.steps[2].val_answers == by_val.steps[1].val_answers and by_val.steps[2].val == by_val.steps[1].val
    assert by_val.steps[2].details["notes"][-1].startswith("kept the start: no checkpoint beat its val 100.0 (step 1 "
                                                           "(epoch 1): val 33.3, collapsed: 'setosa' for 6/6;")
    last = WeightSettings(keep_checkpoint="last")
    result = better_together(Classify(), lm, "p -> w", flowers("train", 6), val, flowers("test", 3), metric,
                             OptimizeSettings(weights=last), run_dir=tmp_path, progress=False)
    prompts, weights = result.steps[1], result.steps[2]
    assert weights.val_answers == {"setosa": 6}
    assert "collapsed: 'setosa' for 6/6 val" in weights.details["notes"]
    assert prompts.val_answers == {"setosa": 2, "versicolor": 2, "virginica": 2}
    assert not any("collapsed" in n for n in prompts.details.get("notes", []))
    assert "setosa 6/6" in (tmp_path / "report-p-w.md").read_text()


def test_a_grid_with_r_rows_reports_each_r_step_round_by_round(tmp_path):
    from tandem.experiments import parse_strategies, run_grid, write_report
    from tandem.settings import resolve_budget
    from tandem.tasks.base import Task

    task = Task("flowers", flowers("train", 6), flowers("val", 3), flowers("test", 3), Classify, metric)
    job = resolve_budget("tiny", "flowers", dict(rounds=2, round_examples=2, group_size=4, val_every=1,
                                                 num_candidates=1, threads=4))
    strategies = parse_strategies("vanilla, p -> r")
    assert strategies == {"vanilla": "", "Π→R": "p -> r"}
    run_grid(task, Classify(), Trainer(sampled_reply), strategies, [0, 1], job, tmp_path, progress=False)
    report = write_report(tmp_path).read_text()
    assert "flowers-rounds.png" in report and (tmp_path / "flowers-rounds.png").exists()
    assert report.count("| Π→R | seed-") == 2  # one row per seed, with val and reward by round
