"""Who asks the questions in a simulated interview (Algorithm 2, line 4).

A questioner looks at the interviews still running and proposes one question for each, all at
once, so an LLM questioner answers the whole turn in one batched ``generate`` call. Two
reference questioners need no model: ``oracle`` asks the record's own funnel questions in their
order (the ceiling a learned questioner aims for) and ``oracle-shuffled`` asks the same
questions in a random order (what the funnel order itself is worth).
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from funnelqa import parsing, render
from funnelqa.backends import Backend, ModelSpec, Request, answer_status
from funnelqa.errors import UsageError
from funnelqa.interview import Interview
from funnelqa.repeats import is_repeat

ORACLE = "oracle"
ORACLE_SHUFFLED = "oracle-shuffled"
REFERENCE_QUESTIONERS = (ORACLE, ORACLE_SHUFFLED)

# Funnel questions are one short sentence (under 90 characters in the MovieLens data); the
# headroom lets an untrained model clear its throat before the question without being cut off.
QUESTION_MAX_TOKENS = 64
# The --no-repeat guard: how many seeded samples to try instead of a repeated question, and how
# freely to sample them (1.0: the model's own distribution, so a candidate is still its question).
NO_REPEAT_CANDIDATES = 4
NO_REPEAT_TEMPERATURE = 1.0


class Questioner(ABC):
    """Who asks in a simulated interview: ``ask`` proposes the next question for every running
    interview at once. ``spec`` names it in the sessions (a model spec, "oracle" or "oracle-shuffled")."""

    spec: str = ""

    @abstractmethod
    def ask(self, interviews: Sequence[Interview]) -> list[str | None]:
        """The next question for each interview; None when this questioner has nothing left to ask
        (or its call for that interview failed for good: then ``Interview.fail`` says so)."""


class LLMQuestioner(Questioner):
    """Any backend as the questioner, prompted through the shared renderer (training == inference).

    With ``no_repeat`` (the ``--no-repeat`` guard), a question that repeats one asked earlier in
    the same interview (``funnelqa.repeats``) is replaced by the first of ``NO_REPEAT_CANDIDATES``
    seeded samples that does not; when every sample repeats too, the model's own question stays.
    Each turn the guard touched says so in the session (``guard``), so nothing is hidden.
    """

    def __init__(self, backend: Backend, profile_form: str, max_tokens: int = QUESTION_MAX_TOKENS,
                 no_repeat: bool = False):
        if profile_form not in render.PROFILE_FORMS:
            raise UsageError(f"unknown profile form {profile_form!r}; use one of {', '.join(render.PROFILE_FORMS)}")
        self.backend = backend
        self.spec = backend.spec
        self.profile_form = profile_form
        self.max_tokens = max_tokens
        self.no_repeat = no_repeat

    def request(self, interview: Interview, **options) -> Request:
        """The Request for ``interview``'s next question: ``render.questioner_messages`` in this
        questioner's profile form, ``max_tokens`` (64 by default) and ``options`` (the guard's
        temperature and seed)."""
        messages = render.questioner_messages(interview.known(), interview.history(), self.profile_form)
        return Request(messages=tuple(messages), max_tokens=self.max_tokens, **options)

    def ask(self, interviews: Sequence[Interview]) -> list[str | None]:
        """One batched ``generate_each`` for all ``interviews``, each text read by
        ``parsing.parse_question`` ("" when it holds none); None, and a failed interview, where
        the call failed for good. Then, with ``no_repeat``, repeats are resampled."""
        if not interviews:
            return []
        texts = self.backend.generate_each([self.request(interview) for interview in interviews])
        questions: list[str | None] = []
        for interview, text in zip(interviews, texts):
            finish, detail = answer_status(text)
            if finish == "failed":  # this interview ends with the error; the others go on
                interview.fail("questioner", detail)
                questions.append(None)
            else:
                questions.append(parsing.parse_question(text))
        if self.no_repeat:
            self._replace_repeats(interviews, questions)
        return questions

    def _replace_repeats(self, interviews: Sequence[Interview], questions: list[str | None]) -> None:
        repeating = [
            i for i, (interview, question) in enumerate(zip(interviews, questions))
            if question and is_repeat(question, [turn["question"] for turn in interview.turns])
        ]
        if not repeating:
            return
        # Seeded by turn as well, so a user's candidates do not depend on who else repeats this turn.
        samples = self.backend.generate_each([
            self.request(interviews[i], temperature=NO_REPEAT_TEMPERATURE, seed=1000 * len(interviews[i].turns) + k)
            for i in repeating for k in range(NO_REPEAT_CANDIDATES)
        ])
        for n, i in enumerate(repeating):
            asked = [turn["question"] for turn in interviews[i].turns]
            candidates = [parsing.parse_question(text) for text in samples[n * NO_REPEAT_CANDIDATES : (n + 1) * NO_REPEAT_CANDIDATES]]
            fresh = next((c for c in candidates if c and not is_repeat(c, asked)), None)
            interviews[i].guard = {"repeat": questions[i], "replaced": fresh is not None}
            if fresh is not None:
                questions[i] = fresh


class OracleQuestioner(Questioner):
    """Asks the record's funnel questions Q_0..Q_{n-1}; ``seed`` set: in a per-user random order."""

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.spec = ORACLE if seed is None else ORACLE_SHUFFLED

    def order(self, interview: Interview) -> list[int]:
        """Indices into the record's ``questions`` in asking order: 0..n-1, or for
        ``oracle-shuffled`` a permutation seeded by (seed, user id)."""
        indices = list(range(len(interview.record["questions"])))
        if self.seed is not None:
            # Seeded by user as well, so one user's order does not depend on who else is in the run.
            random.Random(f"{self.seed}:{interview.record['id']}").shuffle(indices)
        return indices

    def ask(self, interviews: Sequence[Interview]) -> list[str | None]:
        """Each record's next question in ``order``; None once all n are asked (stop "exhausted").

        The question's teacher tags T_i go with it (``Interview.expected``, the turn's
        ``expected_tags``): what a faithful simulator would reveal, which score's fidelity reads.
        """
        questions: list[str | None] = []
        for interview in interviews:
            order = self.order(interview)
            asked = len(interview.turns)
            if asked < len(order):
                question = interview.record["questions"][order[asked]]
                interview.expected = [str(name) for name in question.get("tags") or []]
                questions.append(question["question"])
            else:
                questions.append(None)
        return questions


def parse_questioner(text: str) -> str | ModelSpec:
    """A questioner named on the command line: a reference questioner's name, else its ModelSpec
    (UsageError when ``text`` is neither)."""
    return text if text in REFERENCE_QUESTIONERS else ModelSpec.parse(text)


def open_questioner(spec: str | ModelSpec, profile_form: str, open_model: Callable[[ModelSpec], Backend], *,
                    seed: int = 0, no_repeat: bool = False) -> Questioner:
    """The questioner ``spec`` (from ``parse_questioner``) names: ``oracle``, ``oracle-shuffled``,
    or a model opened with ``open_model``."""
    if spec in REFERENCE_QUESTIONERS and no_repeat:
        raise UsageError("--no-repeat guards a model questioner; the oracles ask each of their questions once")
    if spec == ORACLE:
        return OracleQuestioner()
    if spec == ORACLE_SHUFFLED:
        return OracleQuestioner(seed=seed)
    return LLMQuestioner(open_model(spec), profile_form, no_repeat=no_repeat)


def default_profile_form(spec: str | ModelSpec) -> str:
    """The form a fine-tuned questioner was trained on (its adapter's run_card.json), else ``qa``;
    ``spec`` as from ``parse_questioner``.

    ``qa`` is the default because the paper found question history helps a trained questioner
    avoid repeats (Sec. 4.2.3).
    """
    if isinstance(spec, ModelSpec) and spec.adapter is not None:
        card = spec.adapter / "run_card.json"
        try:
            form = json.loads(card.read_text(encoding="utf-8")).get("profile_form")
        except (OSError, json.JSONDecodeError, AttributeError):
            form = None
        if form in render.PROFILE_FORMS:
            return form
    return "qa"
