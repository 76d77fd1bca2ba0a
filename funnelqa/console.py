"""Everything meant for people goes to stderr; stdout carries JSONL only."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# soft_wrap: a summary line stays one line in logs, whatever the width.
stderr = Console(stderr=True, soft_wrap=True)


def progress(**kwargs) -> Progress:
    """A rich Progress on stderr: description, bar, done/total, the task's ``status`` field (give
    ``status=`` to ``add_task``), elapsed and remaining time. Draws nothing when stderr is not a
    terminal. ``kwargs`` go to ``rich.progress.Progress``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        # A log file or CI output should get the one-line summaries, not a frozen bar.
        disable=not stderr.is_terminal,
        transient=False,
        **kwargs,
    )
