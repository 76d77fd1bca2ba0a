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


def run_forward(stage_name: str, source: str, out: Optional[Path], model: str, *, retries: int,
                skip_invalid: bool, no_cache: bool, concurrency: int, timeout: float,
                batch_size: int, max_tokens: Optional[int], dtype: str = "auto") -> None:
    from funnelqa import records
    from funnelqa.backends import ModelSpec, open_backend
    from funnelqa.console import progress, stderr
    from funnelqa.forward import STAGES, run_stage

    stage = STAGES[stage_name]
    invalid: list[str] = []

    def report(error) -> None:
        invalid.append(str(error))
        stderr.print(f"[yellow]skipped[/] {error}")

    inputs = records.read_records(source, stage.needs, on_invalid=report if skip_invalid else None)
    backend = open_backend(ModelSpec.parse(model), common.backend_options(concurrency, timeout, batch_size, dtype), use_cache=not no_cache)
    with records.RecordWriter(common.out_path(out)) as writer, progress() as bar:
        task = bar.add_task(stage_name, total=None, status="")
        summary = run_stage(stage, inputs, backend, writer, retries=retries, batch_size=batch_size,
                            max_tokens=max_tokens, on_progress=lambda n: bar.advance(task, n))
    counts = backend.counters()
    cache_note = f", {counts['calls']} model calls, {counts['from_cache']} from cache" if "calls" in counts else ""
    if counts.get("refreshed"):
        cache_note += f", {counts['refreshed']} cached failures asked again"
    if "http_retries" in counts:
        cache_note += f", {counts['http_retries']} HTTP retries"
    stderr.print(
        f"{stage_name}: {summary.ok} ok, {summary.failed} failed (written with 'error'), "
        f"{summary.passed_through} passed through with earlier errors, {summary.resumed} resumed, "
        f"{len(invalid)} invalid input lines skipped, {summary.retried} re-asks{cache_note}"
    )


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
        common.run(lambda: run_forward(
            stage_name, source, out, model, retries=retries, skip_invalid=skip_invalid, no_cache=no_cache,
            concurrency=concurrency, timeout=timeout, batch_size=batch_size, max_tokens=max_tokens, dtype=dtype))

    command.__doc__ = HELP[stage_name]
    return command


def register(app: typer.Typer) -> None:
    for name in ("structure", "rank", "generate-questions"):
        app.command(name, help=HELP[name])(_command(name))
