"""One on-disk cache for every LLM call, keyed by (model, prompt, options).

SQLite in WAL mode, so the processes of a shell pipe (structure | rank | ...) share it safely.
A re-run of a stage costs no calls, and a killed run resumes where it stopped because every
answer is stored the moment it arrives. Each answer is stored with its status: "ok", or why it
is not an answer to serve again ("length", "blocked", "empty", "unusable"); only "ok" ones are
served, the others are asked again on the next run.
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
    """$FUNNELQA_CACHE_DIR, else $XDG_CACHE_HOME/funnelqa, else ~/.cache/funnelqa (not created here):
    home of llm-cache.sqlite and of the converted models (``models.models_cache_dir``)."""
    configured = os.environ.get("FUNNELQA_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "funnelqa"


def cache_key(model_id: str, payload: dict) -> str:
    """An answer's primary key: the SHA-256 (64 hex digits) of ``{"model": model_id, "request":
    payload}`` as JSON with sorted keys, so any option in ``Request.payload`` that changes the
    answer changes the key."""
    blob = json.dumps({"model": model_id, "request": payload}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()  # a lone surrogate must not crash a key


class LLMCache:
    """The ``answers`` table of one SQLite file (default ``default_cache_dir()/llm-cache.sqlite``,
    its folder made if missing): key (``cache_key``), model id, answer text, created (Unix
    seconds) and status. Opening retries for about 10 s (200 tries, 50 ms apart) while another
    process sets the file up, then raises sqlite3.OperationalError."""

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
                    "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, answer TEXT, created REAL,"
                    " status TEXT NOT NULL DEFAULT 'ok')"
                )
                self._add_status_column()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 199:
                    raise
                time.sleep(0.05)
        self._db.execute("PRAGMA synchronous=NORMAL")

    def _add_status_column(self) -> None:
        # Caches written before answers had a status hold answers only (and empty ones, which
        # the reader below skips); several processes may race to add the column.
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(answers)")}
        if "status" not in columns:
            try:
                self._db.execute("ALTER TABLE answers ADD COLUMN status TEXT NOT NULL DEFAULT 'ok'")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise

    def lookup(self, keys: Iterable[str]) -> tuple[dict[str, str], set[str]]:
        """(answers to serve, keys stored with a failed status that must be asked again)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        stale: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, answer, status FROM answers WHERE key IN ({marks})", chunk)
            for key, answer, status in rows.fetchall():
                if status == "ok" and answer.strip():
                    found[key] = answer
                else:
                    stale.add(key)
        return found, stale

    def put_many(self, model_id: str, items: Iterable[tuple[str, str]]) -> None:
        """Store answers; a backend ``Answer`` that did not finish normally keeps its finish as status."""
        from funnelqa.backends import answer_status
        from funnelqa.records import scrub_surrogates

        now = time.time()
        rows = []
        for key, answer in items:
            finish, _ = answer_status(answer)
            if finish == "failed":
                continue  # no answer came: nothing to store
            # sqlite stores UTF-8: a lone surrogate in an answer (an emoji cut in half) cannot be stored.
            rows.append((key, model_id, scrub_surrogates(str(answer)), now, "ok" if finish == "stop" else finish))
        self._db.executemany(
            "INSERT OR REPLACE INTO answers (key, model, answer, created, status) VALUES (?, ?, ?, ?, ?)", rows
        )

    def mark_unusable(self, keys: Iterable[str]) -> None:
        """Keep the answers for inspection but never serve them again."""
        self._db.executemany("UPDATE answers SET status = 'unusable' WHERE key = ?", [(key,) for key in keys])

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        """Close the SQLite connection; the cache cannot be used after it."""
        self._db.close()
