"""What an interview's turns say about the simulator and the questioner, beyond the profile scores.

Oracle sessions (questioner ``oracle`` or ``oracle-shuffled``) ask the record's own funnel
questions, and each of their turns records the teacher's tags T_i of its question
(``expected_tags``). That makes the simulator checkable turn by turn (``session_counts``):

- tag precision / recall / F1 of the revealed tags R_i against T_i, pooled over turns
  (sum |R_i & T_i| / sum |R_i|, / sum |T_i|; F1 = 2 sum |R & T| / (sum |R| + sum |T|));
- false "No preference": T_i non-empty but nothing revealed, over the turns with T_i non-empty;
- invented tags: revealed tags not in T_i, over all revealed tags (= 1 - precision), and the share
  of answered turns that reveal at least one;
- grounding: per answered turn, the share of the answer's content words (``content_words``) that
  occur in the contents of the tags it revealed, averaged over answered turns with content words.

The same T_i decide, for any questioner, whether a question is about something the user has:
``OracleMap`` holds each oracle question with its T_i, per user and across users, and a model's
question gets the T_i of the user's own funnel question it near-duplicates (``repeats.is_repeat``),
else of the oracle question with exactly its word set. Such a question is *mapped*; it is
*answerable* when its T_i names a tag of this user's target. An unanswered mapped turn is then
either "the user has no such preference" (absent) or "the simulator missed it" (missed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from funnelqa import parsing
from funnelqa.questioners import REFERENCE_QUESTIONERS
from funnelqa.records import Record
from funnelqa.repeats import exact_repeated_turns, is_repeat, question_words, repeated_turns

# Per-user count columns that ``session_counts`` fills, one float each (see ``uncertainty.UserTable``).
COUNT_COLUMNS = (
    "turns", "unanswered", "asked", "repeated", "exact_repeated", "non_question", "mapped", "answerable",
    "unanswered_absent", "unanswered_missed",
    "f_turns", "f_tp", "f_tp2", "f_revealed", "f_expected", "f_pair", "f_expected_turns", "f_false_np",
    "f_invented", "f_answered", "f_invented_turns", "f_grounding", "f_grounded",
)
# Each questioner-behaviour metric as (numerator, denominator) of summed counts.
BEHAVIOUR_RATIOS = {
    "exact_repeat_rate": ("exact_repeated", "asked"),
    "non_question_rate": ("non_question", "turns"),
    "mapped_rate": ("mapped", "turns"),
    "answerable_rate": ("answerable", "mapped"),
    "unanswered_absent_rate": ("unanswered_absent", "turns"),
    "unanswered_missed_rate": ("unanswered_missed", "turns"),
}
FIDELITY_RATIOS = {
    "tag_precision": ("f_tp", "f_revealed"),
    "tag_recall": ("f_tp", "f_expected"),
    "tag_f1": ("f_tp2", "f_pair"),
    "false_no_preference_rate": ("f_false_np", "f_expected_turns"),
    "invented_rate": ("f_invented", "f_revealed"),
    "invented_turn_rate": ("f_invented_turns", "f_answered"),
    "grounding": ("f_grounding", "f_grounded"),
}
# The simulator-fidelity counts among them (prefix f_): kept per simulator, not per system.
FIDELITY_COUNTS = tuple(name for name in COUNT_COLUMNS if name.startswith("f_"))


def content_words(text: str) -> set[str]:
    """The words of ``text`` that carry content: ``parsing``'s case-folded, singular word set minus
    its stopwords (the words tag inference ignores)."""
    return parsing._word_set(text) - parsing._STOPWORDS


def is_question(text: str) -> bool:
    """Whether a questioner's turn is a question: non-empty and holding a question mark (?, ？ or ؟)."""
    return bool(text.strip()) and any(mark in text for mark in parsing._QUESTION_MARKS)


def is_oracle_session(session: Record) -> bool:
    """Whether ``session`` comes from a reference questioner and records T_i (``expected_tags``) on
    every turn: the sessions fidelity is computed from."""
    return session.get("questioner") in REFERENCE_QUESTIONERS and bool(session["turns"]) and all(
        "expected_tags" in turn for turn in session["turns"])


def expected_names(turn: dict, target: Sequence[dict]) -> set[str]:
    """T_i of an oracle turn as target tag names (``parsing.match_tags``: case and plural ignored)."""
    return set(parsing.match_tags(turn.get("expected_tags") or [], target))


class OracleMap:
    """Oracle questions with their T_i, to tell what a model's question is about (module docstring).

    ``add`` takes an oracle session (``is_oracle_session``; others are ignored); ``tags_for(user,
    question)`` gives T_i as a set of tag names, or None when no oracle question matches. Memory:
    each distinct oracle question once per user that was asked it.
    """

    def __init__(self) -> None:
        self._users: dict[str, list[tuple[str, frozenset[str]]]] = {}
        self._exact: dict[frozenset[str], frozenset[str]] = {}

    def __len__(self) -> int:
        return sum(len(questions) for questions in self._users.values())

    def add(self, session: Record) -> None:
        """Keep the questions of ``session`` with their T_i when it is an oracle session."""
        if not is_oracle_session(session):
            return
        own = self._users.setdefault(session["id"], [])
        known = {question for question, _ in own}
        for turn in session["turns"]:
            question = turn["question"]
            tags = frozenset(turn["expected_tags"])
            if question not in known:
                own.append((question, tags))
                known.add(question)
            # Across users: the union of the names a question was asked for.
            words = question_words(question)
            self._exact[words] = self._exact.get(words, frozenset()) | tags

    def tags_for(self, user: str, question: str) -> frozenset[str] | None:
        """T_i of ``question`` for ``user``: the user's own oracle question it repeats, else the one
        with its exact word set (any user), else None."""
        for asked, tags in self._users.get(user, ()):
            if is_repeat(question, [asked]):
                return tags
        return self._exact.get(question_words(question))


def session_counts(session: Record, oracle: OracleMap | None = None) -> dict[str, float]:
    """The per-user counts of ``COUNT_COLUMNS`` for one session (``check_session``-valid).

    ``turns``/``unanswered`` as score counts them; ``asked`` non-empty questions, of which
    ``repeated`` near-duplicates and ``exact_repeated`` exact copies (``funnelqa.repeats``);
    ``non_question`` turns that are no question (``is_question``); ``mapped`` turns whose T_i is
    known (an oracle turn's own, else ``oracle.tags_for``), ``answerable`` those whose T_i names a
    target tag; ``unanswered_absent``/``unanswered_missed`` the unanswered mapped turns without/with
    one. The ``f_*`` counts (fidelity, module docstring) are 0 unless ``is_oracle_session``.
    """
    counts = dict.fromkeys(COUNT_COLUMNS, 0.0)
    turns, target = session["turns"], session["target"]
    names = {tag["tag"] for tag in target}
    content = {tag["tag"]: tag["content"] for tag in target}
    asked = [turn["question"] for turn in turns if turn["question"].strip()]
    counts["turns"] = len(turns)
    counts["unanswered"] = sum(not turn["answered"] for turn in turns)
    counts["asked"] = len(asked)
    counts["repeated"] = repeated_turns(asked)
    counts["exact_repeated"] = exact_repeated_turns(asked)
    counts["non_question"] = sum(not is_question(turn["question"]) for turn in turns)
    oracle_session = is_oracle_session(session)
    for turn in turns:
        if oracle_session:
            expected: set[str] | frozenset[str] | None = expected_names(turn, target)
        elif oracle is not None and turn["question"].strip():
            expected = oracle.tags_for(session["id"], turn["question"])
            expected = None if expected is None else expected & names
        else:
            expected = None
        if expected is None:
            continue
        counts["mapped"] += 1
        counts["answerable"] += bool(expected)
        if not turn["answered"]:
            counts["unanswered_missed" if expected else "unanswered_absent"] += 1
        if oracle_session:
            _fidelity(counts, turn, expected, content)
    return counts


def _fidelity(counts: dict[str, float], turn: dict, expected: set[str], content: Mapping[str, str]) -> None:
    revealed = {name for name in turn["tags"] if name in content}
    hits = len(revealed & expected)
    counts["f_turns"] += 1
    counts["f_tp"] += hits
    counts["f_tp2"] += 2 * hits
    counts["f_revealed"] += len(revealed)
    counts["f_expected"] += len(expected)
    counts["f_pair"] += len(revealed) + len(expected)
    if expected:
        counts["f_expected_turns"] += 1
        counts["f_false_np"] += not revealed
    if revealed:
        invented = len(revealed - expected)
        counts["f_answered"] += 1
        counts["f_invented"] += invented
        counts["f_invented_turns"] += invented > 0
        words = content_words(turn["answer"])
        if words:
            grounded = set().union(*(content_words(content[name]) for name in revealed))
            counts["f_grounding"] += len(words & grounded) / len(words)
            counts["f_grounded"] += 1


def ratios(counts: Mapping[str, float], definitions: Mapping[str, tuple[str, str]]) -> dict[str, float | None]:
    """Each metric of ``definitions`` ({name: (numerator, denominator)}) from summed ``counts``;
    None where the denominator is 0."""
    return {name: (counts[num] / counts[den] if counts[den] else None) for name, (num, den) in definitions.items()}


def pool_fidelity(rows: Sequence[Mapping]) -> dict:
    """One simulator's fidelity over several systems' ``simulator_fidelity`` dicts (their
    ``counts`` summed): ``sessions``, ``turns``, the FIDELITY_RATIOS metrics and ``counts``."""
    total = dict.fromkeys(FIDELITY_COUNTS, 0.0)
    for row in rows:
        for name in FIDELITY_COUNTS:
            total[name] += row["counts"][name]
    return {"sessions": sum(row["sessions"] for row in rows), "turns": int(total["f_turns"]),
            **ratios(total, FIDELITY_RATIOS), "counts": total}
