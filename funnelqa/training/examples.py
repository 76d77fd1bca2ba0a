"""Training sequences from `funnelqa corrupt`: read, rendered by funnelqa.render, tokenized, split by user.

Two layouts of the same examples (corrupt's per-step records, Eq. 8 and 10, are the contract):
- ``conversation``: each user's steps are chained back into the interview they came from, and the
  interview is ONE chat sequence with loss on every assistant turn (paper Eq. 5: for the ``qa``
  form, P_t is exactly the conversation before Q_t, so the conditionals are those of the steps).
  The profile (simulator) or the early turns (questioner) are read once per user, not once per
  step: 5-7x fewer tokens per epoch on the MovieLens data.
- ``steps``: one sequence per corrupt record, the prompt then the target. The ``answers`` form
  needs it: JP_t is rewritten every step, so its prompts are not one conversation.
A target is the assistant turn as the chat template writes it (text and end-of-turn marker), so
the model learns to stop where inference expects it to; tokens come from funnelqa.chat_template,
the same function the hf backend prompts with.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funnelqa import render
from funnelqa.chat_template import encode_chat
from funnelqa.errors import InputError, UsageError
from funnelqa.models import file_sha256
from funnelqa.records import Record, read_records, source_name

IGNORE_INDEX = -100


# ---- contract checks for corrupt's output (each raises ValueError, reported as file:line) ----

def _string(record: Record, key: str, *, allow_empty: bool = False) -> None:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string" if key in record else f"missing field {key!r}")
    if not allow_empty and not value.strip():
        raise ValueError(f"field {key!r} is empty")


def _list_of_objects(record: Record, key: str, fields: Sequence[str]) -> None:
    items = record.get(key)
    if not isinstance(items, list):
        raise ValueError(f"field {key!r} must be a list" if key in record else f"missing field {key!r}")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(f), str) for f in fields):
            raise ValueError(f"{key}[{i}] must be an object with string fields {', '.join(fields)}")


def check_questioner_example(record: Record) -> None:
    """ValueError unless ``known`` is a list of {tag, content} and ``history`` of {question,
    answer}, all strings, and ``target`` is a non-empty string."""
    _list_of_objects(record, "known", ("tag", "content"))
    _list_of_objects(record, "history", ("question", "answer"))
    _string(record, "target")


def check_simulator_example(record: Record) -> None:
    """ValueError unless ``profile_tags`` is a list of {tag, content} (strings), ``question`` and
    ``answer`` are non-empty strings and ``tags`` is a list of strings."""
    _list_of_objects(record, "profile_tags", ("tag", "content"))
    _string(record, "question")
    _string(record, "answer")
    tags = record.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("field 'tags' must be a list of tag names")


CHECKS = {"questioner": check_questioner_example, "simulator": check_simulator_example}


def render_example(record: Record, role: str, profile_form: str | None) -> tuple[list[dict[str, str]], str]:
    """(chat messages, target text) for one per-step example, through funnelqa.render only."""
    if role == "questioner":
        messages = render.questioner_messages(record["known"], record["history"], profile_form or "qa")
        return messages, render.questioner_target(record["target"])
    return render.simulator_messages(record["profile_tags"], record["question"]), render.simulator_target(
        record["answer"], record["tags"]
    )


def step_chat(record: Record, role: str, profile_form: str | None) -> tuple[list[dict[str, str]], list[int]]:
    """One per-step example as the ``steps`` layout trains it: (the prompt of ``render_example``
    followed by its target as the last assistant message, [the index of that message]). Earlier
    assistant messages (the ``qa`` form's past questions) are context, without loss."""
    messages, target = render_example(record, role, profile_form)
    messages = [*messages, {"role": "assistant", "content": target}]
    return messages, [len(messages) - 1]


# ---- reading ----

@dataclass
class ExampleSet:
    """The examples of one role from one input, and what the input held besides them."""

    source: str
    sha256: str
    examples: list[Record]
    other_roles: Counter = field(default_factory=Counter)
    # Questioner only: each user's unanswerable questions (corrupt's simulator negatives), which
    # conversation training puts into the interview answered "No preference", without loss.
    negatives: dict[str, list[str]] = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        """The distinct user ids of ``examples``, as strings, sorted."""
        return sorted({str(r["id"]) for r in self.examples})


def _check_role(record: Record) -> None:
    role = record.get("role")
    if role is None:
        raise ValueError("missing field 'role' (expected `funnelqa corrupt` output)")
    if not isinstance(role, str):
        raise ValueError("field 'role' must be a string")


def read_examples(source: str | Path, role: str) -> ExampleSet:
    """The ``role`` lines of a corrupt output (a path, or '-' for stdin); other roles are counted and skipped."""
    name = source_name(source)
    if str(source) != "-":
        path = Path(source)
        if not path.exists():
            raise InputError(name, None, "no such file")
        if path.is_dir():
            raise InputError(name, None, "is a directory, not a JSONL file")
        return _read_file(path, name, role)
    # stdin is spooled so its hash can be recorded and its lines are read by the same checks.
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
    try:
        return _read_file(Path(spool.name), name, role)
    except InputError as exc:
        raise InputError(name, exc.line, exc.message) from None
    finally:
        Path(spool.name).unlink(missing_ok=True)


def _read_file(path: Path, name: str, role: str) -> ExampleSet:
    check = CHECKS[role]
    examples: list[Record] = []
    other: Counter = Counter()

    def validate(record: Record) -> None:
        _check_role(record)
        if record["role"] == role:
            check(record)

    negatives: dict[str, list[str]] = {}
    for record in read_records(path, validate, allow_duplicate_ids=True):
        if "error" in record:
            continue  # a failure an earlier stage kept visible; there is nothing to learn from it
        if record["role"] == role:
            examples.append(record)
        else:
            other[record["role"]] += 1
            question = record.get("question")
            if record["role"] == "simulator" and record.get("negative") is True and isinstance(question, str) and question.strip():
                negatives.setdefault(str(record["id"]), []).append(question)
    if not examples:
        found = ", ".join(f"{n} {r}" for r, n in other.most_common()) or "no examples at all"
        hint = f"; use train-{other.most_common(1)[0][0]}" if other and other.most_common(1)[0][0] in CHECKS else ""
        raise InputError(name, None, f"holds no {role} examples (found {found}){hint}")
    return ExampleSet(source=name, sha256=file_sha256(path), examples=examples, other_roles=other,
                      negatives=negatives if role == "questioner" else {})


# ---- the held-out split ----

def split_users(users: Sequence[str], eval_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(train users, eval users): whole users go to one side, so no profile leaks into the eval loss."""
    ordered = sorted(set(users))
    if eval_fraction <= 0 or len(ordered) < 2:
        return set(ordered), set()
    random.Random(f"split:{seed}").shuffle(ordered)
    n_eval = min(len(ordered) - 1, max(1, round(eval_fraction * len(ordered))))
    return set(ordered[n_eval:]), set(ordered[:n_eval])


# ---- layouts ----

def default_layout(role: str, profile_form: str | None) -> str:
    """``conversation`` wherever the prompts of a user's steps form one chat; ``answers`` does not."""
    return "steps" if role == "questioner" and profile_form == "answers" else "conversation"


def resolve_layout(role: str, profile_form: str | None, layout: str) -> str:
    """``layout`` (``auto``, ``conversation`` or ``steps``) with ``auto`` made ``default_layout``.
    Raises UsageError for ``conversation`` with the questioner's ``answers`` form."""
    if layout == "auto":
        return default_layout(role, profile_form)
    if layout not in ("conversation", "steps"):
        raise UsageError(f"unknown layout {layout!r}; use auto, conversation or steps")
    if layout == "conversation" and role == "questioner" and profile_form == "answers":
        raise UsageError("--layout conversation needs --profile-form qa: the 'answers' prompts are not one conversation")
    return layout


@dataclass
class Conversation:
    """One user's interview rebuilt from corrupt's per-step records, as funnelqa.render chats it.

    ``turns``: ``{"question", "answer"[, "tags"]}`` in interview order (a questioner chain's last
    turn has no answer: it is the last target); ``trained``: per turn, whether its assistant
    message carries loss (the questioner's inserted unanswerable questions do not).
    """

    user: str
    role: str
    turns: list[dict[str, Any]]
    trained: list[bool]
    profile_tags: list[dict[str, str]] = field(default_factory=list)

    def messages(self, start: int = 0, end: int | None = None) -> tuple[list[dict[str, str]], list[int]]:
        """The chat of turns[start:end] and the indices of its trained assistant messages. A
        window ends on an assistant message: an answer after the last target teaches nothing."""
        end = len(self.turns) if end is None else end
        turns = [dict(t) for t in self.turns[start:end]]
        if self.role == "questioner":
            turns[-1].pop("answer", None)
            messages = render.questioner_conversation(turns)
        else:
            messages = render.simulator_conversation(self.profile_tags, turns)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        return messages, [i for i, keep in zip(assistant, self.trained[start:end]) if keep]


def _insert(turns: list[dict[str, Any]], trained: list[bool], extra: list[dict[str, Any]], *, train: bool,
            rng: random.Random, last: int) -> None:
    """Put each of ``extra`` before a seeded one of the first ``last + 1`` turns."""
    for turn in extra:
        position = rng.randint(0, last)
        turns.insert(position, turn)
        trained.insert(position, train)
        last += 1


def _by_user(examples: Sequence[Record]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = {}
    for record in examples:
        grouped.setdefault(str(record["id"]), []).append(record)
    return grouped


def questioner_conversations(examples: Sequence[Record], negatives: dict[str, list[str]], seed: int
                             ) -> tuple[list[Conversation], list[str]]:
    """(conversations, users whose chain of steps is incomplete or inconsistent). A chain is
    complete when steps 0..n-1 are all there and each step's history is the last step's, cut."""
    by_user = _by_user(examples)
    conversations, incomplete = [], []
    for user, steps in by_user.items():
        steps = sorted(steps, key=lambda r: r.get("step", -1))
        last = steps[-1]
        chain = [{"question": h["question"], "answer": h["answer"]} for h in last["history"]]
        chain.append({"question": last["target"]})
        consistent = [r.get("step") for r in steps] == list(range(len(chain))) and all(
            [{"question": h["question"], "answer": h["answer"]} for h in r["history"]] == chain[: r["step"]]
            and r["target"] == chain[r["step"]]["question"]
            for r in steps
        )
        if not consistent:
            incomplete.append(user)
            continue
        trained = [True] * len(chain)
        unanswerable = [{"question": q, "answer": render.NO_PREFERENCE} for q in sorted(set(negatives.get(user, [])))]
        # Never after the last target: the point is what to ask after an unanswered question.
        _insert(chain, trained, unanswerable, train=False, rng=random.Random(f"negatives:{seed}:{user}"),
                last=len(chain) - 1)
        conversations.append(Conversation(user, "questioner", chain, trained))
    return conversations, incomplete


def simulator_conversations(examples: Sequence[Record], seed: int) -> tuple[list[Conversation], list[str]]:
    """(conversations, users whose examples disagree on the profile). Answered questions keep
    corrupt's order (the funnel); the "No preference" negatives go in at seeded places."""
    by_user = _by_user(examples)
    conversations, inconsistent = [], []
    for user, rows in by_user.items():
        profile = rows[0]["profile_tags"]
        if any(r["profile_tags"] != profile for r in rows):
            inconsistent.append(user)
            continue
        positives = [r for r in rows if not r.get("negative")]
        turns = [{"question": r["question"], "answer": r["answer"], "tags": list(r["tags"])} for r in positives]
        trained = [True] * len(turns)
        extra = [{"question": r["question"], "answer": r["answer"], "tags": list(r["tags"])}
                 for r in rows if r.get("negative")]
        _insert(turns, trained, extra, train=True, rng=random.Random(f"negatives:{seed}:{user}"),
                last=len(turns))
        conversations.append(Conversation(user, "simulator", turns, trained, profile_tags=profile))
    return conversations, inconsistent


def conversations_of(data: ExampleSet, role: str, seed: int) -> tuple[list[Conversation], list[str]]:
    """(``role``'s conversations of ``data``, users left out): ``questioner_conversations`` with
    the user's unanswerable questions, or ``simulator_conversations``; ``seed`` places the inserted turns."""
    if role == "questioner":
        return questioner_conversations(data.examples, data.negatives, seed)
    return simulator_conversations(data.examples, seed)


# ---- tokenization ----

@dataclass(frozen=True)
class Encoded:
    """One tokenized training sequence of one user: ``input_ids`` shape [tokens]; loss falls on
    the ``targets`` spans (start, end) only."""

    input_ids: tuple[int, ...]
    targets: tuple[tuple[int, int], ...]
    user: str
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_length(self) -> int:
        """Tokens that carry loss: the summed lengths of the ``targets`` spans."""
        return sum(end - start for start, end in self.targets)

    @property
    def first_target(self) -> int:
        """Index of the first token that carries loss; the tokens before it are the prompt."""
        return self.targets[0][0]

    def labels(self) -> list[int]:
        """One label per token: the token id inside a target span, IGNORE_INDEX (-100) elsewhere."""
        labels = [IGNORE_INDEX] * len(self.input_ids)
        for start, end in self.targets:
            labels[start:end] = self.input_ids[start:end]
        return labels


@dataclass
class EncodeStats:
    """What encoding did, for the run card: the ``layout``; sequences ``encoded``; prompts
    ``truncated`` (lost their start to --max-length); targets ``dropped_too_long``;
    ``conversations`` rebuilt; ``incomplete_users`` whose steps did not chain into one interview;
    ``windows_split`` (conversations longer than --max-length, cut between turns);
    ``unanswerable_turns`` (the questioner's inserted "No preference" turns, without loss)."""

    layout: str = "steps"
    encoded: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    conversations: int = 0
    incomplete_users: list[str] = field(default_factory=list)
    windows_split: int = 0
    unanswerable_turns: int = 0


def encode_steps(tokenizer: Any, examples: Sequence[Record], role: str, profile_form: str | None,
                 max_length: int) -> tuple[list[Encoded], EncodeStats]:
    """One sequence per example. A prompt too long for ``max_length`` loses tokens from its start; an
    example whose target alone does not fit is dropped, because a cut target teaches a wrong answer."""
    stats = EncodeStats(layout="steps")
    encoded: list[Encoded] = []
    for record in examples:
        messages, targets = step_chat(record, role, profile_form)
        chat = encode_chat(tokenizer, messages, generation_prompt=False, targets=targets)
        (start, end), = chat.targets
        if end - start >= max_length:
            stats.dropped_too_long += 1
            continue
        ids = chat.input_ids[:end]
        cut = max(0, len(ids) - max_length)
        stats.truncated += cut > 0
        encoded.append(Encoded(ids[cut:], ((start - cut, end - cut),), str(record["id"]), cut > 0))
    stats.encoded = len(encoded)
    return encoded, stats


def encode_conversations(tokenizer: Any, conversations: Sequence[Conversation], max_length: int,
                         stats: EncodeStats) -> list[Encoded]:
    """One sequence per conversation; one longer than ``max_length`` is cut between turns into
    windows that each start with the system prompt again. A turn too long for a window alone is dropped."""
    encoded: list[Encoded] = []

    def encode(conversation: Conversation, start: int, end: int) -> Encoded | None:
        messages, targets = conversation.messages(start, end)
        chat = encode_chat(tokenizer, messages, generation_prompt=False, targets=targets)
        if not chat.targets:
            return None
        return Encoded(chat.input_ids[: chat.targets[-1][1]], chat.targets, conversation.user)

    for conversation in conversations:
        stats.conversations += 1
        stats.unanswerable_turns += conversation.trained.count(False) if conversation.role == "questioner" else 0
        whole = encode(conversation, 0, len(conversation.turns))
        if whole is None:
            continue
        if len(whole) <= max_length:
            encoded.append(whole)
            continue
        stats.windows_split += 1
        start = 0
        while start < len(conversation.turns):
            best, end = None, start
            while end < len(conversation.turns):
                window = encode(conversation, start, end + 1)
                if window is not None and len(window) > max_length:
                    break
                best, end = window or best, end + 1
            if end == start:  # this turn alone does not fit
                stats.dropped_too_long += conversation.trained[start]
                start += 1
                continue
            if best is not None:
                encoded.append(best)
            start = end
    stats.encoded = len(encoded)
    return encoded


def encode_examples(tokenizer: Any, data: ExampleSet, role: str, profile_form: str | None, max_length: int,
                    layout: str, seed: int = 0) -> tuple[list[Encoded], EncodeStats]:
    """Tokenize ``data`` in ``layout`` (see the module docstring)."""
    if resolve_layout(role, profile_form, layout) == "steps":
        return encode_steps(tokenizer, data.examples, role, profile_form, max_length)
    stats = EncodeStats(layout="conversation")
    conversations, stats.incomplete_users = conversations_of(data, role, seed)
    return encode_conversations(tokenizer, conversations, max_length, stats), stats
