"""Simulated interviews: the evaluation process of the paper (Algorithm 2).

Every user starts from an empty profile. Each turn the questioner asks from what is known so far
and the user simulator answers from the full ground-truth tags JP^u, naming the tags its answer
reveals (or "No preference"). Revealed tags join the partial profile with their content from
JP^u (Algorithm 2, line 7). An interview stops after ``max_questions`` questions, when every
target tag is revealed, or when a reference questioner runs out of questions.

All live interviews move in lockstep: one batched questioner call and one batched simulator call
per turn, which is what makes a GPU (or even a CPU) worth having here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from funnelqa import parsing, render
from funnelqa.backends import Backend, BackendOptions, ModelSpec, Request, answer_status, open_backend
from funnelqa.errors import UsageError
from funnelqa.interview import STOP_COMPLETE, STOP_EXHAUSTED, STOP_LIMIT, Interview
from funnelqa.questioners import ORACLE_SHUFFLED, Questioner, default_profile_form, open_questioner, parse_questioner
from funnelqa.records import Record, RecordWriter, check_questions, read_records
from funnelqa.redact import redact

# A simulator answer is one or two sentences plus tag names: under 300 characters (about 70
# tokens) of JSON in the MovieLens data. Twice that keeps a verbose model's JSON whole, while a
# rambling one cannot hold a whole batch up for long (a batch decodes until its longest answer ends).
ANSWER_MAX_TOKENS = 128

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["answer", "tags"],
}


class UserSimulator:
    """Any backend as the simulated user: JP^u, the interview so far and a question in,
    (answer, revealed tags) out."""

    def __init__(self, backend: Backend, max_tokens: int = ANSWER_MAX_TOKENS):
        self.backend = backend
        self.spec = backend.spec
        self.max_tokens = max_tokens

    def request(self, interview: Interview, question: str) -> Request:
        """The Request for the user's answer to ``question``: ``render.simulator_messages`` (JP^u,
        the interview so far, the question), ``max_tokens`` (128 by default), ANSWER_SCHEMA."""
        messages = render.simulator_messages(interview.target, question, interview.simulator_history())
        return Request(messages=tuple(messages), max_tokens=self.max_tokens, json_schema=ANSWER_SCHEMA)

    def answer(self, asked: Sequence[tuple[Interview, str]]) -> list[tuple[str, list[str], str] | None]:
        """(answer, revealed tag names, raw output) for each (interview, question); None where the
        call failed for good, which ends that interview with its error (``Interview.fail``)."""
        if not asked:
            return []
        texts = self.backend.generate_each([self.request(interview, question) for interview, question in asked])
        replies: list[tuple[str, list[str], str] | None] = []
        for (interview, _), text in zip(asked, texts):
            finish, detail = answer_status(text)
            if finish == "failed":
                interview.fail("simulator", detail)
                replies.append(None)
            else:
                replies.append((*parsing.parse_simulator(text, interview.target), str(text)))
        return replies


@dataclass
class TurnReport:
    """What ``run_interviews`` tells ``on_turn`` after each turn: ``turn`` of ``max_questions``;
    questions ``asked`` and ``answered`` in it; interviews still ``live`` and ``finished``."""

    turn: int
    max_questions: int
    asked: int
    answered: int
    live: int
    finished: int


def run_interviews(
    records: Iterable[Record],
    questioner: Questioner,
    simulator: UserSimulator,
    *,
    max_questions: int = 10,
    meta: dict | None = None,
    on_turn: Callable[[TurnReport], None] | None = None,
) -> Iterator[Record]:
    """Interview every user in lockstep; yield sessions in input order as soon as they can be.

    A session is yielded once it and every session before it have finished, so a consumer that
    writes them as they come keeps input order and still saves work as the run goes.
    """
    if max_questions < 1:
        raise UsageError("--max-questions must be at least 1")
    interviews = [Interview(record) for record in records]
    meta = {"max_questions": max_questions, **(meta or {})}
    emitted = 0
    for turn in range(1, max_questions + 1):
        live = [interview for interview in interviews if interview.stop is None]
        if not live:
            break
        questions = questioner.ask(live)
        asking: list[tuple[Interview, str]] = []
        for interview, question in zip(live, questions):
            if interview.stop is not None:
                continue  # the questioner's call for it failed
            if question is None:
                interview.stop = STOP_EXHAUSTED
            elif not question.strip():
                # Nothing to put to the user; the turn is spent all the same.
                interview.add_turn("", render.NO_PREFERENCE, [], None)
            else:
                asking.append((interview, question))
        replies = simulator.answer(asking)
        for (interview, question), reply in zip(asking, replies):
            if reply is not None:
                interview.add_turn(question, *reply)
        asked = answered = 0
        for interview in live:
            if interview.stop is not None:
                continue
            asked += 1
            answered += interview.turns[-1]["answered"]
            if interview.complete():
                interview.stop = STOP_COMPLETE
            elif len(interview.turns) >= max_questions:
                interview.stop = STOP_LIMIT
        if on_turn is not None:
            still_live = sum(interview.stop is None for interview in interviews)
            on_turn(TurnReport(turn, max_questions, asked, answered, still_live, len(interviews) - still_live))
        while emitted < len(interviews) and interviews[emitted].stop is not None:
            yield interviews[emitted].session(meta)
            emitted += 1
    for interview in interviews[emitted:]:
        yield interview.session(meta)


def simulate_file(
    forward: str | Path,
    *,
    questioner: str,
    simulator: str,
    max_questions: int = 10,
    profile_form: str | None = None,
    out: Path | None = None,
    options: BackendOptions | None = None,
    use_cache: bool = True,
    seed: int = 0,
    limit: int | None = None,
    skip_invalid: bool = False,
    progress: bool = True,
    no_repeat: bool = False,
) -> int:
    """`funnelqa simulate`: interview the users of a forward file; returns how many sessions were written.

    With ``out``, users finished by an earlier, interrupted run are skipped (and kept).
    ``no_repeat``: the questioner's repeat guard (``LLMQuestioner``), recorded in every session.
    """
    from funnelqa.console import stderr

    asker_spec = parse_questioner(questioner)
    simulator_spec = ModelSpec.parse(simulator)
    form = profile_form or default_profile_form(asker_spec)
    if form not in render.PROFILE_FORMS:
        raise UsageError(f"unknown profile form {form!r}; use one of {', '.join(render.PROFILE_FORMS)}")
    on_invalid = (lambda error: stderr.print(f"[yellow]skipped[/] {error}")) if skip_invalid else None
    records = []
    for record in read_records(forward, check_questions, on_invalid=on_invalid):
        if limit is not None and len(records) >= limit:
            break
        if "error" in record:
            stderr.print(f"[yellow]skipped[/] {record['id']}: carries an error from an earlier stage")
            continue
        records.append(record)

    with RecordWriter(out) as writer:
        todo = [record for record in records if not writer.is_done(record)]
        if writer.done:
            stderr.print(f"resuming: {len(records) - len(todo)} of {len(records)} users already interviewed")
        if not todo:
            return 0
        opened: dict[ModelSpec, Backend] = {}

        def open_model(spec: ModelSpec) -> Backend:
            # One model serves both roles when both name it: loaded once, one copy in memory.
            if spec not in opened:
                opened[spec] = open_backend(spec, options, use_cache=use_cache)
            return opened[spec]

        meta = {"questioner": questioner, "simulator": simulator, "profile_form": form}
        if no_repeat:
            meta["no_repeat"] = True
        if asker_spec == ORACLE_SHUFFLED:
            meta["seed"] = seed
        # Sessions keep the specs: a key written into a base URL must not go with them.
        meta.update(questioner=redact(questioner), simulator=redact(simulator))
        totals = {"asked": 0, "answered": 0}

        def report(turn: TurnReport) -> None:
            totals["asked"] += turn.asked
            totals["answered"] += turn.answered
            if progress:
                rate = totals["answered"] / max(1, totals["asked"])
                stderr.print(
                    f"turn {turn.turn}/{turn.max_questions}: asked {turn.asked}, answered {turn.answered}; "
                    f"live {turn.live}, done {turn.finished}/{len(todo)}; answered so far {rate:.0%}"
                )

        try:
            asker = open_questioner(asker_spec, form, open_model, seed=seed, no_repeat=no_repeat)
            answerer = UserSimulator(open_model(simulator_spec))
            failed = 0
            for session in run_interviews(todo, asker, answerer, max_questions=max_questions, meta=meta, on_turn=report):
                writer.write(session)
                failed += "error" in session
            if failed:
                stderr.print(f"[yellow]{failed} interview(s) ended early: a model call for them failed for good "
                             "(their sessions carry 'error'; score leaves them out)")
        finally:
            for backend in opened.values():
                backend.close()
        return writer.written
