"""experiment: the paper's Sec. 4.2 end to end from one config file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from funnelqa.commands import common


def register(app: typer.Typer) -> None:
    """Add ``experiment`` to ``app``: ``experiment.run_experiment`` on one TOML config."""
    @app.command("experiment")
    def experiment_command(
        config: Path = typer.Argument(..., help="Experiment config (TOML), e.g. experiments/paper-cpu.toml."),
        root: Optional[Path] = typer.Option(None, "--root", help="Run folder (default: runs/<name>)."),
        jobs: Optional[int] = typer.Option(None, "--jobs", min=1,
                                           help="Stages run at once, each on its own share of the CPU cores "
                                                "(default: the config's `jobs`, else 1)."),
        forms: Optional[str] = typer.Option(None, "--forms",
                                            help="Profile forms of the questioner, comma-separated, e.g. qa,answers "
                                                 "(default: the config's `forms`). Finished stages are reused, so "
                                                 "adding a form to a finished run trains and interviews only it."),
    ) -> None:
        """Split users, corrupt, train both models, simulate the 2x2 plus oracles, score and plot.

        Stages are cached: a re-run after a crash redoes nothing finished. Writes report.md,
        scores.jsonl, sessions and plots into the run folder.
        """
        from funnelqa.experiment import run_experiment

        chosen = [form.strip() for form in forms.split(",") if form.strip()] if forms else None
        common.run(lambda: run_experiment(config, root, jobs, chosen))
