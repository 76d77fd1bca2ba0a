"""`funnelqa export`: the training sequences of `train-questioner` / `train-simulator` as chat
records that other fine-tuners read (trl's SFTTrainer, OpenAI's fine-tuning API, ...).

One record per training sequence, built by the trainer's own functions (funnelqa.training.examples:
reading corrupt's output, chaining a user's steps into one interview, the seeded places of the
inserted turns; funnelqa.render for every message), so there is no second rendering path:
- ``conversation`` layout: one record per user, the whole interview (the trainer cuts one longer
  than its --max-length into windows; a record here is never cut, there is no tokenizer here);
- ``steps`` layout (the ``answers`` profile form needs it): one record per corrupt example.

The format is OpenAI's chat fine-tuning format, ``{"messages": [{"role", "content"}, ...]}``,
the layout trl's SFTTrainer and most chat fine-tuners read. Which assistant turns carry loss is
OpenAI's per-message ``"weight"``: 1 trained, 0 context only (the questioner's unanswerable
questions, and in the ``steps`` layout the earlier questions of a ``qa`` prompt). Every assistant
message has one. trl (1.16) has no per-message switch: its ``assistant_only_loss`` trains what the
chat template marks with ``{% generation %}``, so a template that marks only turns whose weight is
not 0 honours it (examples/train_with_trl.py). Chat templates ignore keys they do not use, so
the weight changes no rendered text.

The other top-level fields, ``id`` (user), ``role``, ``profile_form``, ``layout`` and ``step``
(``steps`` layout), are for people and scripts: trl drops columns its model does not take; for
OpenAI's upload, keep ``messages`` alone (``jq -c '{messages}'``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from funnelqa.corrupt import ROLES
from funnelqa.errors import UsageError
from funnelqa.records import Record, RecordWriter
from funnelqa.render import PROFILE_FORMS
from funnelqa.training.examples import ExampleSet, conversations_of, read_examples, resolve_layout, step_chat


@dataclass
class ExportSummary:
    """What ``export_file`` wrote: ``records`` (training sequences) of ``users``, in ``layout``;
    ``context_turns``: assistant messages written with weight 0; ``left_out``: users whose steps
    do not chain into one interview (conversation layout), as the trainer leaves them out."""

    role: str
    layout: str
    records: int = 0
    users: int = 0
    context_turns: int = 0
    left_out: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The one-line summary the CLI prints on stderr."""
        line = (
            f"export: {self.records} {self.role} {self.layout} records of {self.users} users, "
            f"{self.context_turns} assistant turns without loss (weight 0)"
        )
        if self.left_out:
            shown = ", ".join(self.left_out[:5]) + (" ..." if len(self.left_out) > 5 else "")
            line += f"; {len(self.left_out)} users left out, their steps do not chain into one interview: {shown}"
        return line


def weighted(messages: Sequence[dict[str, str]], trained: Sequence[int]) -> list[dict]:
    """``messages`` with OpenAI's ``"weight"`` on each assistant message: 1 when its index is in
    ``trained`` (the trainer's loss-carrying turns), else 0; other messages unchanged."""
    keep = set(trained)
    return [
        {**message, "weight": int(index in keep)} if message["role"] == "assistant" else dict(message)
        for index, message in enumerate(messages)
    ]


def export_records(data: ExampleSet, role: str, profile_form: str | None, layout: str, seed: int,
                   summary: ExportSummary) -> Iterator[Record]:
    """The records of ``data`` (``role``'s examples, from ``read_examples``) in ``layout``
    (``conversation`` or ``steps``, already resolved), in the trainer's order; ``seed`` is the
    trainer's --seed (it places the inserted turns). Counts go into ``summary`` as they are written."""
    if layout == "steps":
        chats = ((str(e["id"]), *step_chat(e, role, profile_form), {"step": e["step"]} if "step" in e else {})
                 for e in data.examples)
    else:
        conversations, summary.left_out = conversations_of(data, role, seed)
        chats = ((c.user, *c.messages(), {}) for c in conversations)
    users: set[str] = set()
    for user, messages, trained, extra in chats:
        out = weighted(messages, trained)
        users.add(user)
        summary.records += 1
        summary.users = len(users)
        summary.context_turns += sum(1 for m in out if m.get("weight") == 0)
        yield {"id": user, "role": role, "profile_form": profile_form, "layout": layout, **extra, "messages": out}


def export_file(source: str | Path, out: Path | None, *, role: str, profile_form: str | None = None,
                layout: str = "auto", seed: int = 0) -> ExportSummary:
    """`funnelqa export`: ``role``'s training sequences of a corrupt output (a path, or '-' for
    stdin) as ``{"messages": [...]}`` JSONL on ``out`` (None: stdout), one line per sequence.

    ``profile_form`` (questioner only, default ``qa``), ``layout`` (``auto``: as the trainer picks)
    and ``seed`` mean what they mean to ``train-questioner`` / ``train-simulator``.
    Raises UsageError for an unknown role or form, a form given for the simulator, or
    ``conversation`` with ``answers``; InputError ("FILE:LINE: why") for a bad input line.
    """
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}; use {' or '.join(ROLES)}")
    if role == "simulator" and profile_form is not None:
        raise UsageError("--profile-form is the questioner's: the simulator always reads the whole profile")
    if role == "questioner":
        profile_form = profile_form or "qa"
        if profile_form not in PROFILE_FORMS:
            raise UsageError(f"unknown profile form {profile_form!r}; use {' or '.join(PROFILE_FORMS)}")
    layout = resolve_layout(role, profile_form, layout)
    data = read_examples(source, role)
    summary = ExportSummary(role=role, layout=layout)
    with RecordWriter(out, resume=False) as writer:
        writer.write_many(export_records(data, role, profile_form, layout, seed, summary))
    return summary
