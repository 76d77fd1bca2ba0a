"""export: the training sequences of train-questioner / train-simulator as chat records for other fine-tuners."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from funnelqa.commands import common


def register(app: typer.Typer) -> None:
    """Add ``export`` to ``app``: ``training.export.export_file``, its summary printed on stderr."""
    @app.command("export")
    def export_command(
        examples: str = common.INPUT,
        role: str = typer.Option(..., "--role", help="questioner or simulator: whose training sequences."),
        profile_form: Optional[str] = typer.Option(
            None, "--profile-form", help="Questioner only: qa (default) or answers, as train-questioner's."
        ),
        layout: str = typer.Option(
            "auto", "--layout",
            help="conversation (one record per user), steps (one per example) or auto, as the trainer picks.",
        ),
        seed: int = typer.Option(0, "--seed", help="The trainer's --seed: where the inserted unanswerable turns go."),
        out: Optional[Path] = common.OUT,
    ) -> None:
        """Write what train-questioner / train-simulator train on as {"messages": [...]} records (trl, OpenAI format).

        Reads `funnelqa corrupt` output. One record per training sequence: a user's interview, or one
        example for --layout steps (the answers form). Assistant messages carry "weight": 1 where the
        trainer puts loss, 0 where it does not (the questioner's unanswerable questions).
        """
        def action() -> None:
            from funnelqa.console import stderr
            from funnelqa.training.export import export_file

            summary = export_file(examples, common.out_path(out), role=role, profile_form=profile_form,
                                  layout=layout, seed=seed)
            stderr.print(summary.describe())

        common.run(action)
