"""Repeated questions: the near-duplicate test behind simulate's ``--no-repeat`` guard and score's
repeat rate, one definition for both.

A question repeats an earlier one of the same interview when their word sets (lower-cased
Unicode words, every script) overlap by a Jaccard index of at least ``REPEAT_THRESHOLD``, or are
equal. At 0.8, "What kinds of movies do you usually enjoy?" and "... usually avoid?" (7 of 9
words shared, 0.78) are different questions; a reworded copy that changes one word in ten is not.
An *exact* repeat (``exact_repeated_turns``) is the same text up to case and spacing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

REPEAT_THRESHOLD = 0.8


def question_words(question: str) -> frozenset[str]:
    """The case-folded ``\\w+`` words of ``question``, as a set: what ``is_repeat`` compares."""
    return frozenset(re.findall(r"\w+", question.casefold()))


def is_repeat(question: str, earlier: Sequence[str]) -> bool:
    """Whether ``question`` repeats any of ``earlier`` (see the module docstring)."""
    words = question_words(question)
    if not words:
        return False
    for other in earlier:
        seen = question_words(other)
        if seen and len(words & seen) / len(words | seen) >= REPEAT_THRESHOLD:
            return True
    return False


def repeated_turns(questions: Sequence[str]) -> int:
    """How many of ``questions`` (one interview, in order) repeat an earlier one."""
    return sum(is_repeat(q, questions[:i]) for i, q in enumerate(questions))


def _exact_form(question: str) -> str:
    return " ".join(question.casefold().split())


def exact_repeated_turns(questions: Sequence[str]) -> int:
    """How many of ``questions`` (one interview, in order) are an exact copy of an earlier one:
    equal once case-folded and with runs of whitespace made one space. Every exact copy is also a
    near-duplicate (``repeated_turns``), so this count is at most that one."""
    seen: set[str] = set()
    copies = 0
    for question in questions:
        form = _exact_form(question)
        copies += form in seen
        seen.add(form)
    return copies
