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

import random
import re
from collections.abc import Iterable, Iterator

from funnelqa.records import Record
from funnelqa.render import NO_PREFERENCE

ROLES = ("questioner", "simulator")


def uncovered_tags(record: Record) -> list[str]:
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


def negative_examples(record: Record, pool: list[tuple[str, dict]], count: int, rng: random.Random) -> list[Record]:
    """Questions from other users about concepts (tag names) this profile does not have."""
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


def corrupt(records: list[Record], *, seed: int = 0, negatives: int = 2,
            roles: Iterable[str] = ROLES) -> Iterator[Record]:
    """All training examples for ``records``, deterministic for a given seed and input."""
    roles = set(roles)
    pool = [(str(r["id"]), q) for r in records for q in r["questions"]]
    for record in records:
        if "questioner" in roles:
            yield from questioner_examples(record)
        if "simulator" in roles:
            yield from simulator_examples(record)
            # One generator per user: a user's negatives do not depend on where it sits in the file.
            rng = random.Random(f"{seed}:{record['id']}")
            yield from negative_examples(record, pool, negatives, rng)
