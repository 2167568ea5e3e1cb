"""tandem from DSPy (tandem.integrations.dspy, `tandem export --format dspy`): DSPy's own BootstrapFinetune
and BetterTogether train through TandemProvider on the tiny model behind a real vLLM server (conftest's
`server`), the adapter is served by that server and answers as peft does; DSPy's internals the provider
relies on are checked by name. Needs dspy (pip install -e '.[dspy]') and, for the server, vLLM."""

import inspect
import json
import re

import pytest

dspy = pytest.importorskip("dspy", reason="DSPy is not installed: pip install -e '.[dspy]'")

from dspy.clients.provider import Provider, TrainingJob  # noqa: E402
from dspy.clients.utils_finetune import TrainDataFormat  # noqa: E402
from dspy.utils import DummyLM  # noqa: E402

from tandem.errors import UsageError  # noqa: E402
from tandem.integrations.dspy import TESTED, TandemJob, TandemProvider, job_weights, lora_settings  # noqa: E402
from tandem.settings import LoraSettings  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
PROMPTS = ["Hello there.", "What is the capital of France?", "Count to five."]
LORA = LoraSettings(rank=4, alpha=8, epochs=1, learning_rate=1e-2)  # high enough that replies move
CHAT = [{"messages": [{"role": "user", "content": "word: a"}, {"role": "assistant", "content": "reply: ok"}]}]


def right(example, prediction, trace=None) -> float:
    return float(prediction.reply == example.reply)


def examples(words):
    return [dspy.Example(word=w, reply=f"ok {w}").with_inputs("word") for w in words]


def student_and_teacher(lm):
    """A one-module DSPy program on `lm`, and its teacher: the same program answering right through
    DSPy's DummyLM, so a random tiny model still gets traces to learn from."""
    student = dspy.Predict("word -> reply")
    student.set_lm(lm)
    teacher = student.deepcopy()
    teacher.set_lm(DummyLM({w: {"reply": f"ok {w}"} for w in WORDS}))
    return student, teacher


def server_processes() -> set[int]:
    """Model servers (vLLM's or SGLang's) this test session started, by process id: the fixture's, and any
    that DSPy's providers would launch (DSPy's local provider starts SGLang's as a child process)."""
    import psutil

    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:  # a child that just exited
            continue
        if "vllm.entrypoints.openai.api_server" in cmdline or "sglang.launch_server" in cmdline:
            found.add(child.pid)
    return found


def served(url) -> list[str]:
    import httpx

    return [m["id"] for m in httpx.get(f"{url}/models", timeout=10).json()["data"]]


# -- no server: the interface DSPy offers, the settings mapped or refused ------------------------------


def test_dspy_internals():
    """What TandemProvider relies on in DSPy (see the docstring of tandem.integrations.dspy), as of DSPy
    `TESTED`. A DSPy release that changes one fails here, naming it: then read its provider code again
    and move the pin in pyproject.toml."""
    print(f"DSPy {dspy.__version__}; the provider was written against {TESTED}")
    finetune = list(inspect.signature(Provider.finetune).parameters)
    assert finetune == ["job", "model", "train_data", "train_data_format", "train_kwargs"], \
        f"Provider.finetune: {finetune}"
    made = list(inspect.signature(TrainingJob.__init__).parameters)
    assert made == ["self", "thread", "model", "train_data", "train_data_format", "train_kwargs"], \
        f"TrainingJob.__init__: {made}"
    for hook in ("launch", "kill"):
        assert list(inspect.signature(getattr(Provider, hook)).parameters) == ["lm", "launch_kwargs"], \
            f"Provider.{hook}"
    base = Provider()
    assert base.finetunable is False and base.TrainingJob is TrainingJob, "Provider: finetunable, TrainingJob"
    assert TrainDataFormat.CHAT == "chat", "TrainDataFormat.CHAT"
    lm_args = inspect.signature(dspy.LM.__init__).parameters
    assert "provider" in lm_args and "finetuning_model" in lm_args, "dspy.LM(provider=, finetuning_model=)"

    class Recording(Provider):  # how LM.finetune calls a provider, and what it makes of the answer
        def __init__(self):
            super().__init__()
            self.finetunable, self.calls = True, []

        def finetune(self, **kwargs):
            self.calls.append(kwargs)
            return "openai/tuned"

    provider = Recording()
    lm = dspy.LM("openai/base", api_base="http://127.0.0.1:9/v1", api_key="none", provider=provider,
                 finetuning_model="weights")
    tuned = lm.finetune(CHAT, TrainDataFormat.CHAT, {"rank": 4}).result()
    (call,) = provider.calls
    assert sorted(call) == ["job", "model", "train_data", "train_data_format", "train_kwargs"], \
        f"LM._run_finetune_job calls provider.finetune with {sorted(call)}"
    assert call["model"] == "weights", "LM.finetune passes finetuning_model as model"
    assert isinstance(call["job"], TrainingJob) and call["train_kwargs"] == {"rank": 4}
    assert isinstance(tuned, dspy.LM) and tuned.model == "openai/tuned", "the tuned LM is LM.copy(model=<name>)"
    dspy.LM("openai/base", provider=provider).finetune(CHAT, TrainDataFormat.CHAT).result()
    assert provider.calls[-1]["model"] == "openai/base", "without finetuning_model, LM.finetune passes LM.model"
    assert tuned.kwargs["api_base"] == "http://127.0.0.1:9/v1" and tuned.provider is provider, "LM.copy keeps both"
    data = dspy.ChatAdapter().format_finetune_data(dspy.Predict("word -> reply").signature, [], {"word": "a"},
                                                   {"reply": "ok"})
    assert set(data) == {"messages"} and data["messages"][-1]["role"] == "assistant", "chat data: {'messages'}"
    state = dspy.Predict("word -> reply").dump_state()
    assert set(state) == {"traces", "train", "demos", "signature", "lm"}, f"Predict.dump_state: {sorted(state)}"
    assert set(state["signature"]) == {"instructions", "fields"}, "Signature.dump_state"
    assert set(state["signature"]["fields"][0]) == {"prefix", "description"}, "Signature.dump_state fields"
    assert [n for n, _ in dspy.ChainOfThought("a -> b").named_predictors()] == ["predict"], "ChainOfThought.predict"


def test_dspy_train_kwargs_map_onto_tandems_lora_settings():
    mapped = lora_settings(LoraSettings(), {"num_train_epochs": 2.0, "per_device_train_batch_size": 2,
                                            "gradient_accumulation_steps": 4, "learning_rate": 1e-3,
                                            "max_seq_length": 1024, "rank": 8, "use_peft": True, "packing": False})
    assert mapped == LoraSettings(epochs=2, micro_batch_size=2, batch_size=8, learning_rate=1e-3, max_length=1024,
                                  rank=8)


@pytest.mark.parametrize("kwargs,needle", [
    ({"bf16": True}, "train_kwargs 'bf16' is not a setting of tandem's LoRA training"),
    ({"use_peft": False}, "use_peft=False asks for full fine-tuning"),
    ({"num_train_epochs": 2.5}, "epochs must be a whole number"),
    ({"rank": 0}, "rank must be >= 1"),
])
def test_a_refused_dspy_kwarg_is_one_line_before_anything_runs(kwargs, needle, tmp_path):
    """Through DSPy's own LM.finetune; the provider's server is not even reachable: nothing was asked of it."""
    lm = dspy.LM("openai/base", api_base="http://127.0.0.1:9/v1", api_key="none",
                 provider=TandemProvider("http://127.0.0.1:9/v1", out_dir=tmp_path / "jobs"), finetuning_model="w")
    job = lm.finetune(CHAT, TrainDataFormat.CHAT, kwargs)
    error = job.result()
    assert isinstance(error, UsageError) and needle in str(error) and "\n" not in str(error), error
    assert isinstance(job, TandemJob) and job.status() == "failed"
    assert not (tmp_path / "jobs").exists()


def test_a_server_that_cannot_load_adapters_is_refused_before_training(no_lora_server, tiny_model_dir, tmp_path):
    url = no_lora_server
    lm = dspy.LM("openai/m", api_base=url, api_key="none", provider=TandemProvider(url, out_dir=tmp_path / "jobs"),
                 finetuning_model=tiny_model_dir)
    error = lm.finetune(CHAT, TrainDataFormat.CHAT).result()
    assert isinstance(error, UsageError) and "\n" not in str(error)
    assert str(error).startswith(f"the server at {url} cannot load adapters at runtime: start vLLM's server with "
                                 "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
    assert not (tmp_path / "jobs").exists()  # nothing trained, nothing written


def test_model_ids_are_kept_whole_and_only_the_lms_provider_prefix_is_dropped():
    """DSPy passes `finetuning_model` as written, or without one the LM's own "<provider>/<served name>"; the
    server's model list tells which (vLLM lists each name with the weights it runs, its `root`)."""
    bases = {"openai/gpt-oss-20b": "openai/gpt-oss-20b", "tiny": "/models/tiny", "Qwen/Qwen2.5-0.5B": None}
    assert job_weights("openai/gpt-oss-20b", bases) == ("openai/gpt-oss-20b", "openai/gpt-oss-20b")  # as given
    assert job_weights("openai/openai/gpt-oss-20b", bases) == ("openai/gpt-oss-20b", "openai/gpt-oss-20b")  # LM's
    assert job_weights("openai/tiny", bases) == ("/models/tiny", "tiny")  # dspy.LM("openai/tiny"), no finetuning_model
    assert job_weights("hosted_vllm/Qwen/Qwen2.5-0.5B", bases) == ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B")
    assert job_weights("openai/other-weights", bases) == ("openai/other-weights", None)  # a hub id, kept whole
    assert job_weights("/data/tiny", bases) == ("/data/tiny", None)


def test_the_exported_dspy_state_loads_in_dspy_and_renders_the_same_demos(tmp_path):
    """A tandem run (scripted LM, Π finds demos) exported for DSPy: the README's program loads program.json,
    and DSPy's ChatAdapter shows the demos tandem chose, in its order, under tandem's instructions."""
    from test_custom import labeler, rows, write_rows

    from tandem import ScriptedLM
    from tandem.cli import main
    from tandem.optimizers import OptimizeSettings, PromptSettings, better_together
    from tandem.tasks import data_task

    task = data_task(write_rows(tmp_path / "d.jsonl", rows()), "text -> label: warm|chilly",
                     instructions="Is the item warm or chilly?", program="cot")
    result = better_together(task.make_program(), ScriptedLM(labeler), "p", task.train, task.val, task.test,
                             task.metric, OptimizeSettings(prompts=PromptSettings(2, 2, 1)), run_dir=tmp_path / "run",
                             progress=False, config={"task": task.name, "task_source": task.source, "model": "m"})
    tandem_program = task.make_program().load(tmp_path / "run" / result.best / "program.json")
    demos = tandem_program.predict.demos
    assert demos, "Π should have chosen demos"
    out = tmp_path / "shipped"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--format", "dspy"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "program.json"]

    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code.split("print(")[0], scope)  # the class, program.load and set_lm; not the call to a server
    program = scope["program"]
    predict = program.predict.predict  # a dspy.ChainOfThought named `predict`, as tandem's module is
    fields = ("text", "reasoning", "label")
    assert [dict(d) for d in predict.demos] == [{k: d[k] for k in fields if k in d} for d in demos]
    assert predict.signature.instructions == "Is the item warm or chilly?"
    assert predict.signature.output_fields["label"].annotation.__args__ == ("warm", "chilly")
    messages = dspy.ChatAdapter().format(predict.signature, predict.demos, {"text": "item 99 is hot"})
    shown = "\n".join(m["content"] for m in messages)
    positions = [shown.index(f"[[ ## text ## ]]\n{d['text']}") for d in demos]
    assert positions == sorted(positions) and all(f"[[ ## label ## ]]\n{d['label']}" in shown for d in demos)
    assert program.predict.predict.lm.model == "openai/MODEL"


# -- DSPy's optimizers on the tiny model behind a real vLLM server -----------------------------------------


@pytest.fixture(scope="module")
def local(tiny_vllm_model_dir):
    from tandem.lm.local import LocalLM

    lm = LocalLM(tiny_vllm_model_dir, dtype="float32")
    yield lm
    lm.close()


def server_lm(server, weights, provider):
    return dspy.LM("openai/tiny", api_base=server, api_key="none", provider=provider, finetuning_model=weights,
                   temperature=0.0, max_tokens=12, cache=False)


def test_bootstrap_finetune_trains_one_adapter_the_server_serves(server, tiny_vllm_model_dir, local, tmp_path):
    """DSPy's BootstrapFinetune through TandemProvider: one LoRA trained with tandem's trainer, loaded into
    the running server, answering there as peft answers here; a repeated job reuses it; no server starts."""
    from tandem.lm import Request

    before = server_processes()
    assert before, "the fixture's server should be one of this session's processes"
    provider = TandemProvider(server, out_dir=tmp_path / "jobs", lora=LORA, served_model_name="tiny", progress=False)
    lm = server_lm(server, tiny_vllm_model_dir, provider)
    student, teacher = student_and_teacher(lm)
    tuned = dspy.BootstrapFinetune(metric=right).compile(student, trainset=examples(WORDS[:4]), teacher=teacher)

    (job,) = provider.jobs
    assert not job.reused and tuned.lm.model == job.model and job.model.startswith("openai/tandem-")
    assert job.model.removeprefix("openai/") in served(server)  # loaded into the running server
    assert {p.name for p in job.folder.iterdir()} == {"adapter", "train.jsonl", "job.json"}
    record = json.loads((job.folder / "job.json").read_text())
    assert record["calls"] == 4 and record["lora"]["rank"] == 4
    assert record["training"]["steps"] >= 10 and record["training"]["tokens_per_second"] > 0
    assert record["training"]["last_loss"] < record["training"]["first_loss"]

    adapter = str(job.folder / "adapter")
    through_dspy = [tuned.lm(p)[0].strip() for p in PROMPTS]
    with_peft = [c.text for c in local.generate([Request(({"role": "user", "content": p},), max_new_tokens=12,
                                                         adapter=adapter) for p in PROMPTS])]
    assert through_dspy == with_peft
    assert through_dspy != [lm(p)[0].strip() for p in PROMPTS]  # the adapter changed the replies

    student, teacher = student_and_teacher(lm)
    again = dspy.BootstrapFinetune(metric=right).compile(student, trainset=examples(WORDS[:4]), teacher=teacher)
    assert provider.jobs[1].reused and again.lm.model == job.model
    assert server_processes() == before  # the same server throughout: nothing launched, nothing relaunched


def test_better_together_p_w_runs_its_weight_step_on_the_server(server, tiny_vllm_model_dir, tmp_path):
    """DSPy's BetterTogether("p -> w") with TandemProvider: the weight step succeeds (DSPy would log a
    failed step and return the prompt-only program) and its program calls the adapter on the same server."""
    before = server_processes()
    provider = TandemProvider(server, out_dir=tmp_path / "jobs", lora=LORA, progress=False)
    student, teacher = student_and_teacher(server_lm(server, tiny_vllm_model_dir, provider))
    optimizer = dspy.BetterTogether(metric=right, p=dspy.BootstrapFewShot(metric=right, max_bootstrapped_demos=1,
                                                                          max_labeled_demos=0),
                                    w=dspy.BootstrapFinetune(metric=right))
    # The teacher goes to each step by name: BetterTogether's own `teacher=` reaches BootstrapFewShot as a list.
    best = optimizer.compile(student, trainset=examples(WORDS[:4]), valset=examples(WORDS[4:]), strategy="p -> w",
                             optimizer_compile_args={"p": {"teacher": teacher}, "w": {"teacher": teacher}},
                             max_errors=100, seed=0)
    assert not best.flag_compilation_error_occurred
    steps = {c["strategy"]: c["program"] for c in best.candidate_programs}
    assert set(steps) == {"", "p", "p -> w"}
    (job,) = provider.jobs
    assert steps["p -> w"].lm.model == job.model and steps["p"].lm.model == "openai/tiny"
    assert job.model.removeprefix("openai/") in served(server)
    assert server_processes() == before


def test_a_rank_above_the_servers_max_lora_rank_is_refused_before_training(server, tiny_vllm_model_dir, tmp_path):
    """The fixture's server takes ranks up to 16 (--max-lora-rank 16): a rank-32 job is refused in one line
    naming the server, its limit and what to do, before the weights are copied or anything is written."""
    provider = TandemProvider(server, out_dir=tmp_path / "jobs", lora=LORA, served_model_name="tiny", progress=False)
    error = server_lm(server, tiny_vllm_model_dir, provider).finetune(CHAT, TrainDataFormat.CHAT, {"rank": 32}).result()
    assert isinstance(error, UsageError) and "\n" not in str(error), error
    assert str(error) == (f"the server at {server} takes LoRA ranks up to 16 (its --max-lora-rank) and this run "
                          "trains rank 32: restart it with --max-lora-rank 32, or train with --rank 16")
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())  # the probe left nothing
    assert all(engine._trainer is None for engine in provider._engines.values())  # no copy of the weights made
    assert not any(name.startswith("tandem-probe") for name in served(server))  # the probe loaded nothing


def test_the_provider_saves_with_the_program_and_keeps_an_openai_model_id(server, tiny_vllm_model_dir, tmp_path,
                                                                          monkeypatch):
    """Weights named "openai/<name>" (a model id in the openai organisation; here a folder of that name)
    train as named; the tuned program, provider and trained engine inside, saves with DSPy's
    `save_program=True` (cloudpickle) and loads back into a provider that works: the repeated job reuses
    the adapter through an engine made again, and the loaded program answers as the saved one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai").mkdir()
    (tmp_path / "openai" / "tiny-weights").symlink_to(tiny_vllm_model_dir)
    provider = TandemProvider(server, out_dir=tmp_path / "jobs", lora=LORA, served_model_name="tiny", progress=False)
    lm = server_lm(server, "openai/tiny-weights", provider)
    data = [{"messages": [{"role": "user", "content": f"word: {w}"}, {"role": "assistant", "content": f"ok {w}"}]}
            for w in WORDS[:3]]
    tuned = lm.finetune(data, TrainDataFormat.CHAT).result()
    assert isinstance(tuned, dspy.LM), tuned
    (job,) = provider.jobs
    assert job.record["weights"] == "openai/tiny-weights" and not job.reused

    program = dspy.Predict("word -> reply")
    program.set_lm(tuned)
    program.save(str(tmp_path / "saved"), save_program=True)
    loaded = dspy.load(str(tmp_path / "saved"), allow_pickle=True)
    again = loaded.lm.provider
    assert isinstance(again, TandemProvider) and again is not provider and again._engines == {}
    assert [j.model for j in again.jobs] == [job.model]
    assert loaded.lm.model == tuned.model and loaded.lm(PROMPTS[0]) == tuned(PROMPTS[0])
    reloaded = loaded.lm.copy(model=lm.model).finetune(data, TrainDataFormat.CHAT).result()
    assert isinstance(reloaded, dspy.LM) and reloaded.model == job.model and again.jobs[-1].reused
