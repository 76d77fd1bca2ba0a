"""The ONE place where records become prompts (model text becomes records in ``funnelqa.parsing``).

Training (``train-questioner``, ``train-simulator``) and inference (``simulate``) both call these
functions; if they rendered differently, a fine-tuned model would silently degrade. Messages
become tokens in one place too: ``funnelqa.chat_template``.

An interview is a chat (paper Eq. 5: P_t is the conversation before Q_t):
- the questioner's: system prompt, an opening user line, then assistant = Q_i and user = A_i;
- the user simulator's: system prompt with the full profile JP^u, then user = Q_i and
  assistant = the JSON answer naming the revealed tags T_i (Eq. 10).
So one causal sequence per user trains every turn at once, and ``simulate`` extends the same
conversation turn by turn.

Two profile forms for the questioner (paper Sec. 4.2.3):
- ``qa``: the questions asked so far with their answers (Eq. 5), the conversation above, which
  also shows the questions that went unanswered and so discourages repeats;
- ``answers``: the partial profile JP_t, i.e. the tag contents revealed so far (Eq. 7-8), one
  prompt per step (it is not a conversation: JP_t is rewritten each turn).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from funnelqa.prompts import load

PROFILE_FORMS = ("answers", "qa")
NO_PREFERENCE = "No preference"
# Chat templates (Gemma's) and chat APIs (Gemini's) want the user to speak first; the questioner
# opens the interview in reply to this line.
QUESTIONER_OPENER = "Hi! I'm ready for your questions."


def format_tags(tags: Sequence[dict[str, str]]) -> str:
    """One "- TAG: CONTENT" line per tag, in list order: how every prompt shows a profile."""
    return "\n".join(f"- {t['tag']}: {t['content']}" for t in tags)


def questioner_conversation(turns: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The questioner's side of an interview: ``turns`` are ``{"question", "answer"}``; a last turn
    without ``"answer"`` ends the chat on that question (a training target). Turns with an empty
    question (nothing was asked) are left out: chat APIs reject empty messages."""
    messages = [
        {"role": "system", "content": load("questioner_system")},
        {"role": "user", "content": QUESTIONER_OPENER},
    ]
    for turn in turns:
        if not turn["question"].strip():
            continue
        messages.append({"role": "assistant", "content": questioner_target(turn["question"])})
        if "answer" in turn:
            messages.append({"role": "user", "content": turn["answer"].strip() or NO_PREFERENCE})
    return messages


def questioner_messages(
    known: Sequence[dict[str, str]], history: Sequence[dict[str, str]], form: str = "answers"
) -> list[dict[str, str]]:
    """Prompt for the next question: the conversation so far (``qa``) or the partial profile JP_t
    (``known``) in one message (``answers``)."""
    if form == "qa":
        return questioner_conversation(history)
    if form != "answers":
        raise ValueError(f"unknown profile form {form!r}; use one of {PROFILE_FORMS}")
    body = "What we know about the user so far:\n" + (format_tags(known) if known else "(nothing yet)")
    return [
        {"role": "system", "content": load("questioner_system")},
        {"role": "user", "content": body + "\n\nAsk the next question."},
    ]


def questioner_target(question: str) -> str:
    """The questioner's assistant message for Q_t (the question, stripped): the training target of
    Eq. 8, and how an asked question appears in the conversation."""
    return question.strip()


def simulator_conversation(
    profile_tags: Sequence[dict[str, str]], turns: Sequence[dict[str, Any]]
) -> list[dict[str, str]]:
    """The simulated user's side of an interview: the profile JP^u in the system prompt, then per
    turn user = question and, when the turn has an ``"answer"``, assistant = the JSON answer with
    its ``"tags"``. A last turn without an answer is the question to answer next."""
    messages = [{"role": "system", "content": f"{load('simulator_system')}\n\nProfile:\n{format_tags(profile_tags)}"}]
    for turn in turns:
        if not turn["question"].strip():
            continue
        messages.append({"role": "user", "content": turn["question"].strip()})
        if "answer" in turn:
            messages.append({"role": "assistant", "content": simulator_target(turn["answer"], turn.get("tags", []))})
    return messages


def simulator_messages(
    profile_tags: Sequence[dict[str, str]], question: str, history: Sequence[dict[str, Any]] = ()
) -> list[dict[str, str]]:
    """Prompt for the simulated user: the profile, the interview so far (``history`` of
    ``{"question", "answer", "tags"}``) and the question to answer."""
    return simulator_conversation(profile_tags, [*history, {"question": question}])


def simulator_target(answer: str, tags: Sequence[str]) -> str:
    """The simulated user's assistant message, the target of Eq. 10: ``{"answer": A_i, "tags": T_i}``
    as one line of JSON, non-ASCII kept; ``parsing.parse_simulator`` reads it back."""
    return json.dumps({"answer": answer, "tags": list(tags)}, ensure_ascii=False)
