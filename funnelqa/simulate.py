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
from dataclasses import dataclass, field
from pathlib import Path

from funnelqa import render
from funnelqa.backends import Backend, BackendOptions, Request, answer_status, open_backend
from funnelqa.errors import UsageError
from funnelqa.questioners import ORACLE_SHUFFLED, Questioner, default_profile_form, open_questioner
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

STOP_LIMIT = "limit"  # asked max_questions
STOP_COMPLETE = "complete"  # every target tag revealed: P_current == P_n
STOP_EXHAUSTED = "exhausted"  # a reference questioner had no question left
STOP_ERROR = "error"  # a model call for this user failed for good; the session carries the error


@dataclass
class Interview:
    """One user's interview in progress."""

    record: Record
    turns: list[dict] = field(default_factory=list)
    elicited: list[dict] = field(default_factory=list)
    stop: str | None = None
    # What the --no-repeat guard did to the question of the coming turn, kept with that turn.
    guard: dict | None = None
    # Why this interview stopped early: a model call for it failed for good (its batch-mates go on).
    error: str | None = None

    def fail(self, role: str, detail: str) -> None:
        self.error = f"{role}: {detail}"
        self.stop = STOP_ERROR

    @property
    def target(self) -> list[dict]:
        return self.record["tags"]

    def revealed(self) -> set[str]:
        return {tag["tag"] for tag in self.elicited}

    def known(self) -> list[dict]:
        """JP_t in profile order, as `corrupt` renders it for training."""
        revealed = self.revealed()
        return [{"tag": t["tag"], "content": t["content"]} for t in self.target if t["tag"] in revealed]

    def history(self) -> list[dict]:
        """The questions asked so far with their answers, as the questioner's conversation shows them."""
        return [{"question": turn["question"], "answer": turn["answer"]} for turn in self.turns]

    def simulator_history(self) -> list[dict]:
        """The same turns as the simulated user said them: answer and revealed tags."""
        return [{"question": turn["question"], "answer": turn["answer"], "tags": turn["tags"]} for turn in self.turns]

    def add_turn(self, question: str, answer: str, tags: Sequence[str], raw: str | None) -> None:
        content = {t["tag"]: t["content"] for t in self.target}
        answered = bool(tags)
        self.turns.append(
            {
                "question": question,
                # Algorithm 2, line 9: a question the profile cannot answer gets "No preference".
                "answer": answer if answered else render.NO_PREFERENCE,
                "tags": list(tags),
                "answered": answered,
                "raw": raw,
                **({"guard": self.guard} if self.guard else {}),
            }
        )
        self.guard = None
        revealed = self.revealed()
        for name in tags:
            if name not in revealed:
                self.elicited.append({"tag": name, "content": content[name]})
                revealed.add(name)

    def complete(self) -> bool:
        return len(self.revealed()) == len(self.target)

    def session(self, meta: dict) -> Record:
        return {
            "id": self.record["id"],
            "turns": self.turns,
            "elicited": self.elicited,
            "target": [{"tag": t["tag"], "content": t["content"]} for t in self.target],
            **meta,
            "stop": self.stop,
            **({"error": {"stage": "simulate", "message": self.error}} if self.error else {}),
        }


class UserSimulator:
    """Any backend as the simulated user: JP^u, the interview so far and a question in,
    (answer, revealed tags) out."""

    def __init__(self, backend: Backend, max_tokens: int = ANSWER_MAX_TOKENS):
        self.backend = backend
        self.spec = backend.spec
        self.max_tokens = max_tokens

    def request(self, interview: Interview, question: str) -> Request:
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
                replies.append((*render.parse_simulator(text, interview.target), str(text)))
        return replies


@dataclass
class TurnReport:
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
    cache_path: Path | None = None,
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

    form = profile_form or default_profile_form(questioner)
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
        opened: dict[str, Backend] = {}

        def open_model(spec: str) -> Backend:
            # One model serves both roles when both name it: loaded once, one copy in memory.
            if spec not in opened:
                opened[spec] = open_backend(spec, options, use_cache=use_cache, cache_path=cache_path)
            return opened[spec]

        meta = {"questioner": questioner, "simulator": simulator, "profile_form": form}
        if no_repeat:
            meta["no_repeat"] = True
        if questioner == ORACLE_SHUFFLED:
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
            asker = open_questioner(questioner, form, open_model, seed=seed, no_repeat=no_repeat)
            answerer = UserSimulator(open_model(simulator))
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
