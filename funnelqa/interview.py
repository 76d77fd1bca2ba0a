"""One user's simulated interview in progress: what was asked, what it revealed, why it stopped.

The questioner (``funnelqa.questioners``) reads it to ask; the simulation (``funnelqa.simulate``)
adds each turn and turns it into a session record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from funnelqa import render
from funnelqa.records import Record

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
    # The oracle's T_i for the coming turn (the teacher's tags of the question it asks), kept with
    # that turn as ``expected_tags`` so score can check the simulator against it.
    expected: list[str] | None = None
    # Why this interview stopped early: a model call for it failed for good (its batch-mates go on).
    error: str | None = None

    def fail(self, role: str, detail: str) -> None:
        """Stop the interview because ``role``'s model call (questioner or simulator) failed for
        good: ``error`` becomes "ROLE: DETAIL" and ``stop`` becomes "error"."""
        self.error = f"{role}: {detail}"
        self.stop = STOP_ERROR

    @property
    def target(self) -> list[dict]:
        """JP^u, the record's ``tags``: ``[{"tag", "content"}]``, general to specific."""
        return self.record["tags"]

    def revealed(self) -> set[str]:
        """Names of the tags elicited so far, as a set (``elicited`` keeps their order and content)."""
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
        """Record one turn (Algorithm 2, lines 6-9). ``tags``: the names the answer reveals, each
        a target tag (KeyError otherwise); none means unanswered, stored as "No preference". New
        tags join ``elicited`` with their content from JP^u (line 7). ``raw``: the simulator's
        unparsed output (None when nothing was asked). A pending ``guard`` note, and a pending
        ``expected`` (the oracle's T_i, stored as ``expected_tags``), move to the turn."""
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
                **({"expected_tags": list(self.expected)} if self.expected is not None else {}),
            }
        )
        self.guard = None
        self.expected = None
        revealed = self.revealed()
        for name in tags:
            if name not in revealed:
                self.elicited.append({"tag": name, "content": content[name]})
                revealed.add(name)

    def complete(self) -> bool:
        """Whether every target tag is revealed (P_current == P_n), which ends the interview."""
        return len(self.revealed()) == len(self.target)

    def session(self, meta: dict) -> Record:
        """The session record of DESIGN.md: ``{"id", "turns": [{"question", "answer", "tags",
        "answered", "raw"[, "guard"][, "expected_tags"]}], "elicited", "target", **meta, "stop"}``, plus ``"error":
        {"stage": "simulate", "message"}`` when a model call failed for good."""
        return {
            "id": self.record["id"],
            "turns": self.turns,
            "elicited": self.elicited,
            "target": [{"tag": t["tag"], "content": t["content"]} for t in self.target],
            **meta,
            "stop": self.stop,
            **({"error": {"stage": "simulate", "message": self.error}} if self.error else {}),
        }
