"""tandem as DSPy's fine-tuning provider (`pip install tandem[dspy]`): DSPy's `BootstrapFinetune`, and
`BetterTogether` with it, train one LoRA adapter with tandem's trainer and have it served by the vLLM
server the program already calls. No merge, no copy of the model, no server relaunch.

    from tandem.integrations.dspy import TandemProvider

    lm = dspy.LM("openai/smol", api_base=URL, api_key="none", provider=TandemProvider(URL, out_dir="dspy-jobs"),
                 finetuning_model="HuggingFaceTB/SmolLM2-135M-Instruct")   # the weights the server runs
    program.set_lm(lm)

A job: DSPy hands the provider the chat data of its program's calls; the provider trains one LoRA
(`train_lora`, through `training.finetune` over the openai engine, on a local copy of the weights `finetuning_model`
names, kept whole: "openai/gpt-oss-20b" is a model id, see `job_weights`), loads it into the server at
runtime (vLLM's /v1/load_lora_adapter; a server that cannot, or not at the job's LoRA rank, is refused
before training, in one line) and returns "openai/<adapter name>", which DSPy makes the LM of the tuned
program. Training runs where `device` says (lm/trainer_copy.py: `auto` takes a GPU only where the copy
fits beside the server, else the CPU, in one line), and the copy leaves the GPU after each job. DSPy's `train_kwargs` set tandem's `LoraSettings` where they mean the same thing
(`lora_settings`); any other is refused by name, in one line.

Each job is a folder `out_dir/<key>/`: train.jsonl (the data), adapter/ (PEFT safetensors; its
training.json has every loss) and job.json (the weights, the settings and the training record: loss,
steps, tokens/s), written last. The key hashes the weights, the data and the settings, so a repeated
job loads the adapter it trained before instead of training again.

DSPy internals relied on, as of dspy 3.4.1 (`TESTED`); tests/test_dspy.py::test_dspy_internals checks
each, so a DSPy release that changes one fails there by name:
- `Provider` (dspy/clients/provider.py): `finetunable`, `TrainingJob` (the class `LM.finetune` makes a
  job of), `launch(lm, launch_kwargs)` and `kill(lm, launch_kwargs)`; `LM._run_finetune_job` calls
  `provider.finetune(job=, model=, train_data=, train_data_format=, train_kwargs=)` in a thread and
  makes the tuned LM with `LM.copy(model=<returned name>)`, so the tuned LM keeps `api_base` and the
  provider. `LM.finetune` passes `finetuning_model or model` as `model`.
- `TrainingJob(thread=, model=, train_data=, train_data_format=, train_kwargs=)`, a Future with an
  abstract `status()`; `TrainDataFormat.CHAT` data is `{"messages": [...]}`, the reply last.
- DSPy deep-copies programs (`Module.deepcopy`), their LMs with them: the provider copies as itself.
- `Module.save(path, save_program=True)` pickles the program with cloudpickle, its LMs and their provider
  with it (`dspy.load(path, allow_pickle=True)` reads it back): the provider pickles without its engines.
- `Program.load`'s JSON layout, which `tandem export --format dspy` writes (export.py, `dspy_state`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Mapping, Sequence

from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat, TrainingStatus

from ..errors import UsageError
from ..lm.base import Message
from ..lm.models import ModelNotFoundError, resolve_model
from ..lm.openai_server import OpenAIEngine
from ..rundir import versions, write_json
from ..settings import LoraSettings
from ..training.lora import finetune

log = logging.getLogger(__name__)

TESTED = "3.4.1"  # the DSPy release these internals were read from and tested with (pyproject pins >=3.4.1,<3.5)

# DSPy's names (its local provider's, OpenAI's) for settings tandem's LoRA training has under another name.
DSPY_NAMES = {"num_train_epochs": "epochs", "n_epochs": "epochs", "per_device_train_batch_size": "micro_batch_size",
              "max_seq_length": "max_length"}
# Options that state what tandem does anyway: accepted at that value, refused (with why) at any other.
TANDEM_DOES = {"use_peft": (True, "tandem trains one LoRA adapter, use_peft=False asks for full fine-tuning"),
               "packing": (False, "tandem batches whole calls by length and does not pack them")}
ACCUMULATION = "gradient_accumulation_steps"  # micro-batches per step: tandem's batch_size = micro_batch_size x it
OUTPUT_DIR = "output_dir"  # where this job's folder goes (default: the provider's out_dir)
JOB = "job.json"


@dataclass(frozen=True)
class Job:
    """One job the provider ran or reused: its folder, the model name DSPy's tuned LM asks for, and job.json."""

    folder: Path
    model: str
    reused: bool
    record: dict[str, Any]


class TandemJob(TrainingJob):
    """DSPy's handle on one job: a Future that DSPy's thread resolves with the tuned LM, or with the error."""

    def status(self) -> TrainingStatus:
        if not self.done():
            alive = self.thread is not None and self.thread.is_alive()
            return TrainingStatus.running if alive else TrainingStatus.pending
        return TrainingStatus.failed if isinstance(self.result(), Exception) else TrainingStatus.succeeded


class TandemProvider(Provider):
    """DSPy's fine-tuning provider for a model behind a vLLM server that loads adapters at runtime.

    `base_url`: the server, the `api_base` of the LM it tunes; or a list of servers serving the same weights,
    each of which gets every adapter. The LM's `api_base` must be one of them (refused otherwise: a router in
    front of them would pass an adapter load to one replica only). `out_dir`: where job folders go. `lora`:
    the LoRA settings jobs start from (DSPy's train_kwargs override them per job). `served_model_name`:
    the server's name for the base model (default: the one base model it lists). `device`: where
    training runs: cpu, cuda, cuda:1, or auto: the first CUDA GPU where the copy of the weights fits in
    its free memory beside what the server holds there, else the CPU, said in one line (a named GPU
    without room is refused in one line; lm/trainer_copy.py). `dtype`: the copy's dtype, as tandem's
    `--dtype` (auto: bf16 on a GPU; on a CPU bf16 only where it times faster than fp32).

    Jobs are checked before anything trains: the server loads adapters at runtime and takes their
    rank (its --max-lora-rank). The provider pickles with the program (DSPy's `save_program=True`): its
    engines and lock are made again where it is loaded, its finished jobs kept.
    """

    def __init__(self, base_url: str | Sequence[str], *, out_dir: str | os.PathLike = "tandem-dspy",
                 lora: LoraSettings | None = None,
                 api_key: str | None = None, served_model_name: str | None = None, device: str = "auto",
                 dtype: str = "auto", progress: bool = True):
        super().__init__()
        self.finetunable = True
        self.TrainingJob = TandemJob
        self.base_urls = [u.rstrip("/") for u in ([base_url] if isinstance(base_url, str) else base_url)]
        self.base_url = self.base_urls[0]
        self.out_dir = Path(out_dir)
        self.lora = lora or LoraSettings()
        self.api_key = api_key
        self.served_model_name = served_model_name
        self.device = device
        self.dtype = dtype
        self.progress = progress
        self.jobs: list[Job] = []  # in the order DSPy asked for them
        self._live()

    def _live(self) -> None:
        """What lives only in this process: engines (a client, threads, the local copy of the weights) and
        the lock; made here and again where a pickled provider is loaded."""
        self._engines: dict[str, Any] = {}  # weights -> OpenAIEngine, so the local copy loads once
        self._lock = threading.Lock()  # one job at a time: jobs share that copy

    def __getstate__(self) -> dict[str, Any]:
        """What DSPy's `save_program=True` pickles: the settings and the jobs, not the live part (`_live`)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_engines", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._live()

    def __deepcopy__(self, memo) -> "TandemProvider":
        """A handle on a server and a folder: DSPy deep-copies programs with their LMs, and the copies
        must share it (a copy would also load the weights a second time)."""
        return self

    def launch(self, lm, launch_kwargs: dict[str, Any] | None = None) -> None:
        """Nothing starts: the server is the user's. DSPy calls this before it uses an LM (BetterTogether)."""
        self._check_same_server(lm)

    def kill(self, lm, launch_kwargs: dict[str, Any] | None = None) -> None:
        """Nothing stops: the server keeps serving. DSPy calls this before each job (BootstrapFinetune)."""
        self._check_same_server(lm)

    def _check_same_server(self, lm) -> None:
        """Refuse an LM whose `api_base` is none of the servers the adapters are loaded into."""
        url = lm.kwargs.get("api_base") or lm.kwargs.get("base_url")
        if url and url.rstrip("/") not in self.base_urls:
            raise UsageError(f"the LM {lm.model} calls {url}, but TandemProvider loads adapters into "
                             f"{', '.join(self.base_urls)}: give both the same server")

    def finetune(self, job: TrainingJob, model: str, train_data: list[dict[str, Any]],
                 train_data_format: TrainDataFormat | str | None, train_kwargs: dict[str, Any] | None = None) -> str:
        """Train (or reuse) one adapter on `train_data`, load it into the server, return the model name for it."""
        if train_data_format != TrainDataFormat.CHAT:
            raise UsageError(f"TandemProvider trains on chat data (DSPy's ChatAdapter), not {train_data_format!r}")
        kwargs = dict(train_kwargs or {})
        root = Path(kwargs.pop(OUTPUT_DIR, None) or self.out_dir)
        settings = lora_settings(self.lora, kwargs)
        conversations = chat_conversations(train_data)
        with self._lock:
            weights, engine = self._engine(model)
            # every server loads adapters at runtime, reads or receives them, and takes this job's rank: found
            # before anything is written or trained
            engine.check_adapters(root, settings.rank)
            folder = root / job_key(weights, conversations, settings)
            record = read_job(folder)
            reused = record is not None
            if reused:
                log.info("TandemProvider: %s holds this job's adapter (same weights, data, settings)", folder)
            else:
                record = self._train(engine, folder, weights, conversations, settings)
            name = "openai/" + engine.load_adapter(str(folder / "adapter"))
            self.jobs.append(Job(folder, name, reused, record))
        return name

    def _engine(self, model: str):
        """(weights, engine): the weights DSPy's `model` names (`job_weights`) and the server as tandem's openai
        engine training on them; a server that cannot load adapters at runtime is refused here, before
        anything trains."""
        bases = served_bases(self.base_url, self.api_key)
        weights, served = job_weights(model, bases)
        if weights not in self._engines:
            try:
                resolve_model(weights)
            except ModelNotFoundError as exc:
                raise UsageError(f"TandemProvider trains on the weights the server runs: give dspy.LM "
                                 f"finetuning_model=<their folder or hub id> ({exc})") from None
            served = self.served_model_name or served or base_model_name(self.base_url, bases)
            engine = OpenAIEngine(weights, self.base_urls, served_model_name=served, api_key=self.api_key,
                                  dtype=self.dtype, device=self.device)
            self._engines[weights] = engine
        return weights, self._engines[weights]

    def _train(self, engine, folder: Path, weights: str, conversations: list[list[Message]],
               settings: LoraSettings) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
            for messages in conversations:
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        report = finetune(engine, conversations, folder / "adapter", settings, progress=self.progress)
        record = {
            "weights": weights, "base_url": self.base_url, "calls": len(conversations),
            "lora": dataclasses.asdict(settings),
            "training": {"first_loss": report.first_loss, "last_loss": report.last_loss, "steps": report.steps,
                         "epochs": report.epochs, "examples": report.examples, "tokens": report.tokens,
                         "tokens_per_second": report.tokens_per_second, "seconds": report.seconds,
                         "dropped_too_long": report.dropped_too_long, "device": report.device, "dtype": report.dtype},
            "versions": {**versions(), "dspy": package_version("dspy")},
        }
        write_json(folder / JOB, record)  # last: a folder without it was not finished and is trained again
        log.info("TandemProvider: trained %s on %d calls: %d steps, loss %.3f -> %.3f, %.0f tok/s", folder,
                 len(conversations), report.steps, report.first_loss, report.last_loss, report.tokens_per_second)
        return record


def lora_settings(base: LoraSettings, train_kwargs: Mapping[str, Any]) -> LoraSettings:
    """`base` with DSPy's train_kwargs applied: tandem's own names (`rank`, `epochs`, ...), DSPy's names for
    the same settings (`DSPY_NAMES`, `gradient_accumulation_steps`), and options that state what tandem
    does (`TANDEM_DOES`). Anything else is refused by name, in one line: a setting that silently does
    nothing is worse than none."""
    own = [f.name for f in dataclasses.fields(LoraSettings)]
    changes: dict[str, Any] = {}
    for key, value in train_kwargs.items():
        if key in TANDEM_DOES:
            wanted, why = TANDEM_DOES[key]
            if value != wanted:
                raise UsageError(f"train_kwargs {key}={value!r}: {why}")
        elif key in own or key in DSPY_NAMES:
            name = DSPY_NAMES.get(key, key)
            if name in changes and changes[name] != value:
                raise UsageError(f"train_kwargs set {name} twice: {changes[name]!r} and {key}={value!r}")
            changes[name] = value
        elif key != ACCUMULATION:
            raise UsageError(f"train_kwargs {key!r} is not a setting of tandem's LoRA training (it takes "
                             f"{', '.join(own)}; and DSPy's {', '.join(DSPY_NAMES)}, {ACCUMULATION}, "
                             f"use_peft=True, packing=False, {OUTPUT_DIR})")
    if "epochs" in changes:
        changes["epochs"] = _whole(changes["epochs"], "epochs")
    settings = dataclasses.replace(base, **changes)  # checks every bound: ConfigError names the field
    if ACCUMULATION in train_kwargs:
        micro = settings.micro_batch_size or 1  # accumulation counts micro-batches: their size must be fixed
        batch = micro * _whole(train_kwargs[ACCUMULATION], ACCUMULATION)
        if "batch_size" in changes and changes["batch_size"] != batch:
            raise UsageError(f"train_kwargs batch_size={changes['batch_size']} is not micro_batch_size x "
                             f"{ACCUMULATION} = {batch}")
        settings = dataclasses.replace(settings, batch_size=batch, micro_batch_size=micro)
    return settings


def _whole(value: Any, name: str) -> int:
    """A count given as 3 or 3.0 (Hugging Face's trainer takes float epochs; tandem trains whole ones)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise UsageError(f"train_kwargs {name} must be a whole number, got {value!r}")
    return int(value)


def chat_conversations(train_data: Sequence[Mapping[str, Any]]) -> list[list[Message]]:
    """DSPy's chat data (`{"messages": [...]}` each) as tandem's training conversations; refused in one line
    where it is empty (no run passed the metric) or a conversation does not end with the reply."""
    if not train_data:
        raise UsageError("no training data: DSPy passed no calls (did any run of the program pass the metric?)")
    conversations = []
    for i, item in enumerate(train_data):
        messages = item.get("messages") if isinstance(item, Mapping) else None
        if not messages or not all(isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in messages) \
                or messages[-1]["role"] != "assistant":
            raise UsageError(f"train_data[{i}] is not chat data ending with the assistant's reply: {str(item)[:200]}")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return conversations


def job_key(weights: str, conversations: list[list[Message]], settings: LoraSettings) -> str:
    """The content hash that names a job's folder: the same weights, data and settings make the same adapter."""
    payload = json.dumps({"weights": weights, "data": conversations, "lora": dataclasses.asdict(settings)},
                         sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_job(folder: Path) -> dict[str, Any] | None:
    """job.json of a finished job (its adapter in place), or None: a job never run, or killed mid-way."""
    path = folder / JOB
    if not path.is_file() or not (folder / "adapter" / "adapter_config.json").is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def served_bases(base_url: str, api_key: str | None = None) -> dict[str, str | None]:
    """The server's base models (vLLM lists adapters too, each with a `parent`): name -> `root`, the weights
    it says the name runs (vLLM: its --model), None where the server does not say."""
    import httpx

    try:
        response = httpx.get(f"{base_url}/models", timeout=30,
                             headers={"Authorization": f"Bearer {api_key or os.environ.get('OPENAI_API_KEY', 'none')}"})
        listed = response.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot list the models of an OpenAI-compatible server at {base_url} ({exc})") from None
    return {m["id"]: m.get("root") for m in listed if not m.get("parent")}


def base_model_name(base_url: str, bases: Mapping[str, str | None]) -> str:
    """The server's name for its base model: the one model it lists that is not an adapter, by its first
    name where it has several (one `root`). Several models: name one with `served_model_name=`."""
    if len({root or name for name, root in bases.items()}) != 1:
        raise UsageError(f"the server at {base_url} serves {', '.join(bases) or 'no model'}: name its base model "
                         "with TandemProvider(served_model_name=...)")
    return next(iter(bases))


def job_weights(model: str, bases: Mapping[str, str | None]) -> tuple[str, str | None]:
    """(weights, the server's name for them or None): what a job trains, from the `model` DSPy passed.

    DSPy's `LM.finetune` passes `finetuning_model` as the user wrote it, or, without one, the LM's own model,
    "<LiteLLM provider>/<the server's name>" (dspy.LM("openai/tiny")). Only in that second case is the part
    before the first "/" not part of the id, and the server's model list tells the cases apart: a name it
    serves as given is kept whole (finetuning_model="openai/gpt-oss-20b" served under that id); a name
    whose rest after the first "/" it serves is the LM's own, and trains the weights the server says that
    name runs (its `root`); anything else names weights as given (a folder, a hub id: "openai/..." too)."""
    if model in bases:
        return model, model
    _, slash, rest = model.partition("/")
    if slash and rest in bases:
        return bases[rest] or rest, rest
    return model, None
