"""An on-disk cache of LM calls (SQLite), shared by threads and by processes.

Keyed by model, adapter *content*, messages and sampling settings, so a retrained adapter at the
same path never returns stale replies and a rerun of a finished experiment only reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

from .base import LM, Completion, Request, Usage, check_results


# What tandem writes beside an adapter about its training (losses, wall-clock seconds): the same adapter
# trained twice differs here, and no server reads it.
RECORDS = frozenset({"training.json"})


def adapter_digest(path: str | None) -> str | None:
    """Content hash of an adapter folder: every file in it (config, weights in any format, tokenizer files),
    but RECORDS and dot-files, which are no part of the adapter; subfolders (checkpoints) neither. Two folders
    a server would load alike have one digest, whatever their training took."""
    if path is None:
        return None
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "adapter_config.json":
            h.update(f.name.encode() + b"\0" + _config_bytes(f) + b"\0")
        elif f.is_file() and f.name not in RECORDS and not f.name.startswith("."):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            with open(f, "rb") as data:
                for block in iter(lambda: data.read(2**20), b""):
                    h.update(block)
    return h.hexdigest()


def _config_bytes(path: Path) -> bytes:
    """A PEFT config as the same bytes wherever it means the same: `target_modules` is a set to PEFT, written in
    the order of a Python set, which differs from one training to the next."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # not JSON: a server will refuse it; hashed as it is
        return path.read_bytes()
    if isinstance(config, dict) and isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return json.dumps(config, sort_keys=True).encode()


class CachedLM:
    """Wraps an LM; looks every request up first and sends only the misses, in one batch."""

    def __init__(self, lm: LM, path: str | os.PathLike):
        self.lm = lm
        self.name = lm.name
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.usage = Usage()
        self._lock = threading.Lock()
        self._digests: dict[tuple[str, float], str | None] = {}
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(  # "completions", not the older "calls" table, which did not keep finish_reason
            "CREATE TABLE IF NOT EXISTS completions "
            "(key TEXT PRIMARY KEY, text TEXT, prompt_tokens INT, completion_tokens INT, finish_reason TEXT)"
        )
        # The sampled token ids (JSON) came later: a cache written before them gains the columns, and its
        # rows read back without ids (an r step then re-tokenizes those replies, and says so).
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(completions)")}
        for column in ("token_ids", "forced"):
            if column not in columns:
                self._db.execute(f"ALTER TABLE completions ADD COLUMN {column} TEXT")
        self._db.commit()

    def __getattr__(self, name: str):
        # Backend extras (e.g. the local engine's model for fine-tuning) stay reachable.
        return getattr(self.lm, name)

    def _digest(self, adapter: str | None) -> str | None:
        if adapter is None:
            return None
        stamp = max((f.stat().st_mtime for f in Path(adapter).iterdir()), default=0.0)
        with self._lock:
            if (adapter, stamp) not in self._digests:
                self._digests[(adapter, stamp)] = adapter_digest(adapter)
            return self._digests[(adapter, stamp)]

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        model = getattr(self.lm, "fingerprint", self.name)
        decoding = getattr(self.lm, "decoding", None) if any(r.format is not None for r in requests) else None
        keys = [r.key(model, self._digest(r.adapter), decoding) for r in requests]
        results: list[Completion | None] = [None] * len(requests)
        with self._lock:
            for i, key in enumerate(keys):
                row = self._db.execute(
                    "SELECT text, prompt_tokens, completion_tokens, finish_reason, token_ids, forced FROM completions "
                    "WHERE key = ?", (key,)
                ).fetchone()
                if row:
                    results[i] = Completion(row[0], row[1], row[2], cached=True, finish_reason=row[3],
                                            token_ids=None if row[4] is None else tuple(json.loads(row[4])),
                                            forced=tuple(json.loads(row[5] or "[]")))
        misses = [i for i, c in enumerate(results) if c is None]
        if misses:
            fresh = check_results(misses, self.lm.generate([requests[i] for i in misses]), self.lm.name)
            with self._lock:
                for i, c in zip(misses, fresh):
                    results[i] = c
                    self._db.execute(
                        "INSERT OR REPLACE INTO completions (key, text, prompt_tokens, completion_tokens, finish_reason, "
                        "token_ids, forced) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (keys[i], c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason,
                         None if c.token_ids is None else json.dumps(list(c.token_ids)), json.dumps(list(c.forced))),
                    )
                self._db.commit()
        done = check_results(requests, results, "cache")
        with self._lock:
            self.usage.add(done)
        return done

    def close(self) -> None:
        with self._lock:
            self._db.close()
