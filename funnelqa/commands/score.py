"""`funnelqa score`: BLEU/ROUGE of elicited vs target profiles, curves, funnel rank, plots."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from funnelqa.commands import common


def register(app: typer.Typer) -> None:
    @app.command("score")
    def score(
        sessions: List[str] = typer.Argument(..., help="Session files from `funnelqa simulate`, one per system."),
        plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG plots (paper Figs. 3, 4, 7) into this folder."),
        out: Optional[Path] = common.OUT,
        seed: int = typer.Option(0, "--seed", help="Seed of the ROUGE bootstrap (as evaluate's BootstrapAggregator)."),
    ) -> None:
        """Score each session file (one system); print a comparison table on stderr and one JSON object per system."""

        def action() -> None:
            from funnelqa.score import score_files

            score_files(sessions, plots_dir=plots, out=common.out_path(out), seed=seed)

        common.run(action)
