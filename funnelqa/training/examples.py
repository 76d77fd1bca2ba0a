"""Training examples from `funnelqa corrupt`: read, rendered by funnelqa.render, tokenized, split by user.

The prompt is the model's chat template applied to render's messages with the generation prompt;
the target is what the template adds after it for the assistant turn (the answer text and the
end-of-turn marker), so the model learns to stop where inference expects it to.
"""

from __future__ import annotations

import hashlib
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
from funnelqa.errors import InputError, UsageError
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
    _list_of_objects(record, "known", ("tag", "content"))
    _list_of_objects(record, "history", ("question", "answer"))
    _string(record, "target")


def check_simulator_example(record: Record) -> None:
    _list_of_objects(record, "profile_tags", ("tag", "content"))
    _string(record, "question")
    _string(record, "answer")
    tags = record.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("field 'tags' must be a list of tag names")


CHECKS = {"questioner": check_questioner_example, "simulator": check_simulator_example}


def render_example(record: Record, role: str, profile_form: str | None) -> tuple[list[dict[str, str]], str]:
    """(chat messages, target text) for one example, through funnelqa.render only."""
    if role == "questioner":
        messages = render.questioner_messages(record["known"], record["history"], profile_form or "qa")
        return messages, render.questioner_target(record["target"])
    return render.simulator_messages(record["profile_tags"], record["question"]), render.simulator_target(
        record["answer"], record["tags"]
    )


# ---- reading ----

@dataclass
class ExampleSet:
    """The examples of one role from one input, and what the input held besides them."""

    source: str
    sha256: str
    examples: list[Record]
    other_roles: Counter = field(default_factory=Counter)

    @property
    def users(self) -> list[str]:
        return sorted({str(r["id"]) for r in self.examples})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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

    for record in read_records(path, validate, allow_duplicate_ids=True):
        if "error" in record:
            continue  # a failure an earlier stage kept visible; there is nothing to learn from it
        if record["role"] == role:
            examples.append(record)
        else:
            other[record["role"]] += 1
    if not examples:
        found = ", ".join(f"{n} {r}" for r, n in other.most_common()) or "no examples at all"
        hint = f"; use train-{other.most_common(1)[0][0]}" if other and other.most_common(1)[0][0] in CHECKS else ""
        raise InputError(name, None, f"holds no {role} examples (found {found}){hint}")
    return ExampleSet(source=name, sha256=file_sha256(path), examples=examples, other_roles=other)


# ---- the held-out split ----

def split_users(users: Sequence[str], eval_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(train users, eval users): whole users go to one side, so no profile leaks into the eval loss."""
    ordered = sorted(set(users))
    if eval_fraction <= 0 or len(ordered) < 2:
        return set(ordered), set()
    random.Random(f"split:{seed}").shuffle(ordered)
    n_eval = min(len(ordered) - 1, max(1, round(eval_fraction * len(ordered))))
    return set(ordered[n_eval:]), set(ordered[:n_eval])


# ---- tokenization ----

@dataclass(frozen=True)
class Encoded:
    """One tokenized example: the first ``prompt_length`` tokens carry no loss."""

    input_ids: tuple[int, ...]
    prompt_length: int
    user: str
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_length(self) -> int:
        return len(self.input_ids) - self.prompt_length

    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.prompt_length + list(self.input_ids[self.prompt_length :])


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text the model sees before it answers; inference must build its prompt the same way."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the base model's tokenizer has no chat template; train from an instruction-tuned model")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def split_prompt_target(tokenizer: Any, messages: Sequence[dict[str, str]], target: str) -> tuple[str, str]:
    """(prompt text, target text), where target text is everything the template writes for the answer."""
    prompt = chat_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": target}], tokenize=False, add_generation_prompt=False
    )
    if full.startswith(prompt) and len(full) > len(prompt):
        return prompt, full[len(prompt) :]
    # A template that rewrites earlier turns once an answer follows: end the target with EOS ourselves.
    return prompt, target + (tokenizer.eos_token or "")


@dataclass
class EncodeStats:
    encoded: int = 0
    truncated: int = 0
    dropped_too_long: int = 0


def encode_examples(
    tokenizer: Any, examples: Sequence[Record], role: str, profile_form: str | None, max_length: int
) -> tuple[list[Encoded], EncodeStats]:
    """Tokenize every example. A prompt too long for ``max_length`` loses tokens from its start; an
    example whose target alone does not fit is dropped, because a cut target teaches a wrong answer."""
    pairs = [split_prompt_target(tokenizer, *render_example(r, role, profile_form)) for r in examples]
    # Prompt and target are tokenized apart, as at inference, where the model continues the prompt's tokens.
    prompt_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    target_ids = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    stats = EncodeStats()
    encoded: list[Encoded] = []
    for record, prompt, target in zip(examples, prompt_ids, target_ids):
        if len(target) >= max_length:
            stats.dropped_too_long += 1
            continue
        room = max_length - len(target)
        truncated = len(prompt) > room
        prompt = prompt[len(prompt) - room :] if truncated else prompt
        stats.truncated += truncated
        encoded.append(Encoded(tuple(prompt) + tuple(target), len(prompt), str(record["id"]), truncated))
    stats.encoded = len(encoded)
    return encoded, stats
