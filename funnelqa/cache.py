"""One on-disk cache for every LLM call, keyed by (model, prompt, options).

SQLite in WAL mode, so the processes of a shell pipe (structure | rank | ...) share it safely.
A re-run of a stage costs no calls, and a killed run resumes where it stopped because every
answer is stored the moment its batch returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path


def default_cache_dir() -> Path:
    configured = os.environ.get("FUNNELQA_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "funnelqa"


def cache_key(model_id: str, payload: dict) -> str:
    blob = json.dumps({"model": model_id, "request": payload}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()  # a lone surrogate must not crash a key


class LLMCache:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_cache_dir() / "llm-cache.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        # The stages of a shell pipe open the cache at the same instant; switching a new file to
        # WAL takes a lock that sqlite's busy timeout does not wait for, so wait here instead.
        for attempt in range(200):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, answer TEXT, created REAL)"
                )
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 199:
                    raise
                time.sleep(0.05)
        self._db.execute("PRAGMA synchronous=NORMAL")

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk)
            found.update(rows.fetchall())
        return found

    def put_many(self, model_id: str, items: Iterable[tuple[str, str]]) -> None:
        from funnelqa.records import scrub_surrogates

        now = time.time()
        self._db.executemany(
            "INSERT OR REPLACE INTO answers (key, model, answer, created) VALUES (?, ?, ?, ?)",
            # sqlite stores UTF-8: a lone surrogate in an answer (an emoji cut in half) cannot be stored.
            [(key, model_id, scrub_surrogates(answer), now) for key, answer in items],
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self._db.close()
