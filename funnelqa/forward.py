"""The forward process, LLM part (paper Sec. 3.2, Algorithm 1 lines 1-3).

``structure``: text profile -> JSON tags (JP^u). ``rank``: tags reordered general -> specific.
``generate-questions``: funnel questions with answers and the tags each reveals (the mapping T_i).

One engine runs all three: batch the records, ask the backend, validate each answer against the
record contract, and ask again with the reason when an answer is malformed or unfaithful. A record
that still fails is written with an ``error`` field and counted, never dropped.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from funnelqa import records
from funnelqa.backends import Backend, BackendOptions, ModelSpec, Request, answer_status, open_backend
from funnelqa.errors import InputError, UsageError
from funnelqa.parsing import extract_json, match_tags
from funnelqa.prompts import load
from funnelqa.records import Record
from funnelqa.render import format_tags

TAGS_SCHEMA = {
    "type": "object",
    "properties": {
        "tags": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"tag": {"type": "string"}, "content": {"type": "string"}},
                "required": ["tag", "content"],
            },
        }
    },
    "required": ["tags"],
}
RANKING_SCHEMA = {
    "type": "object",
    "properties": {"ranking": {"type": "array", "items": {"type": "string"}}},
    "required": ["ranking"],
}
QUESTIONS_SCHEMA = {
    "type": "object",
    "properties": {
        "questions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "question": {"type": "string"},
                    "answer": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["question", "answer", "tags"],
            },
        }
    },
    "required": ["questions"],
}


class InvalidOutput(ValueError):
    """The model answered, but not with something the contract accepts."""


def _fill(template: str, **values: str) -> str:
    # str.format would trip over the JSON braces the prompts show the model.
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def _text(value: Any) -> bool:
    """Whether ``value`` is a non-empty string, the only type a tag, content, question or answer may have."""
    return isinstance(value, str) and bool(value.strip())


def _field(data: Any, key: str) -> Any:
    if isinstance(data, dict) and key in data:
        return data[key]
    if isinstance(data, list):
        return data  # small models often drop the wrapper object
    raise InvalidOutput(f"expected a JSON object with {key!r}")


# ---- structure ----

def structure_request(record: Record, max_tokens: int) -> Request:
    """prompts/structure.txt filled with the record's profile, asking for TAGS_SCHEMA's JSON
    (``{"tags": [{"tag", "content"}]}``) in at most ``max_tokens`` tokens."""
    return Request.chat(None, _fill(load("structure"), profile=record["profile"].strip()),
                        max_tokens=max_tokens, json_schema=TAGS_SCHEMA)


def accept_structure(record: Record, text: str) -> Record:
    """The record plus ``tags`` (JP^u): ``[{"tag", "content"}]`` from the model's JSON, stripped;
    an object ``{name: content}`` is read as tags too. Raises InvalidOutput when there is no tag,
    a tag or content is not a non-empty string, or a name comes twice (ignoring case);
    ValueError when the text holds no JSON."""
    raw = _field(extract_json(text), "tags")
    if isinstance(raw, dict):  # {"Genre": "...", ...} is a fair reading of "tags"
        raw = [{"tag": k, "content": v} for k, v in raw.items()]
    if not isinstance(raw, list) or not raw:
        raise InvalidOutput("'tags' must be a non-empty list")
    tags: list[dict[str, str]] = []
    for item in raw:
        # str() of null or a list would write the tag "None" or the content "['Drama', 'Comedy']".
        if not isinstance(item, dict) or not _text(item.get("tag")) or not _text(item.get("content")):
            raise InvalidOutput(f"every tag needs a non-empty 'tag' and 'content', got {item!r:.120}")
        name = str(item["tag"]).strip()
        if any(t["tag"].lower() == name.lower() for t in tags):
            raise InvalidOutput(f"tag {name!r} appears twice; merge its contents into one tag")
        tags.append({"tag": name, "content": str(item["content"]).strip()})
    return {**record, "tags": tags}


# ---- rank ----

def rank_request(record: Record, max_tokens: int) -> Request:
    """prompts/rank.txt with the record's tags listed, asking for ``{"ranking": [tag names]}``
    from most general to most specific (RANKING_SCHEMA), in at most ``max_tokens`` tokens."""
    return Request.chat(None, _fill(load("rank"), tags=format_tags(record["tags"])),
                        max_tokens=max_tokens, json_schema=RANKING_SCHEMA)


def accept_rank(record: Record, text: str) -> Record:
    """The record with ``tags`` in the model's order, its names mapped onto the record's own
    (``parsing.match_tags``). Raises InvalidOutput when ``ranking`` is not a list of strings,
    names a tag the record lacks or leaves one out; ValueError when the text holds no JSON."""
    ranking = _field(extract_json(text), "ranking")
    if not isinstance(ranking, list) or not all(_text(name) for name in ranking):
        raise InvalidOutput("'ranking' must be a list of tag names (strings)")
    names = [t["tag"] for t in record["tags"]]
    order = match_tags(ranking, record["tags"])
    unknown = [str(n) for n in ranking if not match_tags([n], record["tags"])]
    if unknown:
        raise InvalidOutput(f"the ranking names tags that do not exist: {unknown}")
    missing = [n for n in names if n not in order]
    if missing:
        raise InvalidOutput(f"the ranking leaves out tags: {missing}")
    by_name = {t["tag"]: t for t in record["tags"]}
    return {**record, "tags": [by_name[n] for n in order]}


# ---- generate-questions ----

def questions_request(record: Record, max_tokens: int) -> Request:
    """prompts/generate_questions.txt with the record's (ranked) tags, asking for funnel questions
    with answers and the tags each reveals (QUESTIONS_SCHEMA), in at most ``max_tokens`` tokens."""
    listing = format_tags(record["tags"])
    return Request.chat(None, _fill(load("generate_questions"), tags=listing),
                        max_tokens=max_tokens, json_schema=QUESTIONS_SCHEMA)


def accept_questions(record: Record, text: str) -> Record:
    """The record plus ``questions``: ``[{"question", "answer", "tags"}]`` = Q_i, A_i, T_i in the
    model's (funnel) order, tag names mapped onto the record's (``parsing.match_tags``). Raises
    InvalidOutput when the list is empty, an item lacks a non-empty question or answer, names a
    tag the record lacks or reveals none, or some tag is revealed by no question; ValueError when
    the text holds no JSON."""
    raw = _field(extract_json(text), "questions")
    if not isinstance(raw, list) or not raw:
        raise InvalidOutput("'questions' must be a non-empty list")
    questions = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidOutput(f"questions[{i}] must be an object")
        if not _text(item.get("question")) or not _text(item.get("answer")):
            raise InvalidOutput(f"questions[{i}] needs a non-empty 'question' and 'answer', both strings")
        question, answer = item["question"].strip(), item["answer"].strip()
        named = item.get("tags")
        named = named if isinstance(named, list) else [named] if named else []
        if not all(_text(name) for name in named):
            raise InvalidOutput(f"questions[{i}].tags must be a list of tag names (strings)")
        revealed = match_tags(named, record["tags"])
        unknown = [str(n) for n in named if not match_tags([n], record["tags"])]
        if unknown:
            raise InvalidOutput(f"questions[{i}] maps to tags that do not exist: {unknown}")
        if not revealed:
            raise InvalidOutput(f"questions[{i}] reveals no tag; every question must name the tags it reveals")
        questions.append({"question": question, "answer": answer, "tags": revealed})
    covered = {name for q in questions for name in q["tags"]}
    uncovered = [t["tag"] for t in record["tags"] if t["tag"] not in covered]
    if uncovered:
        raise InvalidOutput(f"no question reveals these tags: {uncovered}")
    return {**record, "questions": questions}


@dataclass(frozen=True)
class Stage:
    """One forward stage: ``needs`` checks an input record (ValueError: it cannot run on it),
    ``request(record, max_tokens)`` builds the prompt, ``accept(record, text)`` makes the output
    record or raises InvalidOutput/ValueError to ask again, and ``max_tokens`` is the default
    answer budget in tokens."""

    name: str
    needs: records.Validator
    request: Callable[[Record, int], Request]
    accept: Callable[[Record, str], Record]
    max_tokens: int


STAGES: dict[str, Stage] = {
    "structure": Stage("structure", records.check_profile, structure_request, accept_structure, 1024),
    "rank": Stage("rank", records.check_tags, rank_request, accept_rank, 512),
    "generate-questions": Stage("generate-questions", records.check_tags, questions_request, accept_questions, 2048),
}


@dataclass
class StageSummary:
    """Counts of one stage run; every input record is one of ok, failed, passed_through or resumed."""

    stage: str
    ok: int = 0
    failed: int = 0  # written with an 'error' field
    passed_through: int = 0  # carried an 'error' from an earlier stage: written untouched
    resumed: int = 0  # finished by an earlier, interrupted run
    retried: int = 0  # re-asks, summed over attempts
    invalid_input: list[str] = field(default_factory=list)  # "FILE:LINE: why" of each skipped input line
    counters: dict[str, int] = field(default_factory=dict)  # the backend's (``Backend.counters``)

    def describe(self) -> str:
        """The one-line summary the CLI prints on stderr."""
        counts = self.counters
        cache_note = f", {counts['calls']} model calls, {counts['from_cache']} from cache" if "calls" in counts else ""
        if counts.get("refreshed"):
            cache_note += f", {counts['refreshed']} cached failures asked again"
        if "http_retries" in counts:
            cache_note += f", {counts['http_retries']} HTTP retries"
        return (
            f"{self.stage}: {self.ok} ok, {self.failed} failed (written with 'error'), "
            f"{self.passed_through} passed through with earlier errors, {self.resumed} resumed, "
            f"{len(self.invalid_input)} invalid input lines skipped, {self.retried} re-asks{cache_note}"
        )


# A reply cut at its token budget is asked again with twice the budget, up to this many tokens.
MAX_TOKENS_CAP = 8192


def _retry_request(original: Request, output: str, reason: str) -> Request:
    # Showing the model its own answer and what was wrong changes the prompt, so even a greedy
    # model answers differently, and the cache keeps each attempt apart. An empty reply is shown
    # as a placeholder: APIs reject empty message parts (Gemini answers 400 INVALID_ARGUMENT).
    messages = original.messages + (
        {"role": "assistant", "content": output if output.strip() else "(empty reply)"},
        {"role": "user", "content": f"That reply is not valid: {reason}. Reply again with the corrected JSON only."},
    )
    return Request(messages=messages, max_tokens=original.max_tokens, temperature=original.temperature,
                   seed=original.seed, json_schema=original.json_schema)


def _next_request(request: Request, text: str, finish: str, detail: str) -> tuple[Request | None, str]:
    """The re-ask after an answer that did not finish normally, or None (with the reason) when none can help."""
    if finish == "failed":
        return None, detail  # the backend spent its own retries
    if finish == "blocked":
        return None, f"blocked by the model's safety filter ({detail})"
    if finish == "length":
        if request.max_tokens >= MAX_TOKENS_CAP:
            return None, f"the answer was cut at its token budget ({detail}; the cap is {MAX_TOKENS_CAP})"
        # The same conversation with more room: a cut answer says nothing wrong about the prompt.
        return replace(request, max_tokens=min(MAX_TOKENS_CAP, 2 * request.max_tokens)), f"the answer was cut ({detail})"
    reason = f"the reply was empty ({detail})" if detail else "the reply was empty"
    return _retry_request(request, text, reason), reason


def process_batch(stage: Stage, batch: list[Record], backend: Backend, retries: int,
                  summary: StageSummary, max_tokens: int | None = None) -> list[Record]:
    """Run one batch through the model, retrying invalid answers; outputs in input order.

    A record whose answer stays unusable (invalid, blocked, cut at ``MAX_TOKENS_CAP`` tokens,
    or its calls failed for good) comes out with an ``error`` naming the cause; its answers are
    dropped from the cache so a later run asks again.
    """
    results: list[Record | None] = [None] * len(batch)
    pending = {i: stage.request(record, max_tokens or stage.max_tokens) for i, record in enumerate(batch)}
    asked: dict[int, list[Request]] = {i: [] for i in pending}
    last: dict[int, tuple[str, str]] = {}
    attempts: dict[int, int] = {}

    def fail(i: int, text: str, message: str) -> None:
        results[i] = {**batch[i], "error": {"stage": stage.name, "message": message, "output": text[:4000]}}
        summary.failed += 1
        backend.forget(asked[i])

    for attempt in range(retries + 1):
        if not pending:
            break
        if attempt:
            summary.retried += len(pending)
        order = list(pending)
        # Per request: one that fails for good becomes this record's error, not the batch's.
        answers = backend.generate_each([pending[i] for i in order])
        retry: dict[int, Request] = {}
        for i, text in zip(order, answers):
            asked[i].append(pending[i])
            attempts[i] = attempt + 1
            finish, detail = answer_status(text)
            if finish != "stop":
                following, reason = _next_request(pending[i], text, finish, detail)
                if following is None:
                    # A failed call already names its own attempts.
                    fail(i, text, reason if finish == "failed" else f"{reason} (after {attempt + 1} attempt{'s' if attempt else ''})")
                else:
                    last[i] = (text, reason)
                    retry[i] = following
                continue
            try:
                results[i] = stage.accept(batch[i], text)
            except (InvalidOutput, ValueError) as exc:
                last[i] = (text, str(exc))
                retry[i] = _retry_request(pending[i], text, str(exc))
        pending = retry
    for i in pending:
        text, reason = last[i]
        fail(i, text, f"{reason} (after {attempts[i]} attempt{'s' if attempts[i] > 1 else ''})")
    summary.ok += sum(1 for r in results if r is not None and "error" not in r)
    return [r for r in results if r is not None]


def _batches(items: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def run_forward_stage(
    stage: Stage,
    inputs: Iterable[Record],
    backend: Backend,
    writer: records.RecordWriter,
    *,
    retries: int = 2,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> StageSummary:
    """Stream ``inputs`` through ``stage`` into ``writer``; every input comes out as exactly one record.

    Records ``writer`` already holds from an interrupted run are counted as resumed, not asked
    again; records carrying an earlier stage's ``error`` are written untouched. Batches of
    ``batch_size`` (default: the backend's) are written as they finish, so a kill loses at most
    the batch in flight.
    """
    summary = StageSummary(stage.name)
    size = batch_size or backend.batch_size
    for chunk in _batches(inputs, size):
        todo = []
        for record in chunk:
            if writer.is_done(record):
                summary.resumed += 1
            elif "error" in record:
                writer.write(record)
                summary.passed_through += 1
            else:
                todo.append(record)
        if todo:
            writer.write_many(process_batch(stage, todo, backend, retries, summary, max_tokens))
        if on_progress:
            on_progress(len(chunk))
    return summary


def run_file(
    stage_name: str,
    source: str | Path,
    out: Path | None,
    model: ModelSpec,
    *,
    options: BackendOptions | None = None,
    use_cache: bool = True,
    retries: int = 2,
    max_tokens: int | None = None,
    skip_invalid: bool = False,
) -> StageSummary:
    """`funnelqa structure|rank|generate-questions`: one stage of Algorithm 1 (lines 1-3) over a JSONL file or '-'.

    Writes one record per valid input line to ``out`` (stdout when None), resuming an interrupted
    run; ``options.batch_size`` records go to the model at a time; ``max_tokens`` caps each
    answer (default: the stage's own). The backend is closed however the run ends.
    Raises UsageError for an unknown stage; InputError ("FILE:LINE: why") for a bad input line,
    unless ``skip_invalid``, which reports it on stderr and skips it; BackendUnavailable or
    BackendError when the model cannot start or stops answering altogether.
    """
    from funnelqa.console import progress, stderr

    if stage_name not in STAGES:
        raise UsageError(f"unknown forward stage {stage_name!r}; use one of {', '.join(STAGES)}")
    stage = STAGES[stage_name]
    options = options or BackendOptions()
    invalid: list[str] = []

    def report(error: InputError) -> None:
        invalid.append(str(error))
        stderr.print(f"[yellow]skipped[/] {error}")

    inputs = records.read_records(source, stage.needs, on_invalid=report if skip_invalid else None)
    with contextlib.closing(open_backend(model, options, use_cache=use_cache)) as backend:
        with records.RecordWriter(out) as writer, progress() as bar:
            task = bar.add_task(stage.name, total=None, status="")
            summary = run_forward_stage(stage, inputs, backend, writer, retries=retries, batch_size=options.batch_size,
                                        max_tokens=max_tokens, on_progress=lambda n: bar.advance(task, n))
        summary.counters = backend.counters()
    summary.invalid_input = invalid
    return summary
