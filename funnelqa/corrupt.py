"""The forward process, corruption part (paper Eq. 7, 8 and 10; Algorithm 1 lines 4-9). No LLM.

For a user with funnel questions Q_0..Q_{n-1} revealing tag sets T_0..T_{n-1}:
- questioner examples (Eq. 7-8): for t = n-1 down to 0, the partial profile
  JP_t = JP \\ (T_t ∪ ... ∪ T_{n-1}) and the history (Q_i, A_i), i < t, with target Q_t;
- simulator examples (Eq. 10): (JP, Q_i) -> (A_i, T_i) for every i;
- unanswerable simulator examples: questions drawn (seeded) from other users whose revealed tags
  this profile lacks, answered "No preference" with no tags, so the simulator learns to decline.
Eq. 7 is taken literally: a tag revealed by two questions stays hidden until the later one.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funnelqa.errors import InputError, UsageError
from funnelqa.records import Record, RecordWriter, check_questions, read_records, source_name
from funnelqa.render import NO_PREFERENCE

ROLES = ("questioner", "simulator")


def uncovered_tags(record: Record) -> list[str]:
    """Names of the record's tags that no question reveals, in profile order ([] for a record
    that ``check_corruptible`` accepts)."""
    covered = {name for q in record["questions"] for name in q["tags"]}
    return [t["tag"] for t in record["tags"] if t["tag"] not in covered]


def check_corruptible(record: Record) -> None:
    """Eq. 7 only empties the profile at t = 0 when every tag is revealed by some question."""
    missing = uncovered_tags(record)
    if missing:
        raise ValueError(f"tags never revealed by any question: {missing} (JP_0 would not be empty)")


def partial_profile(record: Record, t: int) -> list[dict[str, str]]:
    """JP_t of Eq. 7: the profile minus every tag revealed by Q_t .. Q_{n-1}."""
    removed = {name for q in record["questions"][t:] for name in q["tags"]}
    return [tag for tag in record["tags"] if tag["tag"] not in removed]


def questioner_examples(record: Record) -> list[Record]:
    """Eq. 7-8: for n questions, n examples for t = n-1 down to 0, each ``{"id", "role":
    "questioner", "step": t, "known": JP_t (``partial_profile``), "history": [{"question",
    "answer"}] of Q_0..Q_{t-1}, "target": Q_t's text, "target_tags": T_t}``."""
    questions = record["questions"]
    return [
        {
            "id": record["id"],
            "role": "questioner",
            "step": t,
            "known": partial_profile(record, t),
            "history": [{"question": q["question"], "answer": q["answer"]} for q in questions[:t]],
            "target": questions[t]["question"],
            "target_tags": list(questions[t]["tags"]),
        }
        for t in range(len(questions) - 1, -1, -1)
    ]


def simulator_examples(record: Record) -> list[Record]:
    """Eq. 10: one example per question, in funnel order: ``{"id", "role": "simulator",
    "profile_tags": JP^u, "question": Q_i, "answer": A_i, "tags": T_i, "negative": False}``."""
    return [
        {
            "id": record["id"],
            "role": "simulator",
            "profile_tags": record["tags"],
            "question": q["question"],
            "answer": q["answer"],
            "tags": list(q["tags"]),
            "negative": False,
        }
        for q in record["questions"]
    ]


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


class NegativePool:
    """The questions of every user, indexed so each user's draw of negatives costs no scan of the pool.

    A question qualifies as a negative for user u when one of its occurrences (the same text may
    be asked of several users) reveals tag names, none of which u's profile has. The draw is
    ``rng.sample`` over the sorted, unique qualifying texts, as ``negative_examples`` defines it.
    Texts are grouped into classes by the tag-name sets of their occurrences; a user's qualifying
    texts are the union of the classes that have a set disjoint from the profile, so counting them
    is one dot product, and finding the j-th one (in sorted order) is a look-up in per-block counts
    plus a scan of one block. Only question texts are held, never whole records.
    """

    BLOCK = 512  # ranks per block: the per-user work is (classes x blocks) plus one block's scan

    def __init__(self, occurrences: Iterable[tuple[str, list[str]]]):
        import numpy as np

        # text -> the id of its tag-name set, or a set of ids for a text asked with several; ids
        # rather than sets per text, since the pool is the only thing here that grows with the input.
        name_sets: dict[frozenset[str], int] = {}
        names_of: dict[str, int | set[int]] = {}
        for text, tags in occurrences:
            if not tags:
                continue
            found = name_sets.setdefault(frozenset(_norm(name) for name in tags), len(name_sets))
            held = names_of.get(text)
            if held is None:
                names_of[text] = found
            elif isinstance(held, int):
                if held != found:
                    names_of[text] = {held, found}
            else:
                held.add(found)
        self.texts = sorted(names_of)
        classes: dict[frozenset[int], int] = {}
        class_of_rank = np.empty(len(self.texts), dtype=np.int32)
        for rank, text in enumerate(self.texts):
            held = names_of[text]
            signature = frozenset((held,) if isinstance(held, int) else held)
            class_of_rank[rank] = classes.setdefault(signature, len(classes))
        del names_of
        self.name_sets = list(name_sets)
        self.class_sets = [sorted(signature) for signature in classes]
        self.class_of_rank = class_of_rank
        blocks = max(1, -(-len(self.texts) // self.BLOCK))
        counts = np.zeros((len(classes), blocks), dtype=np.float64)  # float: the dot product runs in BLAS
        np.add.at(counts, (class_of_rank, np.arange(len(self.texts)) // self.BLOCK), 1.0)
        self.block_counts = counts
        self._qualifying: dict[frozenset[str], Any] = {}

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> NegativePool:
        """The pool of every question of ``records`` (validated forward records, read once),
        each with the tag names it reveals."""
        return cls((q["question"], q["tags"]) for record in records for q in record["questions"])

    def _classes_for(self, own: frozenset[str]):
        """Boolean per class: does one of its tag-name sets avoid every name in ``own``? Cached per profile."""
        import numpy as np

        found = self._qualifying.get(own)
        if found is None:
            disjoint = [own.isdisjoint(names) for names in self.name_sets]
            found = np.array([any(disjoint[i] for i in sets) for sets in self.class_sets], dtype=bool)
            if len(self._qualifying) < 4096:
                self._qualifying[own] = found
        return found

    def draw(self, record: Record, count: int, rng: random.Random) -> list[str]:
        """The same texts, in the same order, as ``negative_examples`` draws with the full pool."""
        import numpy as np

        own = frozenset(_norm(t["tag"]) for t in record["tags"])
        qualifying = self._classes_for(own)
        per_block = qualifying.astype(np.float64) @ self.block_counts
        ends = np.cumsum(per_block)
        total = int(ends[-1]) if len(ends) else 0
        chosen = []
        # rng.sample draws indexes from the population's length alone, so sampling a range gives
        # the same indexes (and the same rng state) as sampling the list itself.
        for index in rng.sample(range(total), min(count, total)):
            block = int(np.searchsorted(ends, index, side="right"))
            offset = index - (int(ends[block - 1]) if block else 0)
            start = block * self.BLOCK
            members = np.flatnonzero(qualifying[self.class_of_rank[start : start + self.BLOCK]])
            chosen.append(self.texts[start + int(members[offset])])
        return chosen


def negative_examples(record: Record, pool: list[tuple[str, dict]] | NegativePool, count: int,
                      rng: random.Random) -> list[Record]:
    """Questions from other users about concepts (tag names) this profile does not have."""
    if isinstance(pool, NegativePool) and not _asks_foreign_tags(record):
        chosen = pool.draw(record, count, rng)
    else:
        if isinstance(pool, NegativePool):
            raise ValueError(f"record {record['id']!r} has questions revealing tags its profile lacks")
        own = {_norm(t["tag"]) for t in record["tags"]}
        candidates = [
            q for user, q in pool
            if user != str(record["id"]) and q["tags"] and not any(_norm(name) in own for name in q["tags"])
        ]
        # Sorted and unique, so the draw depends on the seed and the set of users, not their order.
        unique = sorted({q["question"] for q in candidates})
        chosen = rng.sample(unique, min(count, len(unique)))
    return [
        {
            "id": record["id"],
            "role": "simulator",
            "profile_tags": record["tags"],
            "question": question,
            "answer": NO_PREFERENCE,
            "tags": [],
            "negative": True,
        }
        for question in chosen
    ]


def _asks_foreign_tags(record: Record) -> bool:
    # NegativePool leaves out the "other users" test: a user's own questions reveal its own tags,
    # so they never qualify. A record whose questions name other tags would break that.
    own = {_norm(t["tag"]) for t in record["tags"]}
    return any(_norm(name) not in own for q in record["questions"] for name in q["tags"])


def corrupt(records: Iterable[Record], *, seed: int = 0, negatives: int = 2,
            roles: Iterable[str] = ROLES, pool: NegativePool | None = None) -> Iterator[Record]:
    """All training examples for ``records``, deterministic for a given seed and input.

    Streams: one record in memory at a time, plus ``pool``, the questions of every user that the
    negatives are drawn from. Without ``pool`` the records are read twice (a list is made of
    them first if they are a one-shot iterator), once to build it.
    """
    roles = set(roles)
    listed = None
    if pool is None and negatives > 0 and "simulator" in roles:
        if not isinstance(records, Sequence):
            records = list(records)
        pool = NegativePool.from_records(records)
        listed = records
    for record in records:
        if "questioner" in roles:
            yield from questioner_examples(record)
        if "simulator" in roles:
            yield from simulator_examples(record)
            if pool is not None:
                # One generator per user: a user's negatives do not depend on where it sits in the file.
                rng = random.Random(f"{seed}:{record['id']}")
                if listed is not None and _asks_foreign_tags(record):
                    # Unvalidated input: the full scan still gives the defined draw, slowly.
                    yield from negative_examples(record, [(str(r["id"]), q) for r in listed for q in r["questions"]],
                                                 negatives, rng)
                else:
                    yield from negative_examples(record, pool, negatives, rng)


@dataclass
class CorruptSummary:
    """What ``corrupt_file`` wrote: examples per kind, and the input it left out."""

    users: int = 0  # records that became examples
    questioner: int = 0  # Eq. 7-8 examples
    simulator: int = 0  # Eq. 10 examples
    negative: int = 0  # unanswerable simulator examples
    errors: int = 0  # records carrying an earlier stage's 'error', left out
    skipped: list[str] = field(default_factory=list)  # "FILE:LINE: why" of each invalid line skipped

    def describe(self) -> str:
        """The one-line summary the CLI prints on stderr."""
        return (
            f"corrupt: {self.users} users -> {self.questioner} questioner, {self.simulator} simulator "
            f"and {self.negative} unanswerable examples; {self.errors} records with upstream "
            f"errors and {len(self.skipped)} invalid lines skipped"
        )


@contextlib.contextmanager
def _rereadable(source: str) -> Iterator[str]:
    """A path that can be read twice: the file itself, or stdin spooled to a temporary file."""
    if source != "-":
        yield source
        return
    with tempfile.NamedTemporaryFile(prefix="funnelqa-corrupt-", suffix=".jsonl") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        yield spool.name


def _named(error: InputError, source: str) -> InputError:
    # Lines of spooled stdin are reported as stdin's, not the temporary file's.
    return InputError(source_name(source), error.line, error.message) if source == "-" else error


def _validate(record: Record) -> None:
    check_questions(record)
    check_corruptible(record)


def corrupt_file(source: str | Path, out: Path | None, *, seed: int = 0, negatives: int = 2,
                 roles: Iterable[str] = ROLES, skip_invalid: bool = False) -> CorruptSummary:
    """`funnelqa corrupt`: the training examples (Eq. 7, 8, 10, plus unanswerables) of a forward file.

    ``source`` is a JSONL path or '-' (stdin, spooled to a temporary file when the negatives need
    a second pass); ``out`` None writes stdout. Per user with n questions: n questioner examples
    (t = n-1..0), n simulator examples and up to ``negatives`` unanswerable ones, as ``corrupt``
    yields them for ``seed``. Records carrying an earlier stage's ``error`` are counted and left
    out. A re-run starts over (corruption takes seconds) rather than resuming.
    Raises UsageError for a role other than questioner or simulator; InputError ("FILE:LINE: why",
    stdin's lines as ``<stdin>``) for a bad line, unless ``skip_invalid``, which reports it on
    stderr and skips it.
    """
    from funnelqa.console import stderr

    roles = tuple(roles)
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise UsageError(f"unknown role(s) {unknown}; use {' or '.join(ROLES)}")
    source = str(source)
    summary = CorruptSummary()

    def report(error: InputError) -> None:
        error = _named(error, source)
        summary.skipped.append(str(error))
        stderr.print(f"[yellow]skipped[/] {error}")

    def usable(loaded: Iterable[Record]) -> Iterator[Record]:
        for record in loaded:
            if "error" in record:
                summary.errors += 1
            else:
                summary.users += 1
                yield record

    try:
        with _rereadable(source) as path:
            pool = None
            if negatives > 0 and "simulator" in roles:
                # First pass: the questions alone, for the negatives; the second streams the records.
                first = read_records(path, _validate, on_invalid=report if skip_invalid else None)
                pool = NegativePool.from_records(r for r in first if "error" not in r)
            # Bad lines were reported by the first pass (when there was one): the second only skips them.
            quiet = (lambda error: None) if pool is not None else report
            loaded = read_records(path, _validate, on_invalid=quiet if skip_invalid else None)
            with RecordWriter(out, resume=False) as writer:
                for example in corrupt(usable(loaded), seed=seed, negatives=negatives, roles=roles, pool=pool):
                    writer.write(example)
                    if example.get("negative"):
                        summary.negative += 1
                    elif example["role"] == "questioner":
                        summary.questioner += 1
                    else:
                        summary.simulator += 1
    except InputError as exc:
        raise _named(exc, source) from None
    return summary
