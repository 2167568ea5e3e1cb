"""Experiment tracking: a run reported to MLflow as it goes, beside its folder.

The run folder stays the record (step.json, reports, adapters); a tracker copies what it holds to
where people already compare experiments. The orchestrator, the grid and `tandem eval` call a
`Tracker` through a few methods; the default, `NO_TRACKING`, does nothing. A tracker only reads what
a step already recorded (its step.json and details, an adapter's training.json, the evaluation's
results) after the step is written, so a run's results are the same with tracking or without.

MLflow (`pip install 'tandem[mlflow]'`), in the store $MLFLOW_TRACKING_URI or else a SQLite store in
`<run-dir>/mlflow/`: one MLflow run per command (`optimize`: the strategy; `experiment`: the grid,
with a nested run per seed and strategy; `eval`: the evaluation) and a nested run per step, with the
settings as parameters, scores, failures, losses, rewards and candidate scores as metrics, the step
records and reports as artifacts, and one MLflow trace per evaluated example (a sample by default)
whose spans are the module calls. The run ids are kept in `<run-dir>/mlflow/runs.json`, so a resumed
run continues its MLflow run. Anything MLflow raises is one warning and the run goes on untracked: a
tracking failure never costs a run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .errors import UsageError
from .program import MODULE_LABELS, TraceEntry
from .settings import TrackingSettings

if TYPE_CHECKING:
    from .evaluate import EvalResult, ExampleResult

log = logging.getLogger(__name__)

INSTALL = "pip install 'tandem[mlflow]'"
STORE = "mlflow"  # the default store's folder in a run folder: mlflow.db, artifacts/, runs.json


class Tracker:
    """Where a run is reported besides its folder. This one does nothing (`NO_TRACKING`, the default);
    `MlflowTracker` sends the same calls to MLflow. A tracker is one run of the tracking backend, used
    as a context manager (`with tracker.child(...) as run:`) so it closes as FINISHED, FAILED or KILLED."""

    enabled = False
    adapters = False  # weight steps upload their adapters too (--track-adapters)

    def child(self, key: str, name: str, tags: Mapping[str, Any] | None = None) -> "Tracker":
        """The nested run `key` (a step's prefix, a grid's cell): the one recorded under it, or a new one."""
        return self

    def finished(self, key: str) -> bool:
        """Whether the nested run `key` was closed as finished before (a resumed run skips it)."""
        return False

    def params(self, values: Mapping[str, Any]) -> None:
        """Parameters, nested mappings flattened (`settings.weights.lora.rank`)."""

    def metrics(self, values: Mapping[str, float | None], step: int = 0) -> None:
        """Metrics at one step of their history (None values left out)."""

    def artifacts(self, paths: Sequence[Path], folder: str | None = None) -> None:
        """Files and folders copied to the run's artifacts (missing ones skipped)."""

    def traces(self, result: "EvalResult", name: str, tags: Mapping[str, Any] | None = None) -> None:
        """One trace per evaluated example of `result` (a sample), its spans the module calls."""

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run: FINISHED, FAILED (the command stopped on an error) or KILLED (interrupted)."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.finish("FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


NO_TRACKING = Tracker()


def open_tracker(settings: TrackingSettings, run_dir: str | Path | None, experiment: str) -> Tracker:
    """The tracker `settings` asks for (`NO_TRACKING` for none): its `child` runs are the command's
    top-level runs. `run_dir` holds the default store and the record of MLflow run ids (None, for
    `tandem eval`: MLflow's own default store, nothing resumed). `experiment`: the experiment's name
    unless --track-experiment or $MLFLOW_EXPERIMENT_NAME names one."""
    if settings.track == "none":
        return NO_TRACKING
    started = time.perf_counter()
    try:
        import mlflow  # noqa: F401  # the optional `mlflow` extra
    except ImportError:
        raise UsageError(f"--track mlflow needs MLflow: {INSTALL}") from None
    name = settings.track_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
    session = _Session(settings, Path(run_dir) if run_dir is not None else None, name)
    session.seconds += time.perf_counter() - started  # importing MLflow is part of the cost
    return _Root(session)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"weights": {"lora": {"rank": 16}}} -> {"weights.lora.rank": "16"}; other values as JSON."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return out


def sample(n_examples: int, setting: str) -> list[int]:
    """Which evaluated examples get a trace: the first N by index (the same ones at every step, so one
    example can be followed from step to step), or all of them."""
    return list(range(n_examples if setting == "all" else min(n_examples, int(setting))))


def key_of(name: str) -> str:
    """A metric or parameter name MLflow takes: alphanumerics and `_-. :/` (a failure kind may hold others)."""
    return re.sub(r"[^\w\-. :/]", "_", name)[:250]


# -- what a step recorded, as metrics -----------------------------------------------------------------


def step_metrics(record: Mapping[str, Any]) -> dict[str, float | None]:
    """A finished step's scores: val, test, failed runs (and by kind), the task's report metrics, time,
    and the figures of its details (training, data, metric calls)."""
    out: dict[str, float | None] = {"val": record["val"], "test": record["test"], "val_failed": record["val_errors"],
                                    "test_failed": record["test_errors"], "seconds": record["seconds"]}
    for split in ("val", "test"):
        for kind, n in record.get(f"{split}_failures", {}).items():
            out[f"{split}_failed/{kind}"] = n
    for name, value in record.get("test_metrics", {}).items():
        out[f"test {name}"] = value
    details = record.get("details", {})
    for name, value in (details.get("training") or {}).items():
        if _number(value):
            out[f"lora_{name}"] = value
    for name in ("conversations", "successful_runs", "metric_calls", "best_round", "start_val", "groups",
                 "skipped_groups"):
        if _number(details.get(name)):
            out[name] = details[name]
    return out


def step_series(record: Mapping[str, Any], folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Histories inside a step, (step, value) per metric: the LoRA loss and learning rate per optimizer
    step (w, w+: the adapter's training.json) and its checkpoints' val, an r step's reward, val, loss,
    clipped share, KL and rates per round (round 0: the program it started from), the candidates a p or
    g step scored on val, a g step's proposals on their minibatch before and after."""
    details = record.get("details", {})
    out: dict[str, list[tuple[int, float]]] = {}

    def add(name: str, step: int, value: Any) -> None:
        if _number(value):
            out.setdefault(name, []).append((step, float(value)))

    training = folder / "adapter" / "training.json"
    if record.get("kind") in ("w", "w+") and training.exists():
        report = json.loads(training.read_text(encoding="utf-8"))
        for i, loss in enumerate(report.get("step_losses") or []):
            add("lora_loss", i + 1, loss)
        for i, rate in enumerate(report.get("learning_rates") or []):
            add("lora_lr", i + 1, rate)
    if "rounds" in details:
        add("round_val", 0, details.get("start_val"))
        for r in details["rounds"]:
            for name in ("reward_mean", "val", "loss", "clip_fraction", "kl", "tokens_per_second",
                         "rollout_tokens_per_second"):
                add(f"round_{name}", r["round"], r.get(name))
    for c in details.get("checkpoints", []):  # w, w+: the start (step 0) and each checkpoint, scored on val
        add("checkpoint_val", c["step"], c.get("val"))
    for i, c in enumerate(details.get("candidates", [])):
        add("candidate_val", c.get("index", i), c.get("val", c.get("val_score")))  # g: "val", p: "val_score"
    for p in details.get("proposals", []):
        add("proposal_minibatch_before", p["iteration"], p.get("minibatch_before"))
        add("proposal_minibatch_after", p["iteration"], p.get("minibatch_after"))
    return out


def eval_metrics(result: "EvalResult", split: str) -> dict[str, float]:
    """An evaluation's throughput: generated tokens per second (the engine's own, behind a cache) and calls."""
    u = result.usage
    generated = u.get("engine_completion_tokens", u.get("completion_tokens", 0))
    return {f"{split}_tokens_per_s": generated / result.seconds if result.seconds else 0.0,
            f"{split}_calls": u.get("requests", 0), f"{split}_cache_hits": u.get("cache_hits", 0)}


def track_step(parent: Tracker, depth: int, record: Mapping[str, Any], folder: Path,
               scored: Mapping[str, "EvalResult | None"]) -> None:
    """Report a finished step as a nested run of `parent`, once (a step reported before is skipped): its
    metrics and records, and the traces of its evaluations where they ran in this process (`scored`,
    split -> result; a step read back from its folder has none). The parent gets the step's val and test
    at `depth`, so its history is the strategy's curve."""
    prefix = record["prefix"]
    if not parent.enabled or parent.finished(prefix):
        return
    kind = record["kind"] or "zero-shot"
    name = prefix.replace("-", " -> ") if record["kind"] else prefix
    with parent.child(prefix, name, {"tandem.step": prefix, "tandem.kind": kind}) as run:
        run.params({"step": prefix, "kind": kind, "depth": depth})
        run.metrics(step_metrics(record))
        for name, series in step_series(record, folder).items():
            for step, value in series:
                run.metrics({name: value}, step=step)
        for split, result in scored.items():
            if result is not None:
                run.metrics(eval_metrics(result, split))
                run.traces(result, f"{prefix} {split}", {"tandem.step": prefix, "tandem.split": split})
        run.artifacts([folder / "step.json", folder / "program.json", folder / "adapter" / "training.json",
                       *sorted(folder.glob("*.png")), *sorted(folder.glob("rounds/*/round.json"))])
        adapter = record.get("details", {}).get("adapter")  # w: <step>/adapter, r: the best round's
        if run.adapters and adapter and Path(adapter).is_dir():
            run.artifacts([Path(adapter)])
    parent.metrics({"val": record["val"], "test": record["test"]}, step=depth)


def track_eval(run: Tracker, result: "EvalResult", split: str, report_metrics: Mapping[str, float | None],
               params: Mapping[str, Any]) -> None:
    """Report one evaluation (`tandem eval`): its parameters, score, failures by kind, the task's report
    metrics, throughput, and the traces of its examples."""
    run.params(params)
    run.metrics({"score": result.score, "failed": result.n_errors,
                 **{f"failed/{kind}": n for kind, n in result.failures().items()}, **report_metrics,
                 **eval_metrics(result, split)})
    run.traces(result, f"eval {split}", {"tandem.split": split})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- MLflow ---------------------------------------------------------------------------------------------


class _Session:
    """One command's connection to MLflow: the store, the experiment, the settings, the record of run ids
    (`<run-dir>/mlflow/runs.json`, per store and experiment) and whether tracking is still on."""

    def __init__(self, settings: TrackingSettings, run_dir: Path | None, experiment: str):
        self.settings, self.run_dir, self.experiment_name = settings, run_dir, experiment
        given = os.environ.get("MLFLOW_TRACKING_URI")
        self.local = not given and run_dir is not None  # the default store, in the run folder
        self.uri = given or (f"sqlite:///{(run_dir / STORE / 'mlflow.db').resolve()}" if self.local else None)
        self.on = True
        self.seconds = 0.0  # spent in MLflow calls: what tracking costs the run
        self.client: Any = None
        self.experiment_id: str | None = None
        self.record_path = run_dir / STORE / "runs.json" if run_dir is not None else None

    def guard(self, what: str, call: Callable[[], Any]) -> Any:
        """One MLflow call; whatever it raises turns tracking off with one warning, and the run goes on."""
        if not self.on:
            return None
        started = time.perf_counter()
        try:
            return call()
        except Exception as exc:  # tracking must never stop a run: MLflow, the network, the store alike
            self.on = False
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning("MLflow failed %s (%s: %s); the run goes on untracked", what, type(exc).__name__,
                        first[:300])
            return None
        finally:
            self.seconds += time.perf_counter() - started

    def connect(self) -> bool:
        """Open the store once (False: tracking is off)."""
        if self.client is None and self.on:
            self.guard(f"opening the store {self.uri or '(MLflow default)'}", self._connect)
        return self.on

    def _connect(self) -> None:
        import mlflow  # the optional `mlflow` extra
        from mlflow import MlflowClient

        if self.uri and self.uri.startswith(("http://", "https://")):
            _probe(self.uri)  # MLflow itself would retry an absent server for minutes
        self.uri = self.uri or mlflow.get_tracking_uri()
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # MLflow's tracer writes traces to its process-wide tracking URI: point it at this store. MLflow also
        # puts the URI in the environment for subprocesses; none of tandem's needs it, so it is put back.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        client = MlflowClient(self.uri)
        found = client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:  # the default store keeps its artifacts beside it, in the run folder
            location = (self.run_dir / STORE / "artifacts").resolve().as_uri() if self.local else None
            self.experiment_id = client.create_experiment(self.experiment_name, artifact_location=location)
        self.client = client
        log.info("MLflow experiment %r in %s", self.experiment_name, self.uri)

    def _records(self) -> dict[str, Any]:
        if self.record_path is None or not self.record_path.exists():
            return {}
        return json.loads(self.record_path.read_text(encoding="utf-8"))

    def recorded(self, key: str) -> dict[str, Any] | None:
        """The MLflow run this run folder made under `key` in this store and experiment."""
        if not self.connect():
            return None
        return self._records().get(self.uri, {}).get(self.experiment_id, {}).get(key)

    def remember(self, key: str, run_id: str, finished: bool) -> None:
        if self.record_path is None:
            return
        records = self._records()
        records.setdefault(self.uri, {}).setdefault(self.experiment_id, {})[key] = {"run_id": run_id,
                                                                                    "finished": finished}
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
        tmp.replace(self.record_path)


def _probe(uri: str, timeout: float = 5.0) -> None:
    """ConnectionError where nothing answers at `uri` within `timeout`; any HTTP answer is a server."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"nothing answers at {uri} ({getattr(exc, 'reason', exc)})") from None


class _Root(Tracker):
    """The command: its children are the top-level MLflow runs. It is no run itself."""

    enabled = True

    def __init__(self, session: _Session):
        self.session = session

    def child(self, key: str, name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        return MlflowTracker(self.session, key, name, None, tags or {})

    def finished(self, key: str) -> bool:
        return bool((self.session.recorded(key) or {}).get("finished"))


class MlflowTracker(Tracker):
    """One MLflow run, opened at its first call (so a run folder refused before anything runs makes no
    MLflow run): the one recorded under its key, continued, or a new one. Every call names the run by
    id through the session's client (no active run, no fluent state that threads could share)."""

    enabled = True

    def __init__(self, session: _Session, key: str, name: str, parent: "MlflowTracker | None",
                 tags: Mapping[str, Any]):
        self.session, self.key, self.name, self.parent = session, key, name, parent
        self.tags = {k: str(v) for k, v in tags.items()}  # also set on its nested runs and traces
        self.adapters = session.settings.track_adapters
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        if self._run_id is None and self.session.connect():
            self._run_id = self.session.guard(f"starting run {self.name!r}", self._open)
        return self._run_id

    def _open(self) -> str:
        client, found = self.session.client, self.session.recorded(self.key)
        if found is not None:
            client.update_run(found["run_id"], status="RUNNING")
            log.info("continuing MLflow run %s (%s)", found["run_id"], self.name)
            return found["run_id"]
        tags = dict(self.tags)
        if self.parent is not None:
            tags["mlflow.parentRunId"] = self.parent.run_id
        if self.session.run_dir is not None:
            tags["tandem.run_dir"] = str(self.session.run_dir.resolve())
        run_id = client.create_run(self.session.experiment_id, run_name=self.name, tags=tags).info.run_id
        self.session.remember(self.key, run_id, False)
        return run_id

    def _call(self, what: str, call: Callable[[str], Any]) -> None:
        run_id = self.run_id
        if run_id is not None:
            self.session.guard(what, lambda: call(run_id))

    def child(self, key: str, name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        if self.run_id is None:
            return NO_TRACKING
        return MlflowTracker(self.session, f"{self.key}/{key}", name, self, {**self.tags, **(tags or {})})

    def finished(self, key: str) -> bool:
        return bool((self.session.recorded(f"{self.key}/{key}") or {}).get("finished"))

    def params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # the optional `mlflow` extra

        flat = [Param(key_of(k), v[:6000]) for k, v in flatten(values).items()]
        for i in range(0, len(flat), 100):  # MLflow takes 100 parameters a call
            batch = flat[i:i + 100]
            self._call("logging parameters", lambda run_id: self.session.client.log_batch(run_id, params=batch))

    def metrics(self, values: Mapping[str, float | None], step: int = 0) -> None:
        from mlflow.entities import Metric  # the optional `mlflow` extra

        now = int(time.time() * 1000)
        batch = [Metric(key_of(k), float(v), now, step) for k, v in values.items() if v is not None]
        if batch:
            self._call("logging metrics", lambda run_id: self.session.client.log_batch(run_id, metrics=batch))

    def artifacts(self, paths: Sequence[Path], folder: str | None = None) -> None:
        client = self.session.client
        for path in paths:
            if path.is_dir():
                where = f"{folder}/{path.name}" if folder else path.name
                self._call(f"uploading {path}", lambda run_id: client.log_artifacts(run_id, str(path), where))
            elif path.is_file():
                self._call(f"uploading {path}", lambda run_id: client.log_artifact(run_id, str(path), folder))

    def traces(self, result: "EvalResult", name: str, tags: Mapping[str, Any] | None = None) -> None:
        all_tags = {**self.tags, **{k: str(v) for k, v in (tags or {}).items()}}
        for i in sample(len(result.results), self.session.settings.track_traces):
            self._call("writing a trace", lambda run_id: _write_trace(
                self.session, run_id, result.results[i], i, f"{name} #{i}", all_tags))

    def finish(self, status: str = "FINISHED") -> None:
        if self._run_id is None or not self.session.on:
            return
        import mlflow  # the optional `mlflow` extra

        if self.parent is None:  # MLflow writes traces in the background: wait for them once, at the command's end
            self.session.guard("writing traces", mlflow.flush_trace_async_logging)
        self._call("closing the run", lambda run_id: self.session.client.set_terminated(run_id, status))
        if status == "FINISHED" and self.session.on:
            self.session.remember(self.key, self._run_id, True)
        if self.parent is None:
            where = self._run_id
            if self.session.uri.startswith(("http://", "https://")):
                where = f"{self.session.uri.rstrip('/')}/#/experiments/{self.session.experiment_id}/runs/{self._run_id}"
            log.info("MLflow run %s (%s): %s; %.1f s spent in MLflow (import, calls)", where, self.name, status.lower(),
                     self.session.seconds)


def _write_trace(session: _Session, run_id: str, result: "ExampleResult", index: int, name: str,
                 tags: Mapping[str, str]) -> None:
    """One example's trace, at the times its calls ran: a root span for the program run (inputs, the
    prediction, the gold labels, score, failure) and a span per module call (messages, reply, parsed
    fields, failure, tokens, seconds)."""
    from mlflow.entities import SpanType  # the optional `mlflow` extra

    client, entries = session.client, result.trace
    now = time.time()
    start = min((e.started for e in entries if e.started is not None), default=now)
    end = max((e.started + e.seconds for e in entries if e.started is not None and e.seconds is not None),
              default=start)
    gold = {k: v for k, v in result.example.labels().items() if k != MODULE_LABELS}
    root = client.start_trace(
        name, span_type=SpanType.CHAIN, inputs=result.example.inputs(),
        attributes={"gold": gold, "score": result.score, "failure": result.failure or "", "error": result.error or ""},
        tags={**tags, "tandem.example": str(index), "tandem.score": f"{result.score:g}",
              "tandem.failure": result.failure or ""},
        experiment_id=session.experiment_id, start_time_ns=_ns(start), run_id=run_id)
    for entry in entries:
        _write_span(client, root, entry, now)
    client.end_trace(root.trace_id, outputs=dict(result.prediction) if result.prediction is not None else None,
                     status="ERROR" if result.failure else "OK", end_time_ns=_ns(end))


def _write_span(client: Any, root: Any, entry: TraceEntry, now: float) -> None:
    from mlflow.entities import SpanType  # the optional `mlflow` extra
    from mlflow.tracing.constant import SpanAttributeKey

    started = entry.started if entry.started is not None else now
    usage = {"input_tokens": entry.prompt_tokens, "output_tokens": entry.completion_tokens,
             "total_tokens": entry.prompt_tokens + entry.completion_tokens}
    span = client.start_span(
        entry.module, trace_id=root.trace_id, parent_id=root.span_id, span_type=SpanType.CHAT_MODEL,
        inputs={"messages": entry.messages},
        attributes={"module_inputs": entry.inputs, SpanAttributeKey.CHAT_USAGE: usage, "cached": entry.cached,
                    "seconds": entry.seconds},
        start_time_ns=_ns(started))
    client.end_span(root.trace_id, span.span_id, outputs={"reply": entry.reply, "fields": entry.outputs},
                    attributes={"failure": entry.failure or "", "error": entry.error or ""},
                    status="ERROR" if entry.error else "OK", end_time_ns=_ns(started + (entry.seconds or 0.0)))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
