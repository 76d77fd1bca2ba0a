"""structure, rank, generate-questions: the LLM half of the forward process."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from funnelqa.commands import common

HELP = {
    "structure": "Turn text profiles into JSON tags (JP^u). Reads {id, profile}; adds 'tags'.",
    "rank": "Reorder each profile's tags from most general to most specific. Reads records with 'tags'.",
    "generate-questions": (
        "Write funnel questions (broad first) with answers and the tags each reveals. "
        "Reads ranked records; adds 'questions'."
    ),
}


def _command(stage_name: str):
    def command(
        source: str = common.INPUT,
        out: Optional[Path] = common.OUT,
        model: str = typer.Option("local", "--model", "-m", help=common.MODEL_HELP),
        retries: int = typer.Option(2, "--retries", min=0, help="Ask again this many times when an answer breaks the contract."),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Cap on generated tokens per answer."),
        skip_invalid: bool = common.SKIP_INVALID,
        no_cache: bool = common.NO_CACHE,
        concurrency: int = common.CONCURRENCY,
        timeout: float = common.TIMEOUT,
        batch_size: int = common.BATCH_SIZE,
        dtype: str = common.DTYPE,
    ) -> None:
        def action() -> None:
            from funnelqa.backends import ModelSpec
            from funnelqa.console import stderr
            from funnelqa.forward import run_file

            summary = run_file(
                stage_name,
                source,
                common.out_path(out),
                ModelSpec.parse(model),
                options=common.backend_options(concurrency, timeout, batch_size, dtype),
                use_cache=not no_cache,
                retries=retries,
                max_tokens=max_tokens,
                skip_invalid=skip_invalid,
            )
            stderr.print(summary.describe())

        common.run(action)

    command.__doc__ = HELP[stage_name]
    return command


def register(app: typer.Typer) -> None:
    """Add ``structure``, ``rank`` and ``generate-questions`` to ``app``: ``forward.run_file`` for
    that stage, its summary printed on stderr."""
    for name in ("structure", "rank", "generate-questions"):
        app.command(name, help=HELP[name])(_command(name))
