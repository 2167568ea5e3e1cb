"""The real transformers/peft path, on a tiny randomly initialised model built in conftest."""

from pathlib import Path

import pytest
import torch

from tandem.lm import CachedLM, Request
from tandem.lm.local import LocalLM
from tandem.lm.models import ModelNotFoundError, resolve_model

PROMPTS = [
    "Hello there.",
    "What is the capital of France? Answer in one word, please, and be brief about it.",
    "Count to five.",
    "A longer prompt that goes on for a while so that the batch needs some left padding here.",
]


def requests(adapter=None, max_new_tokens=12):
    return [Request(({"role": "user", "content": p},), max_new_tokens=max_new_tokens, adapter=adapter) for p in PROMPTS]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    engine = LocalLM(tiny_model_dir, dtype="float32", max_batch=8, max_wait=0.05)
    yield engine
    engine.close()


def make_adapter(base_dir: str, out: Path, seed: int) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.5)  # large enough to change greedy choices of a random model
    peft_model.save_pretrained(out)
    return str(out)


def test_batched_greedy_equals_one_at_a_time(lm):
    batched = [c.text for c in lm.generate(requests())]
    single = [lm.generate([r])[0].text for r in requests()]
    assert batched == single
    assert all(c.completion_tokens <= 12 for c in lm.generate(requests()))


def test_a_shared_prompt_prefix_is_prefilled_once_with_the_same_replies(lm, tiny_model_dir):
    demos = "Follow the format of these examples.\n" + "\n".join(f"Question: {i} + {i}?\nAnswer: {2 * i}" for i in range(12))
    reqs = [Request(({"role": "system", "content": demos}, {"role": "user", "content": p}), max_new_tokens=10)
            for p in PROMPTS]
    shared_before = lm.usage.extra.get("shared_prefix_tokens", 0)
    together = [c.text for c in lm.generate(reqs)]
    assert lm.usage.extra["shared_prefix_tokens"] - shared_before > 3 * 100  # 3 rows reuse a 100+ token prefix
    unshared = LocalLM(tiny_model_dir, dtype="float32", max_batch=8, max_wait=0.05, min_shared_prefix=0)
    assert together == [c.text for c in unshared.generate(reqs)]
    assert together == [lm.generate([r])[0].text for r in reqs]  # and as one request at a time
    assert "shared_prefix_tokens" not in unshared.usage.extra or unshared.usage.extra["shared_prefix_tokens"] == 0
    unshared.close()


def test_per_request_token_limits_and_stops(lm):
    reqs = requests(max_new_tokens=12)
    short = Request(reqs[0].messages, max_new_tokens=3)
    out = lm.generate([short, reqs[0]])
    assert out[0].completion_tokens <= 3
    full = out[1].text
    assert full.startswith(out[0].text)
    # a stop string taken from the unconstrained reply cuts the reply right before it
    cut = full[len(full) // 2 :].strip()[:4]
    if cut:
        stopped = lm.generate([Request(reqs[0].messages, max_new_tokens=12, stop=(cut,))])[0].text
        assert cut not in stopped and full.startswith(stopped)


def test_cancel_stops_a_long_generation_within_a_step_and_the_engine_goes_on(lm):
    import threading

    from tandem.lm.batching import Cancelled

    errors = []

    def long_generation():
        try:
            lm.generate(requests(max_new_tokens=1000))  # the random tiny model does not stop by itself
        except Cancelled as exc:
            errors.append(str(exc))

    worker = threading.Thread(target=long_generation)
    worker.start()
    threading.Event().wait(0.5)
    lm.cancel()
    worker.join(60)
    assert len(errors) == 1 and "generation cancelled after" in errors[0]
    assert int(errors[0].split("after ")[1].split()[0]) < 1000
    assert lm.generate(requests(max_new_tokens=4))[0].completion_tokens <= 4  # later calls run as usual


def test_two_adapters_on_one_base_switch_without_reload(lm, tiny_model_dir, tmp_path):
    a = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    b = make_adapter(tiny_model_dir, tmp_path / "b", seed=2)
    base = [c.text for c in lm.generate(requests())]
    out_a = [c.text for c in lm.generate(requests(adapter=a))]
    out_b = [c.text for c in lm.generate(requests(adapter=b))]
    assert out_a != base and out_b != base and out_a != out_b
    base_weights = lm.model.get_base_model().model.embed_tokens.weight
    mixed = lm.generate(requests(adapter=a)[:2] + requests(adapter=None)[2:] + requests(adapter=b)[:1])
    assert [c.text for c in mixed] == out_a[:2] + base[2:] + out_b[:1]
    assert lm.model.get_base_model().model.embed_tokens.weight is base_weights  # same loaded base
    assert len(lm._adapters) == 2  # each adapter loaded once


def test_cache_hits_on_repeat_and_keys_on_adapter_content(lm, tiny_model_dir, tmp_path):
    cached = CachedLM(lm, tmp_path / "calls.sqlite")
    first = cached.generate(requests())
    engine_calls = lm.usage.requests
    again = cached.generate(requests())
    assert [c.text for c in again] == [c.text for c in first]
    assert all(c.cached for c in again) and lm.usage.requests == engine_calls

    adapter = make_adapter(tiny_model_dir, tmp_path / "w", seed=3)
    with_adapter = cached.generate(requests(adapter=adapter))
    assert not any(c.cached for c in with_adapter)
    make_adapter(tiny_model_dir, tmp_path / "w", seed=4)  # retrained in place: new content, new keys
    retrained = cached.generate(requests(adapter=adapter))
    assert not any(c.cached for c in retrained)
    cached.close()


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'not-a-model'"):
        resolve_model("not-a-model")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_cache_keys_on_the_engine_fingerprint_not_just_the_name(tmp_path):
    from tandem import ScriptedLM

    fp32, bf16 = ScriptedLM(lambda r: "a", name="m"), ScriptedLM(lambda r: "b", name="m")
    fp32.fingerprint, bf16.fingerprint = "m|float32", "m|bfloat16"
    path = tmp_path / "calls.sqlite"
    assert CachedLM(fp32, path).generate(requests()[:1])[0].text == "a"
    assert CachedLM(bf16, path).generate(requests()[:1])[0].text == "b"  # no stale hit from the other dtype


def test_mixed_token_limits_over_different_prompts_equal_one_at_a_time(lm):
    # Rows leave the batch at different steps: the cache rows that stay must be the right ones.
    reqs = [Request(r.messages, max_new_tokens=n) for r, n in zip(requests(), (3, 17, 1, 9))]
    batched = lm.generate(reqs)
    single = [lm.generate([r])[0] for r in reqs]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in single]


def test_a_reply_cut_at_its_token_limit_says_so(lm):
    cut = lm.generate([Request(requests()[1].messages, max_new_tokens=2)])[0]
    assert cut.completion_tokens == 2 and cut.finish_reason == "length"
    stopped = lm.generate([Request(requests()[1].messages, max_new_tokens=40, stop=(cut.text[-1],))])[0]
    assert stopped.finish_reason == "stop"


def test_a_sampled_request_gives_the_same_reply_whatever_shares_its_batch(lm):
    mine = Request(requests()[0].messages, max_new_tokens=12, temperature=1.0, seed=7)
    alone = lm.generate([mine])[0].text
    others = [Request(r.messages, max_new_tokens=n, temperature=1.0, seed=s)
              for r, n, s in zip(requests()[1:], (5, 20, 9), (1, 2, 3))]
    assert lm.generate([others[0], mine, *others[1:]])[1].text == alone
    assert lm.generate([*others, mine])[-1].text == alone
    other_seed = [lm.generate([Request(mine.messages, 12, 1.0, seed=s)])[0].text for s in range(8, 12)]
    assert any(text != alone for text in other_seed)  # the seed matters: this is sampling, not greedy


def test_the_cache_key_changes_with_every_sampling_field():
    base = Request(({"role": "user", "content": "hi"},), max_new_tokens=8, temperature=0.5, stop=("\nX:",), seed=1)
    variants = [Request(base.messages, 9, 0.5, ("\nX:",), seed=1), Request(base.messages, 8, 0.6, ("\nX:",), seed=1),
                Request(base.messages, 8, 0.5, ("\nY:",), seed=1), Request(base.messages, 8, 0.5, ("\nX:",), seed=2),
                Request(({"role": "user", "content": "ho"},), 8, 0.5, ("\nX:",), seed=1)]
    keys = {r.key("m") for r in [base, *variants]}
    assert len(keys) == 1 + len(variants)
    assert base.key("m") != base.key("m", adapter_digest="abc") and base.key("m") != base.key("other")


def test_results_are_matched_to_requests_or_it_is_an_error(tmp_path):
    from tandem.errors import EngineError
    from tandem import ScriptedLM
    from tandem.lm.batching import DynamicBatcher

    class Lossy(ScriptedLM):
        def generate(self, reqs):
            return super().generate(reqs)[:-1]  # drops the last reply

    cached = CachedLM(Lossy(lambda r: "x"), tmp_path / "calls.sqlite")
    with pytest.raises(EngineError, match="returned 1 results for 2 requests"):
        cached.generate(requests()[:2])
    batcher = DynamicBatcher(lambda items: items[:-1], max_batch=4, max_wait=0.01)
    with pytest.raises(RuntimeError, match="returned 2 results"):
        batcher.submit([1, 2, 3])  # fails the callers instead of leaving one waiting forever
    batcher.close()
