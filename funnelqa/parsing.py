"""Model text -> records: the questions, JSON answers and tag names that models write.

Lenient, because small untrained models rarely follow the format: labels, quotes, chatter,
``<think>`` blocks, code fences, JSON cut short at the token limit and answers in prose are all
read for what they say. The prompts these answer are built in ``funnelqa.render``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from funnelqa.metrics import unicode_tokens
from funnelqa.render import NO_PREFERENCE


_QUESTION_LABEL = re.compile(
    r"^(?:[-*•>#]+\s*|\d+[.)]\s*)*(?:\*\*)?"
    r"(?:(?:assistant|questioner|interviewer)\s*[:：]\s*)?"
    r"(?:(?:(?:my|the|your)\s+)?(?:next|follow[- ]?up|clarifying|first)?\s*(?:question|q)\s*\d*\s*[:：]\s*)?"
    r"(?:\*\*)?\s*",
    flags=re.I,
)
# Where a sentence may end: after . ! ; or : and a space, before a capital (or a letter of a script
# without case). Whether it does is up to ``_sentence_breaks``.
_BREAK_CANDIDATE = re.compile(r"([.!:;])\s+(?=[\"“(]?([^\W\d_]))")
# "Mrs. Doubtfire", "Alien vs. Predator", "Dr. Strangelove": a period after these ends no sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms mx dr prof sr jr st mt ft vs v no nos vol vols pt pts ch fig inc ltd co corp dept gen col capt "
    "sgt lt rev hon pres gov sen rep ave blvd rd approx etc cf al jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
# A colon ends a preamble ("Here is my question: ..."), not a title ("Dr. Strangelove or: How I
# Learned...", "Star Wars: Episode IV"): it breaks only after one of these words.
_PREAMBLE_WORDS = re.compile(r"\b(?:question|questions|ask|asking|here|here's|wondering|curious|know|next)\b", re.I)


def _sentence_breaks(text: str) -> list[str]:
    pieces, start = [], 0
    for match in _BREAK_CANDIDATE.finditer(text):
        mark, following = match.group(1), match.group(2)
        if following.islower():
            continue
        before = text[start : match.start(1)]
        word = before.split()[-1].lstrip("\"'“(") if before.split() else ""
        if mark == "." and (word.lower() in _ABBREVIATIONS or len(word) == 1 or "." in word):
            continue  # an abbreviation or an initial ("J. R. R. Tolkien", "e.g.")
        if mark == ":" and not _PREAMBLE_WORDS.search(before):
            continue
        pieces.append(text[start : match.end(1)])
        start = match.end()
    pieces.append(text[start:])
    return pieces


_QUESTION_MARKS = "?？؟"
# A reasoning model's thoughts come before its answer; a draft in them is not the answer.
_REASONING_BLOCK = re.compile(r"<(think|thinking|reasoning|thought)>.*?</\1>", re.S | re.I)
_REASONING_END = re.compile(r"</(?:think|thinking|reasoning|thought)>", re.I)


def strip_reasoning(text: str) -> str:
    """``text`` without ``<think>...</think>`` blocks; a block whose start the chat template wrote
    (only ``</think>`` in the output) ends at its closing tag."""
    text = _REASONING_BLOCK.sub("", text)
    closings = list(_REASONING_END.finditer(text))
    return text[closings[-1].end() :] if closings else text


def _clean_question(line: str) -> str:
    line = _QUESTION_LABEL.sub("", line.strip())
    return line.strip().strip("*").strip().strip('"“”\'').strip()


def _first_question(line: str) -> str:
    """The sentence that ends with the first '?' in ``line``: drops "Great, thanks! " before it and chatter after."""
    asked = line[: min(line.index(mark) for mark in _QUESTION_MARKS if mark in line) + 1]
    return _clean_question(_sentence_breaks(asked)[-1])


def parse_question(text: str) -> str:
    """The question in a questioner's output, without labels, quotes or chatter.

    Prefers the first sentence ending in '?' (an untrained model often says "Sure! Here is my
    question: ..." or goes on to answer it itself); otherwise the first non-empty line.
    """
    text = strip_reasoning(text).strip()
    if text.startswith("{") or "```" in text:
        try:
            data = extract_json(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            for key, value in data.items():
                if str(key).lower() in ("question", "next_question", "q") and isinstance(value, str) and value.strip():
                    return _clean_question(value)
    lines = [cleaned for line in text.splitlines() if (cleaned := _clean_question(line))]
    for line in lines:
        if any(mark in line for mark in _QUESTION_MARKS):
            return _first_question(line)
    return lines[0] if lines else ""


def extract_json(text: str) -> Any:
    """The first JSON value in ``text``: tolerates code fences, chatter and reasoning blocks around it.

    Raises ValueError when there is none.
    """
    text = strip_reasoning(text).strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.S)
    # A fence that holds no JSON (prose, or code) must not hide JSON written outside it.
    candidates = [fenced.group(1).strip(), text] if fenced else [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start, char in enumerate(candidate):
            if char in "{[":
                try:
                    value, _ = decoder.raw_decode(candidate[start:])
                    return value
                except json.JSONDecodeError:
                    continue
    raise ValueError("no JSON object found")


def _normalise(name: str) -> str:
    # Letters of every script count ("ジャンル" must not normalise to ""); case and punctuation do not.
    return " ".join(unicode_tokens(name))


def _singular(normalised: str) -> str:
    return " ".join(word[:-1] if len(word) > 3 and word.endswith("s") else word for word in normalised.split())


def match_tags(names: Sequence[Any], profile_tags: Sequence[dict[str, str]]) -> list[str]:
    """Map tag names a model wrote onto the profile's own names.

    Case and punctuation are ignored; failing that, a plural/singular difference ("Theme" for
    "Themes") or a name followed by its content ("Genre: comedy") still matches one tag.
    """
    by_norm = {_normalise(t["tag"]): t["tag"] for t in profile_tags}
    by_singular: dict[str, list[str]] = {}
    for t in profile_tags:
        by_singular.setdefault(_singular(_normalise(t["tag"])), []).append(t["tag"])
    matched: list[str] = []
    for name in names:
        if not isinstance(name, str):
            continue  # null, a list or an object is no tag name; str() would make "None" one
        text = name
        real = by_norm.get(_normalise(text))
        if real is None and ":" in text:
            real = by_norm.get(_normalise(text.split(":", 1)[0]))
        if real is None:
            similar = by_singular.get(_singular(_normalise(text)), [])
            real = similar[0] if len(similar) == 1 else None
        if real and real not in matched:
            matched.append(real)
    return matched


_ANSWER_KEYS = ("answer", "response", "reply")
_TAG_KEYS = ("tags", "tag", "revealed_tags", "revealed")


def _tag_names(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part for part in re.split(r"[,;]", value) if part.strip()]
    if isinstance(value, dict):
        return [value.get("tag") or value.get("name") or ""]
    if isinstance(value, list):
        return [name for item in value for name in (_tag_names(item) if isinstance(item, dict) else [item])]
    return [value]


def _from_json(text: str) -> tuple[str, list[Any]] | None:
    try:
        data = extract_json(text)
    except ValueError:
        return None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        return None
    fields = {str(key).lower(): value for key, value in data.items()}
    answer = next((fields[k] for k in _ANSWER_KEYS if k in fields), None)
    tags = next((fields[k] for k in _TAG_KEYS if k in fields), None)
    if answer is None and tags is None:
        return None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # "How many films a week?" may fairly get 3
    elif not isinstance(answer, str):
        answer = ""  # null, a list or an object answers nothing: never the string "['Drama', 'Comedy']"
    return answer, _tag_names(tags)


_JSON_STRING = r'"((?:[^"\\]|\\.)*)'


def _unescape(fragment: str) -> str:
    try:
        return json.loads(f'"{fragment}"')
    except json.JSONDecodeError:
        return fragment


def _from_truncated_json(text: str) -> tuple[str, list[Any]] | None:
    """Fields of a JSON object cut short (the model hit its token limit mid-object)."""
    answer = re.search(r'"answer"\s*:\s*' + _JSON_STRING, text, flags=re.I)
    tags = re.search(r'"tags"\s*:\s*\[([^\]]*)', text, flags=re.I)
    if answer is None and tags is None:
        return None
    names = [_unescape(m) for m in re.findall(r'"((?:[^"\\]|\\.)*)"', tags.group(1))] if tags else []
    return (_unescape(answer.group(1)) if answer else ""), names


def _from_labels(text: str) -> tuple[str, list[Any]] | None:
    """``Answer: ...`` / ``Tags: a, b`` lines, as a model that ignores "JSON only" tends to write."""
    answer = re.search(r"^\W*answer\W*[:：]\s*(.+)$", text, flags=re.I | re.M)
    tags = re.search(r"^\W*tags?\W*[:：]\s*(.+)$", text, flags=re.I | re.M)
    if answer is None or tags is None:
        return None
    names = [name.strip().strip("[]\"'* ") for name in re.split(r"[,;]", tags.group(1))]
    return answer.group(1).strip().strip('"*'), [name for name in names if name]


# Tags inferred from an answer that names none (an untrained model answers in prose): a tag counts
# as revealed when the answer repeats at least this share of the tag's distinctive words. On the
# MovieLens forward data, reading the teacher's own answers this way recovers its tags with
# precision 0.98 and recall 0.92.
TAG_EVIDENCE = 0.35
# Questions reveal one or two tags; an answer that matches more is a dump of the whole profile,
# which would reveal tags whatever the question was.
MAX_INFERRED_TAGS = 2
_STOPWORDS = frozenset(
    "a an the and or but of to in on for with by at from as is are was be it its this that these those "
    "their they them he she his her i me my you your user users".split()
)


def _word_set(text: str) -> set[str]:
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in unicode_tokens(text)}


def infer_tags(answer: str, profile_tags: Sequence[dict[str, str]]) -> list[str]:
    """Profile tags whose content the answer repeats, best first; [] when none or too many do.

    A tag's distinctive words are its content words minus stopwords and minus words found in more
    than a third of the profile's tags ("films", "enjoys"), which say nothing about which tag it is.
    """
    words = {t["tag"]: _word_set(t["content"]) for t in profile_tags}
    spread: dict[str, int] = {}
    for tag_words in words.values():
        for word in tag_words:
            spread[word] = spread.get(word, 0) + 1
    common = max(1, len(profile_tags) // 3)
    said = _word_set(answer)
    evidence = []
    for name, tag_words in words.items():
        distinctive = {w for w in tag_words if spread[w] <= common and w not in _STOPWORDS}
        if distinctive:
            share = len(distinctive & said) / len(distinctive)
            if share >= TAG_EVIDENCE:
                evidence.append((share, name))
    if len(evidence) > MAX_INFERRED_TAGS:
        return []
    return [name for _, name in sorted(evidence, key=lambda item: -item[0])]


def parse_simulator(text: str, profile_tags: Sequence[dict[str, str]]) -> tuple[str, list[str]]:
    """(answer, revealed tag names). Tags not in the profile are dropped: the simulator cannot
    reveal what the user does not have. An answer that names no profile tag (plain prose, or JSON
    with no usable tags) reveals the tags whose content it repeats (``infer_tags``); prose that
    reveals none counts as no answer."""
    text = strip_reasoning(text)
    fields = _from_json(text) or _from_truncated_json(text) or _from_labels(text)
    prose = fields is None
    answer, names = (text, []) if prose else fields
    answer = answer.strip() or NO_PREFERENCE
    if is_no_preference(answer):
        return NO_PREFERENCE, []
    revealed = match_tags(names, profile_tags) or infer_tags(answer, profile_tags)
    if prose and not revealed:
        return NO_PREFERENCE, []
    return answer, revealed


_NO_PREFERENCE_ANSWERS = {
    "",
    "no preference",
    "no preferences",
    "no preference stated",
    "i don t know",
    "i do not know",
    "don t know",
    "none",
    "n a",
    "unknown",
    "not specified",
    "not mentioned",
    "no answer",
    "no information",
}


def is_no_preference(answer: str) -> bool:
    """Whether ``answer``, ignoring case and punctuation, is empty or a stock non-answer
    ("No preference", "I don't know", "N/A", "none", "not specified", ...)."""
    return _normalise(answer) in _NO_PREFERENCE_ANSWERS
