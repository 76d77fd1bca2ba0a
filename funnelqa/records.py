"""The record contract (../DESIGN.md) and JSONL streaming with resumable, atomic outputs.

Lines are read and written with jsonlines. Readers yield records lazily so stages chain in a
shell pipe; a bad line names its file and line. Writers append to ``FILE.partial`` as records finish and rename it to ``FILE`` at the end, so an
output is never half-written and a killed run resumes from what it had finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import jsonlines

from funnelqa.errors import InputError, OutputInUse

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
    """ValueError unless ``id`` is a non-empty string or an integer (a bool is no id)."""
    if "id" not in record:
        raise ValueError("missing field 'id'")
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool) or str(record["id"]) == "":
        raise ValueError("field 'id' must be a non-empty string or an integer")


def check_profile(record: Record) -> None:
    """ValueError unless ``profile`` is a non-empty string: the input of ``structure``."""
    _nonempty_str(record, "profile")


def check_tags(record: Record) -> None:
    """ValueError unless ``tags`` is a non-empty list of ``{"tag", "content"}``, both non-empty
    strings, with no name twice: the input of ``rank`` and ``generate-questions``."""
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
    """``check_tags``, then ValueError unless ``questions`` is a non-empty list of ``{"question",
    "answer", "tags"}``: non-empty strings, and a list naming only the record's own tags. The
    input of ``corrupt`` and ``simulate``."""
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
    """ValueError unless the record is a ``simulate`` session, the input of ``score``: ``turns``,
    ``elicited`` and a non-empty ``target`` are lists; every target and elicited item has string
    ``tag`` and ``content``; every turn has a ``tags`` list and ``answered``."""
    for key in ("turns", "elicited", "target"):
        if not isinstance(record.get(key), list):
            raise ValueError(f"missing or non-list field {key!r} (is this `funnelqa simulate` output?)")
    if not record["target"]:
        # Scored as zero it would drag every average down for a user who had nothing to elicit.
        raise ValueError("field 'target' is empty: a session without a target profile cannot be scored")
    for key in ("target", "elicited"):
        for i, tag in enumerate(record[key]):
            if not isinstance(tag, dict) or not isinstance(tag.get("tag"), str) or not isinstance(tag.get("content"), str):
                raise ValueError(f"{key}[{i}] must be an object with 'tag' and 'content'")
    for i, turn in enumerate(record["turns"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("tags"), list) or "answered" not in turn:
            raise ValueError(f"turns[{i}] must be an object with 'tags' and 'answered'")


# ---- reading ----

def source_name(source: str | os.PathLike) -> str:
    """How messages name an input: "<stdin>" for '-', else the path as given."""
    return "<stdin>" if str(source) == "-" else str(source)


def _open_source(source: str | os.PathLike) -> IO[bytes]:
    # Bytes, not text: a bad byte must become "FILE:LINE: not valid UTF-8", from stdin as from a file.
    if str(source) == "-":
        return sys.stdin.buffer
    try:
        return open(source, "rb")
    except FileNotFoundError:
        raise InputError(str(source), None, "no such file") from None
    except IsADirectoryError:
        raise InputError(str(source), None, "is a directory, not a JSONL file") from None


_BOM = b"\xef\xbb\xbf"
# jsonlines drops one of these from the start of every line it reads (RFC 7464 puts an RS there).
_LINE_MARKS = (_BOM, b"\x1e")
# An escaped UTF-16 surrogate (half of an emoji cut in two): json.loads turns a lone one into a
# str that no UTF-8 writer, cache key or HTTP client can encode.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub_surrogates(value: Any) -> Any:
    """``value`` with every lone UTF-16 surrogate in its strings replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [scrub_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {scrub_surrogates(key): scrub_surrogates(item) for key, item in value.items()}
    return value


class _Lines:
    """An input's lines as bytes, handed to ``jsonlines.Reader`` one at a time.

    ``number`` and ``raw`` are those of the line handed out last: jsonlines numbers only the lines
    it rejects, and a good record's line must be named too when validation fails.

    A byte-order mark is dropped from the first line only (an editor's, at the start of the file).
    jsonlines would drop a BOM or an RS from the start of every line; those stay errors here, as
    they were, so a line that starts with one goes to jsonlines behind an extra BOM for it to drop
    and reaches ``json.loads`` whole.
    """

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.number = 0
        self.raw = b""

    def __iter__(self) -> Iterator[bytes]:
        for self.number, raw in enumerate(self.handle, start=1):
            if self.number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            self.raw = raw
            yield _BOM + raw if raw.startswith(_LINE_MARKS) else raw


def _parse_line(line: str) -> Any:
    """``loads`` for jsonlines: the standard library's json, not the orjson that jsonlines prefers
    when installed (it reads NaN, big integers and surrogates differently); columns counted
    without the line break; escaped lone surrogates scrubbed."""
    value = json.loads(line.rstrip("\r\n"))
    return scrub_surrogates(value) if _ESCAPED_SURROGATE.search(line) else value


def _not_jsonl(first_line: str, name: str) -> str | None:
    """What the file is instead of JSONL, judged by its first line, or None."""
    start = first_line.strip()
    stem = "records" if name == "<stdin>" else Path(name).stem
    # Never the input's own name: the shell would empty the file before jq reads it.
    if name != "<stdin>" and Path(name).name == f"{stem}.jsonl":
        stem += "-lines"
    if start.startswith("["):
        return ("holds a JSON array, not JSONL (one JSON object per line); "
                f"convert it with: jq -c '.[]' {name} > {stem}.jsonl")
    if start == "{":
        return ("holds pretty-printed JSON, not JSONL (one JSON object per line); "
                f"convert it with: jq -c . {name} > {stem}.jsonl")
    return None


def _rejected(exc: jsonlines.InvalidLineError, raw: bytes, name: str, *, first: bool) -> Exception:
    """What to raise for a line that jsonlines rejected (``exc``), from the error it caught.

    ``raw`` is the line as read; ``first`` says whether no line came before it (a file whose first
    line fails may be a JSON array or pretty-printed JSON, and is named as such: InputError).
    Otherwise a ValueError in funnelqa's words: the bad byte, or the JSON error and its column.
    """
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        start = cause.start - (len(cause.object) - len(raw))  # not counting a BOM that _Lines put in front
        return ValueError(f"not valid UTF-8 (byte 0x{raw[start]:02x} at byte {start + 1} of the line)")
    if isinstance(cause, json.JSONDecodeError):
        if first and (what := _not_jsonl(cause.doc, name)):
            return InputError(name, None, what)
        reason = cause.msg.removesuffix(" at")  # "Invalid control character at"
        return ValueError(f"malformed JSON ({reason} at column {cause.colno})")
    # An integer longer than int() reads, say: json's own words, without jsonlines' wrapping.
    return cause if isinstance(cause, ValueError) else exc


def read_records(
    source: str | os.PathLike,
    validate: Validator | None = None,
    *,
    on_invalid: Callable[[InputError], None] | None = None,
    allow_duplicate_ids: bool = False,
) -> Iterator[Record]:
    """Yield records from a JSONL path or ``-``, lazily.

    Input is UTF-8 (a leading byte-order mark is allowed); lone surrogates written as JSON escapes
    become U+FFFD. Each record gets ``check_id`` and then ``validate``, unless it carries an
    ``error`` field from an earlier stage: those pass through untouched so the failure stays
    visible downstream.

    Raises InputError naming file and line for a bad line, or, when ``on_invalid`` is given, hands
    it to ``on_invalid`` and skips it. Raised whatever ``on_invalid`` says: a file that is a JSON
    array or pretty-printed JSON rather than JSONL, and a file whose every line was skipped.
    """
    name = source_name(source)
    handle = _open_source(source)
    owned = str(source) != "-"
    lines = _Lines(handle)
    reader = jsonlines.Reader(lines, loads=_parse_line)
    seen: set[str] = set()
    skipped = yielded = 0
    try:
        while True:
            try:
                try:
                    record = reader.read(skip_empty=True, allow_none=True)
                except EOFError:
                    break
                except jsonlines.InvalidLineError as exc:
                    raise _rejected(exc, lines.raw, name, first=yielded == skipped == 0) from None
                except RecursionError:
                    raise ValueError("JSON nested too deeply") from None
                if not isinstance(record, dict):
                    if yielded == skipped == 0 and isinstance(record, list) and record and isinstance(record[0], dict):
                        raise InputError(name, None, _not_jsonl("[", name) or "")
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                check_id(record)
                key = str(record["id"])
                if not allow_duplicate_ids and key in seen:
                    raise ValueError(f"duplicate id {record['id']!r}")
                if validate is not None and "error" not in record:
                    validate(record)
            except ValueError as exc:
                error = InputError(name, lines.number, str(exc))
                if on_invalid is None:
                    raise error from None
                on_invalid(error)
                skipped += 1
                continue
            seen.add(key)
            yielded += 1
            yield record
        if skipped and not yielded:
            raise InputError(name, None, f"every line was invalid ({skipped} skipped): nothing to do")
    finally:
        if owned:
            handle.close()


def load_records(source: str | os.PathLike, validate: Validator | None = None, **kwargs) -> list[Record]:
    """``read_records`` (same arguments, same errors) gathered into a list, for inputs that fit in memory."""
    return list(read_records(source, validate, **kwargs))


# ---- writing ----

def dumps(record: Record) -> str:
    """``record`` as one JSONL line without its newline: non-ASCII kept as is, and each lone
    surrogate (from a model's output, say), which UTF-8 cannot encode, replaced by U+FFFD."""
    text = json.dumps(record, ensure_ascii=False)
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def input_digest(record: Record) -> str:
    """A short digest of an input record: a resumed output must come from this very input."""
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return hashlib.sha256(blob).hexdigest()[:32]


# In ``FILE.partial`` each line also carries the digest of the input it came from; the key is
# dropped when the partial file becomes the output.
_DIGEST_KEY = "_funnelqa_input"


@dataclass
class RecordWriter:
    """Writes JSONL to stdout, or to ``path`` through ``path.partial`` renamed on success.

    ``done`` holds the records a previous, interrupted run already finished (read back from
    ``path.partial``); ``is_done`` accepts one only when it came from an identical input record,
    so a changed input is redone, and the output keeps one record per input of this run.
    Raises OutputInUse when another process is writing ``path`` (an exclusive lock on
    ``path.lock``). An interrupted run that wrote nothing leaves no ``.partial`` behind.
    """

    path: Path | None = None
    resume: bool = True
    done: dict[str, Record] = field(default_factory=dict)
    _writer: jsonlines.Writer | None = None
    written: int = 0
    _lock: Any = None
    _digests: dict[str, str] = field(default_factory=dict)  # key -> digest of the partial's line
    _inputs: dict[str, str] = field(default_factory=dict)  # key -> digest of this run's input
    _resumed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.path is None:
            self._writer = jsonlines.Writer(sys.stdout, dumps=dumps, flush=True)
            return
        from filelock import FileLock, Timeout

        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path) + ".lock", timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            raise OutputInUse(f"{self.path}: another funnelqa process is writing this file "
                              f"(it holds {self.path}.lock); wait for it or choose another --out") from None
        try:
            self._open_partial()
        except BaseException:
            self._unlock()
            raise

    def _open_partial(self) -> None:
        partial = self.partial_path
        if partial.exists() and not self.resume:
            partial.unlink()
        if partial.exists():
            with open(partial, encoding="utf-8", errors="replace") as handle:
                # A line cut short by the kill is invalid: skipped, its record is redone.
                for record in jsonlines.Reader(handle, loads=json.loads).iter(skip_invalid=True):
                    try:
                        key = self._key(record)
                    except (TypeError, KeyError):
                        continue
                    digest = record.pop(_DIGEST_KEY, None)
                    # A key seen twice: the later line is the newer answer.
                    self.done[key] = record
                    self._digests[key] = digest
            with jsonlines.open(partial, "w", dumps=dumps) as writer:
                writer.write_all(self._with_digest(record, self._digests[key]) for key, record in self.done.items())
        self._writer = jsonlines.open(partial, "a", dumps=dumps, flush=True)

    @property
    def partial_path(self) -> Path:
        """``PATH.partial``: where this run's records go until ``commit`` renames it (a writer to a path only)."""
        assert self.path is not None
        return self.path.with_name(self.path.name + ".partial")

    def is_done(self, record: Record) -> bool:
        """Whether ``record`` (an input) was finished by an earlier run; remembers it for ``write``."""
        key = self._key(record)
        if self.path is None:
            return False
        digest = self._inputs[key] = input_digest(record)
        if key in self.done and self._digests.get(key) == digest:
            self._resumed.add(key)
            return True
        return False

    @staticmethod
    def _key(record: Record) -> str:
        return str(record["id"])

    @staticmethod
    def _with_digest(record: Record, digest: str | None) -> Record:
        return {**record, _DIGEST_KEY: digest} if digest else record

    def write(self, record: Record) -> None:
        """Write ``record`` as one line and flush it, so a kill loses no finished record."""
        assert self._writer is not None
        if self.path is None or not self.resume:
            self._writer.write(record)
        else:
            key = self._key(record)
            self._writer.write(self._with_digest(record, self._inputs.get(key)))
            self.done[key] = record
            self._resumed.add(key)
        self.written += 1

    def write_many(self, records: Iterable[Record]) -> None:
        """``write`` each record in turn (each one flushed as it goes)."""
        for record in records:
            self.write(record)

    def commit(self) -> None:
        """Finish: the partial file becomes the output in one rename.

        Resuming, only the records of this run's inputs get there (resumed or written), once each.
        """
        if self.path is None or self._writer is None:
            return
        self._writer.close()
        self._writer = None
        try:
            if self.resume:
                tmp = self.path.with_name(self.path.name + ".tmp")
                self._keep_this_runs_records(tmp)
                os.replace(tmp, self.path)
                self.partial_path.unlink()
            else:
                os.replace(self.partial_path, self.path)
        finally:
            self._unlock()

    def _keep_this_runs_records(self, target: Path) -> None:
        kept: dict[str, Record] = {}
        with jsonlines.open(self.partial_path, loads=json.loads) as reader:
            for record in reader:
                record.pop(_DIGEST_KEY, None)
                key = self._key(record)
                if key in self._resumed:
                    kept.pop(key, None)  # the later line wins, in the place it was written
                    kept[key] = record
        with jsonlines.open(target, "w", dumps=dumps) as writer:
            writer.write_all(kept.values())

    def abandon(self) -> None:
        """Stop without committing; the partial file stays for the next run to resume."""
        if self.path is not None and self._writer is not None:
            self._writer.close()
            self._writer = None
            if self.partial_path.exists() and self.partial_path.stat().st_size == 0:
                self.partial_path.unlink()  # e.g. an input error before any work: nothing to resume
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            # Removed while still held, so no process can lock the old file after we let go.
            Path(self._lock.lock_file).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abandon()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented UTF-8 JSON (non-ASCII kept, a final newline) at ``path``, written to
    ``PATH.tmp`` and renamed so no reader sees half a file; missing folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
