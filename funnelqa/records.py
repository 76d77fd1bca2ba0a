"""The record contract (../DESIGN.md) and JSONL streaming with resumable, atomic outputs.

Readers yield records lazily so stages chain in a shell pipe; a bad line names its file and line.
Writers append to ``FILE.partial`` as records finish and rename it to ``FILE`` at the end, so an
output is never half-written and a killed run resumes from what it had finished.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from funnelqa.errors import InputError

Record = dict[str, Any]
Validator = Callable[[Record], None]


# ---- contract checks: each raises ValueError with a message fit for "file:line: message" ----

def _nonempty_str(record: Record, key: str) -> str:
    if key not in record:
        raise ValueError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def check_id(record: Record) -> None:
    if "id" not in record:
        raise ValueError("missing field 'id'")
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool) or str(record["id"]) == "":
        raise ValueError("field 'id' must be a non-empty string or an integer")


def check_profile(record: Record) -> None:
    _nonempty_str(record, "profile")


def check_tags(record: Record) -> None:
    tags = record.get("tags")
    if tags is None:
        raise ValueError("missing field 'tags' (run `funnelqa structure` first)")
    if not isinstance(tags, list) or not tags:
        raise ValueError("field 'tags' must be a non-empty list of {tag, content}")
    seen: set[str] = set()
    for i, tag in enumerate(tags):
        if not isinstance(tag, dict):
            raise ValueError(f"tags[{i}] must be an object with 'tag' and 'content'")
        name = _nonempty_str(tag, "tag")
        _nonempty_str(tag, "content")
        if name in seen:
            raise ValueError(f"tags[{i}]: duplicate tag name {name!r}")
        seen.add(name)


def check_questions(record: Record) -> None:
    check_tags(record)
    questions = record.get("questions")
    if questions is None:
        raise ValueError("missing field 'questions' (run `funnelqa generate-questions` first)")
    if not isinstance(questions, list) or not questions:
        raise ValueError("field 'questions' must be a non-empty list")
    names = {t["tag"] for t in record["tags"]}
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            raise ValueError(f"questions[{i}] must be an object")
        _nonempty_str(q, "question")
        _nonempty_str(q, "answer")
        revealed = q.get("tags")
        if not isinstance(revealed, list) or not all(isinstance(t, str) for t in revealed):
            raise ValueError(f"questions[{i}].tags must be a list of tag names")
        unknown = [t for t in revealed if t not in names]
        if unknown:
            raise ValueError(f"questions[{i}] reveals tags the profile lacks: {unknown}")


def check_session(record: Record) -> None:
    for key in ("turns", "elicited", "target"):
        if not isinstance(record.get(key), list):
            raise ValueError(f"missing or non-list field {key!r} (is this `funnelqa simulate` output?)")
    for key in ("target", "elicited"):
        for i, tag in enumerate(record[key]):
            if not isinstance(tag, dict) or not isinstance(tag.get("tag"), str) or not isinstance(tag.get("content"), str):
                raise ValueError(f"{key}[{i}] must be an object with 'tag' and 'content'")
    for i, turn in enumerate(record["turns"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("tags"), list) or "answered" not in turn:
            raise ValueError(f"turns[{i}] must be an object with 'tags' and 'answered'")


# ---- reading ----

def source_name(source: str | os.PathLike) -> str:
    return "<stdin>" if str(source) == "-" else str(source)


def _open_source(source: str | os.PathLike) -> IO[str]:
    if str(source) == "-":
        return sys.stdin
    try:
        return open(source, encoding="utf-8")
    except FileNotFoundError:
        raise InputError(str(source), None, "no such file") from None
    except IsADirectoryError:
        raise InputError(str(source), None, "is a directory, not a JSONL file") from None


def read_records(
    source: str | os.PathLike,
    validate: Validator | None = None,
    *,
    on_invalid: Callable[[InputError], None] | None = None,
    allow_duplicate_ids: bool = False,
) -> Iterator[Record]:
    """Yield records from a JSONL path or ``-``, lazily.

    Each record gets ``check_id`` and then ``validate``, unless it carries an ``error`` field from
    an earlier stage: those pass through untouched so the failure stays visible downstream.
    A bad line raises InputError naming file and line, or, when ``on_invalid`` is given, is
    handed to it and skipped.
    """
    name = source_name(source)
    handle = _open_source(source)
    seen: set[str] = set()
    try:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                check_id(record)
                key = str(record["id"])
                if not allow_duplicate_ids and key in seen:
                    raise ValueError(f"duplicate id {record['id']!r}")
                if validate is not None and "error" not in record:
                    validate(record)
            except ValueError as exc:
                error = InputError(name, line_no, str(exc))
                if on_invalid is None:
                    raise error from None
                on_invalid(error)
                continue
            seen.add(key)
            yield record
    finally:
        if handle is not sys.stdin:
            handle.close()


def load_records(source: str | os.PathLike, validate: Validator | None = None, **kwargs) -> list[Record]:
    return list(read_records(source, validate, **kwargs))


# ---- writing ----

def dumps(record: Record) -> str:
    return json.dumps(record, ensure_ascii=False)


@dataclass
class RecordWriter:
    """Writes JSONL to stdout, or to ``path`` through ``path.partial`` renamed on success.

    ``done`` holds the records a previous, interrupted run already finished (read back from
    ``path.partial``); stages skip their ids, and they stay in the output.
    """

    path: Path | None = None
    key: Callable[[Record], str] = lambda r: str(r["id"])
    resume: bool = True
    done: dict[str, Record] = field(default_factory=dict)
    _handle: IO[str] | None = None
    written: int = 0

    def __post_init__(self) -> None:
        if self.path is None:
            self._handle = sys.stdout
            return
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.partial_path
        if partial.exists() and not self.resume:
            partial.unlink()
        if partial.exists():
            kept = []
            with open(partial, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a line cut short by the kill: everything after it is redone
                    kept.append(line if line.endswith("\n") else line + "\n")
                    self.done[self.key(record)] = record
            with open(partial, "w", encoding="utf-8") as handle:
                handle.writelines(kept)
        self._handle = open(partial, "a", encoding="utf-8")

    @property
    def partial_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".partial")

    def is_done(self, record: Record) -> bool:
        return self.key(record) in self.done

    def write(self, record: Record) -> None:
        assert self._handle is not None
        self._handle.write(dumps(record) + "\n")
        self._handle.flush()
        self.written += 1

    def write_many(self, records: Iterable[Record]) -> None:
        for record in records:
            self.write(record)

    def commit(self) -> None:
        """Finish: the partial file becomes the output in one rename."""
        if self.path is None or self._handle is None:
            return
        self._handle.close()
        self._handle = None
        os.replace(self.partial_path, self.path)

    def abandon(self) -> None:
        """Stop without committing; the partial file stays for the next run to resume."""
        if self.path is not None and self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abandon()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
