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
                             OptimizeSettings(weights=WeightSettings(min_calls=1)), run_dir=tmp_path / "best",
                             progress=False)
    assert by_val.steps[2].val_answers == by_val.steps[1].val_answers and by_val.steps[2].val == by_val.steps[1].val
    assert by_val.steps[2].details["notes"][-1].startswith("kept the start: no checkpoint beat its val 100.0 (step 1 "
                                                           "(epoch 1): val 33.3, collapsed: 'setosa' for 6/6;")
    last = WeightSettings(keep_checkpoint="last", min_calls=1)
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


# -- #23: what the update trains on, and how ----------------------------------------------------------------


def test_round_seeds_never_repeat_between_rounds_even_past_a_thousand_runs():
    from tandem.optimizers.policy import round_seeds

    first, second = round_seeds(0, 1, 2000), round_seeds(0, 2, 2000)
    assert len(set(first) | set(second)) == 4000 and not set(round_seeds(1, 1, 2000)) & set(first + second)


def test_an_empty_split_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="needs training and validation examples .got 0 train, 3 val"):
        policy_optimize(Classify(), Trainer(sampled_reply), [], flowers("val", 3), metric, SETTINGS, out_dir=tmp_path)


def test_scale_rewards_divides_each_groups_advantages_by_its_std(tmp_path):
    lm = Trainer(sampled_reply)
    policy_optimize(Classify(), lm, flowers("train", 6), flowers("val", 3), metric,
                    replace(SETTINGS, rounds=1, scale_rewards=True), out_dir=tmp_path, progress=False)
    (calls, _, _), = lm.updates
    assert sorted({c.advantage for c in calls}) == [-1.0, 1.0]  # 2 right, 2 wrong: ±0.5 over a std of 0.5


def test_val_every_scores_val_only_on_its_rounds_and_the_last(tmp_path):
    lm = Trainer(sampled_reply)  # greedy val is right only with round 1's adapter, which is never scored
    result = policy_optimize(Classify(), lm, flowers("train", 6), flowers("val", 3), metric,
                             replace(SETTINGS, val_every=2), out_dir=tmp_path, progress=False)
    assert [r.val for r in result.rounds] == [None, 0.0, 0.0] and result.best_round == 0
    greedy = [r for r in lm.requests if r.temperature == 0]
    assert {round_of(r.adapter) for r in greedy} == {0, 2, 3}


def test_a_kill_between_an_adapters_write_and_its_round_json_redoes_the_round(tmp_path):
    class Killed(Exception):
        pass

    def dies_scoring_round_2(request):
        if request.temperature == 0 and round_of(request.adapter) == 2:
            raise Killed("the machine went away after round 2's adapter was written")
        return sampled_reply(request)

    train, val = flowers("train", 6), flowers("val", 3)
    with pytest.raises(Killed):
        policy_optimize(Classify(), Trainer(dies_scoring_round_2), train, val, metric, SETTINGS, out_dir=tmp_path,
                        progress=False)
    assert (tmp_path / "rounds" / "002" / "adapter").exists() and not (tmp_path / "rounds" / "002" / "round.json").exists()
    again = Trainer(sampled_reply)
    result = policy_optimize(Classify(), again, train, val, metric, SETTINGS, out_dir=tmp_path, progress=False)
    assert [(int(out.name), round_of(start)) for _, start, out in again.updates] == [(2, 1), (3, 2)]
    assert [r.round for r in result.rounds] == [1, 2, 3] and result.best_round == 1


def test_objective_clips_an_off_policy_ratio_and_adds_the_k3_kl():
    import torch

    from tandem.training.policy import clipped_objective, module_weights

    old = torch.zeros(3)
    logp = torch.log(torch.tensor([0.5, 1.0, 2.0])).requires_grad_()  # ratios 0.5, 1, 2
    loss, ratio, clipped, kl = clipped_objective(logp, old, 1.0, 0.2, 0.28)
    assert clipped.tolist() == [False, False, True]  # A > 0: only a ratio above 1 + 0.28 is held
    assert loss.tolist() == pytest.approx([-0.5, -1.0, -1.28])
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-0.5, -1.0, 0.0])  # a clipped token gives no gradient
    _, _, clipped, _ = clipped_objective(logp.detach(), old, -1.0, 0.2, 0.28)
    assert clipped.tolist() == [True, False, False]  # A < 0: only a ratio below 1 - 0.2
    loss, _, _, kl = clipped_objective(logp.detach(), old, 0.0, 0.2, 0.28, ref=torch.zeros(3), kl_coef=0.5)
    d = -logp.detach()
    assert kl.tolist() == pytest.approx((torch.exp(d) - d - 1).tolist()) and kl[1] == 0 and (kl >= 0).all()
    assert loss.tolist() == pytest.approx((0.5 * kl).tolist())
    # mmGRPO: a token mean per module, the modules averaged
    assert module_weights(["a", "a", "b"], [10, 30, 5]) == [80.0, 80.0, 10.0]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from tandem.lm.local import LocalLM

    lm = LocalLM(tiny_model_dir, dtype="float32")
    yield lm
    lm.close()


MESSAGES = [{"role": "system", "content": "Name the species."}, {"role": "user", "content": "Flower: small"}]


def test_rs_loss_covers_the_sampled_ids_and_the_end_token_through_the_cache(engine, tmp_path):
    from tandem.lm import Request
    from tandem.lm.cache import CachedLM

    cached = CachedLM(engine, tmp_path / "cache.sqlite")
    fmt = Classify().classify.signature
    from tandem.prompts import reply_format

    request = Request(tuple(MESSAGES), max_new_tokens=40, temperature=1.0, seed=3, format=reply_format(fmt))
    (fresh,), (again,) = cached.generate([request]), cached.generate([request])
    assert again.cached and (again.token_ids, again.forced) == (fresh.token_ids, fresh.forced)  # survives the cache
    assert fresh.finish_reason == "stop" and fresh.token_ids[-1] in engine._eos_ids() and fresh.forced
    call = PolicyCall("classify", MESSAGES, fresh.text, 1.0, forced_spans(fmt, fresh.text), fresh.token_ids,
                      fresh.forced)
    ids, mask, prompt, retokenized = policy_tokens(engine.tokenizer, engine.prompt_text, call)
    assert ids[prompt:] == list(fresh.token_ids) and not retokenized and mask[-1] == 1  # the end token is trained
    assert all(mask[k] == 0 for k in fresh.forced)  # what the grammar wrote is not
    # A tokenization the tokenizer would not make is trained as sampled, not re-tokenized
    odd = tuple(engine.tokenizer.convert_tokens_to_ids(list("Species:"))) + (engine.tokenizer.eos_token_id,)
    ids, mask, _, retokenized = policy_tokens(engine.tokenizer, engine.prompt_text,
                                              PolicyCall("c", MESSAGES, "Species:", 1.0, token_ids=odd))
    assert ids[-len(odd):] == list(odd) and not retokenized and len(mask) == len(odd) == 9
    # without ids: re-tokenized, the end token added after a reply that ended by itself, and said so
    ids, _, prompt, retokenized = policy_tokens(engine.tokenizer, engine.prompt_text, PolicyCall("c", MESSAGES, "Species:", 1.0))
    assert retokenized and ids[-1] == engine.tokenizer.eos_token_id and len(ids) - prompt < 9
    cached.close()


class SlowTokenizer:
    """A tokenizer without offset mappings, as Python ("slow") tokenizers are."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_slow_tokenizer_masks_forced_tokens_as_a_fast_one_does(engine):
    reply = "Reasoning: small petals\nSpecies: setosa"
    forced = ((0, len("Reasoning: ")), (reply.index("Species"), reply.index("setosa") + 1))
    call = PolicyCall("c", MESSAGES, reply, 1.0, forced)
    masks = [policy_tokens(t, engine.prompt_text, call)[1] for t in (engine.tokenizer, SlowTokenizer(engine.tokenizer))]
    assert masks[0] == masks[1] and 0 < sum(masks[1]) < len(masks[1])


def test_the_temperature_enters_the_log_probs(engine, monkeypatch, tmp_path):
    import torch

    from tandem.training import policy as training_policy

    ids = engine.encode(MESSAGES)
    prompt = len(ids)
    ids = ids + engine.tokenizer("Species: setosa", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0, prompt - 1:-1]
        for t in (1.0, 0.5):
            want = torch.log_softmax(logits / t, -1).gather(1, torch.tensor(ids[prompt:])[:, None])[:, 0]
            got = reply_logps(engine.model, [(ids, prompt)], 0, torch.device("cpu"), temperature=t)[0]
            assert torch.allclose(got, want, atol=1e-5)
    seen = []
    real = training_policy.reply_logps
    monkeypatch.setattr(training_policy, "reply_logps", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    train_policy(engine, [PolicyCall("c", MESSAGES, "Species: setosa", 1.0)], None, tmp_path / "r",
                 LoraSettings(rank=4, alpha=8), PolicySettings(rollout_temperature=0.7), progress=False)
    assert seen and set(seen) == {0.7}  # old and new log-probs alike


def updates_of(engine, calls, tmp_path, lora, policy, start=None):
    """Each optimizer step's gradients (after clipping, before the step) and the report."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    grads = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    try:
        report = train_policy(engine, calls, start, tmp_path, lora, policy, progress=False)
    finally:
        handle.remove()
    return grads, report


CALLS = [PolicyCall("classify", MESSAGES, "Reasoning: small petals\nSpecies: setosa", 0.5),
         PolicyCall("classify", MESSAGES, "Species: virginica", -0.5),
         PolicyCall("query", MESSAGES[:1] + [{"role": "user", "content": "Flower: a long and winding description"}],
                    "Query: petals", 1.0)]


def test_a_micro_batched_update_gives_micro_batch_1s_loss_and_gradients(engine, tmp_path):
    import torch

    policy = PolicySettings(updates_per_round=1, policy_learning_rate=1e-3)
    one, r1 = updates_of(engine, CALLS, tmp_path / "one", LoraSettings(rank=4, alpha=8, micro_batch_size=1), policy)
    three, r3 = updates_of(engine, CALLS, tmp_path / "three", LoraSettings(rank=4, alpha=8, micro_batch_size=3), policy)
    assert (r1.micro_batch, r3.micro_batch) == (1, 3) and r1.loss == pytest.approx(r3.loss, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one[0], three[0])) and any(a.abs().sum() > 0 for a in one[0])


def test_lora_training_weighs_each_call_alike_at_any_micro_batch_size(engine):
    import torch

    from tandem.training.lora import attach_adapter, detach_adapter, reply_loss, tokenize_chat, training_autocast

    convs = [MESSAGES + [{"role": "assistant", "content": reply}] for reply in ("Species: setosa", "No.",
                                                                                   "Reasoning: long " * 5)]
    rows = [tokenize_chat(engine.tokenizer, engine.prompt_text, c) for c in convs]
    model, params, previous = attach_adapter(engine.model, "probe", LoraSettings(rank=4, alpha=8))
    try:
        with torch.no_grad():  # a nonzero B, so the adapter's A gets a gradient too
            for p in params:
                p.normal_(0, 0.1)
        device, autocast = training_autocast(model)
        grads = []
        for chunks in ([[r] for r in rows], [rows]):
            loss = sum(reply_loss(model, chunk, 0, device, autocast).sum() for chunk in chunks) / len(rows)
            loss.backward()
            grads.append((float(loss), [p.grad.clone() for p in params]))
            for p in params:
                p.grad = None
        (l1, g1), (l3, g3) = grads
        assert l1 == pytest.approx(l3, abs=1e-6) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g3))
    finally:
        detach_adapter(model, "probe", previous)
        engine.model = model


def test_dropout_does_not_move_the_on_policy_ratio_and_later_steps_are_clipped(engine, tmp_path):
    lora = LoraSettings(rank=4, alpha=8, dropout=0.5)
    policy = PolicySettings(updates_per_round=3, policy_learning_rate=5e-2)
    first = train_policy(engine, CALLS, None, tmp_path / "1", lora, policy, progress=False)
    assert first.clip_fraction > 0  # steps 2 and 3 are off-policy: the lr moved the ratios past the clip
    second = train_policy(engine, CALLS, str(tmp_path / "1" / "adapter"), tmp_path / "2", lora, policy, progress=False)
    assert second.onpolicy_ratio_error < 1e-5  # a trained adapter, dropout 0.5: still exactly on-policy


def test_kl_to_the_base_model_is_measured_and_pulls_back(engine, tmp_path):
    import torch

    lora = LoraSettings(rank=4, alpha=8)
    moved = train_policy(engine, CALLS, None, tmp_path / "1", lora, PolicySettings(updates_per_round=1,
                         policy_learning_rate=5e-2), progress=False)
    assert moved.kl is None  # kl_coef 0: not computed
    start = str(tmp_path / "1" / "adapter")
    back = [replace(c, advantage=0.0) for c in CALLS]  # only the KL term pulls
    report = train_policy(engine, back, start, tmp_path / "2", lora,
                          PolicySettings(updates_per_round=1, kl_coef=1.0, policy_learning_rate=2e-2), progress=False)
    assert report.kl > 0

    def gap(adapter):
        ids, _, prompt, _ = policy_tokens(engine.tokenizer, engine.prompt_text, CALLS[0])
        with torch.no_grad():
            with engine.using_adapter(None) as model:
                base = reply_logps(model, [(ids, prompt)], 0, torch.device("cpu"))[0]
            with engine.using_adapter(adapter) as model:
                tuned = reply_logps(model, [(ids, prompt)], 0, torch.device("cpu"))[0]
        return float((tuned - base).abs().sum())

    assert gap(str(tmp_path / "2" / "adapter")) < gap(start)


def test_calls_with_no_token_the_model_chose_are_counted_and_all_of_them_said_so(engine, tmp_path):
    lora, policy = LoraSettings(rank=4, alpha=8), PolicySettings(updates_per_round=1)
    written = PolicyCall("c", MESSAGES, "Species:", 1.0, forced=((0, len("Species:")),), token_ids=tuple(
        engine.tokenizer("Species:", add_special_tokens=False)["input_ids"]))  # no end token: cut at the limit
    report = train_policy(engine, [written, CALLS[0]], None, tmp_path / "1", lora, policy, progress=False)
    assert report.calls == 1 and report.no_loss_tokens == 1
    with pytest.raises(ValueError, match="none of 1 calls has a reply token the model chose"):
        train_policy(engine, [written], None, tmp_path / "2", lora, policy, progress=False)
