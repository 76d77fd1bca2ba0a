"""Chat messages -> token ids: the ONE function both training and inference use.

A conversation is cut where the chat template starts and ends each assistant turn, and each piece
is tokenized on its own. So the tokens before an assistant turn are the same whether the turn is
the target of a training sequence or the next thing a model is asked to write in ``simulate``:
a model fine-tuned on whole interviews is prompted with exactly the prefixes it was trained on,
and the prefix cache of the hf backend finds the previous turn's tokens again one turn later.

Source: the template itself is the tokenizer's (``tokenizer.apply_chat_template``, transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from funnelqa.errors import UsageError


class TemplateError(UsageError):
    """The tokenizer has no chat template, or its template rejects or rewrites these messages."""


@dataclass(frozen=True)
class EncodedChat:
    """``input_ids``: token ids, shape [tokens]; ``targets``: (start, end) token spans of the
    assistant turns asked for, each the turn's text and the template's end-of-turn marker."""

    input_ids: tuple[int, ...]
    targets: tuple[tuple[int, int], ...]


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the model's tokenizer has no chat template; use an instruction-tuned model")
    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja raises its own errors, e.g. a template that rejects a role order
        raise TemplateError(f"the chat template cannot render these messages: {exc}") from None


def segments(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, generation_prompt: bool
) -> list[tuple[str, int | None]]:
    """The conversation's text in pieces: ``(text, i)`` is the whole of assistant message ``i``
    as the template writes it (content and end-of-turn marker), ``(text, None)`` what lies between.

    Raises TemplateError when the template writes an earlier turn differently once later turns
    follow (some templates drop reasoning from past turns): such a conversation has no stable prefix.
    """
    pieces: list[tuple[str, int | None]] = []
    covered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], True)
        whole = _render(tokenizer, messages[: index + 1], False)
        if not prompt.startswith(covered) or not whole.startswith(prompt) or len(whole) == len(prompt):
            raise TemplateError("the chat template rewrites earlier turns of a conversation; it cannot be trained turn by turn")
        pieces += [(prompt[len(covered) :], None), (whole[len(prompt) :], index)]
        covered = whole
    final = _render(tokenizer, messages, generation_prompt)
    if not final.startswith(covered):
        raise TemplateError("the chat template rewrites earlier turns of a conversation; it cannot be trained turn by turn")
    pieces.append((final[len(covered) :], None))
    return [(text, index) for text, index in pieces if text]


def encode_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    generation_prompt: bool = True,
    targets: Sequence[int] | None = None,
) -> EncodedChat:
    """Token ids of ``messages`` through the tokenizer's chat template, piece by piece (``segments``).

    ``generation_prompt``: end with the template's opening of an assistant turn (inference).
    ``targets``: indices of the assistant messages whose spans are returned (default: every one).
    Templates write their own special tokens (e.g. Gemma's <bos>), so none are added here.
    """
    pieces = segments(tokenizer, messages, generation_prompt=generation_prompt)
    ids_per_piece = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    wanted = None if targets is None else set(targets)
    input_ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for (_, index), ids in zip(pieces, ids_per_piece):
        if index is not None and (wanted is None or index in wanted):
            spans.append((len(input_ids), len(input_ids) + len(ids)))
        input_ids.extend(ids)
    return EncodedChat(tuple(input_ids), tuple(spans))
