"""The ONE place where records become prompts and model text becomes records.

Training (``train-questioner``, ``train-simulator``) and inference (``simulate``) both call these
functions; if they rendered differently, a fine-tuned model would silently degrade.

Two profile forms for the questioner (paper Sec. 4.2.3):
- ``answers``: the partial profile JP_t, i.e. the tag contents revealed so far (Eq. 7-8);
- ``qa``: the questions asked so far with their answers (Eq. 5), which also shows the questions
  that went unanswered and so discourages repeats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from funnelqa.prompts import load

PROFILE_FORMS = ("answers", "qa")
NO_PREFERENCE = "No preference"


def format_tags(tags: Sequence[dict[str, str]]) -> str:
    return "\n".join(f"- {t['tag']}: {t['content']}" for t in tags)


def questioner_messages(
    known: Sequence[dict[str, str]], history: Sequence[dict[str, str]], form: str = "answers"
) -> list[dict[str, str]]:
    """Prompt for the next question from a partial profile (``known``) or a Q/A history."""
    if form == "answers":
        body = "What we know about the user so far:\n" + (format_tags(known) if known else "(nothing yet)")
    elif form == "qa":
        lines = [f"Q: {turn['question']}\nA: {turn['answer']}" for turn in history]
        body = "The conversation so far:\n" + ("\n".join(lines) if lines else "(no questions asked yet)")
    else:
        raise ValueError(f"unknown profile form {form!r}; use one of {PROFILE_FORMS}")
    return [
        {"role": "system", "content": load("questioner_system")},
        {"role": "user", "content": body + "\n\nAsk the next question."},
    ]


def questioner_target(question: str) -> str:
    return question.strip()


def simulator_messages(profile_tags: Sequence[dict[str, str]], question: str) -> list[dict[str, str]]:
    """Prompt for the simulated user: the full ground-truth profile and one question."""
    return [
        {"role": "system", "content": load("simulator_system")},
        {"role": "user", "content": f"Profile:\n{format_tags(profile_tags)}\n\nQuestion: {question.strip()}"},
    ]


def simulator_target(answer: str, tags: Sequence[str]) -> str:
    return json.dumps({"answer": answer, "tags": list(tags)}, ensure_ascii=False)


def parse_question(text: str) -> str:
    """The first non-empty line of a questioner's output, without labels or quotes."""
    for line in text.strip().splitlines():
        line = re.sub(r"^\s*(?:\*\*)?(?:next\s+)?question\s*[:：]\s*(?:\*\*)?", "", line.strip(), flags=re.I)
        line = line.strip().strip('"“”').strip()
        if line:
            return line
    return ""


def extract_json(text: str) -> Any:
    """The first JSON value in ``text``: tolerates code fences and chatter around it."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.S)
    if fenced:
        text = fenced.group(1).strip()
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[":
            try:
                value, _ = decoder.raw_decode(text[start:])
                return value
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object found")


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def match_tags(names: Sequence[Any], profile_tags: Sequence[dict[str, str]]) -> list[str]:
    """Map tag names a model wrote onto the profile's own names (case and punctuation ignored)."""
    by_norm = {_normalise(t["tag"]): t["tag"] for t in profile_tags}
    matched: list[str] = []
    for name in names:
        real = by_norm.get(_normalise(str(name)))
        if real and real not in matched:
            matched.append(real)
    return matched


def parse_simulator(text: str, profile_tags: Sequence[dict[str, str]]) -> tuple[str, list[str]]:
    """(answer, revealed tag names). Tags not in the profile are dropped: the simulator cannot
    reveal what the user does not have. Unparseable output counts as no answer."""
    try:
        data = extract_json(text)
    except ValueError:
        return NO_PREFERENCE, []
    if not isinstance(data, dict):
        return NO_PREFERENCE, []
    answer = str(data.get("answer") or "").strip() or NO_PREFERENCE
    tags = data.get("tags") or []
    if not isinstance(tags, list):
        tags = [tags]
    revealed = match_tags(tags, profile_tags)
    if is_no_preference(answer):
        return NO_PREFERENCE, []
    return answer, revealed


def is_no_preference(answer: str) -> bool:
    return _normalise(answer) in {"no preference", "i don t know", "no preferences", "none", ""}
