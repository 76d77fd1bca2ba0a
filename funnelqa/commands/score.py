"""`funnelqa score`: BLEU/ROUGE of elicited vs target profiles, curves, funnel rank, plots."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from funnelqa.commands import common


def register(app: typer.Typer) -> None:
    """Add ``score`` to ``app``: ``score.score_files`` over one or more session files."""
    @app.command("score")
    def score(
        sessions: List[str] = typer.Argument(..., help="Session files from `funnelqa simulate`, one per system."),
        plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG plots (paper Figs. 3, 4, 7) into this folder."),
        out: Optional[Path] = common.OUT,
        seed: int = typer.Option(0, "--seed", help="Seed of the ROUGE bootstrap (as evaluate's BootstrapAggregator) and of the bootstrap over users."),
        bootstrap: int = typer.Option(
            1000, "--bootstrap", min=0,
            help="Resamples of users for every metric's 95% interval and the paired differences between files on the same users (0: none).",
        ),
        rouge_tokenizer: str = typer.Option(
            "auto", "--rouge-tokenizer",
            help="default (rouge_score's, as evaluate: keeps a-z and digits only), unicode (letters of every script), "
            "or auto: unicode for the sessions whose text has non-Latin letters. The output names the one used.",
        ),
        pairs: Optional[Path] = typer.Option(
            None, "--pairs", help="Write the paired differences (JSONL, one per pair of files on the same users) here; "
            "default with --out FILE: FILE.pairs.jsonl beside it.",
        ),
    ) -> None:
        """Score each session file (one system); print a comparison table on stderr and one JSON object per system."""

        def action() -> None:
            from funnelqa.score import score_files

            score_files(sessions, plots_dir=plots, out=common.out_path(out), seed=seed, rouge_tokenizer=rouge_tokenizer,
                        resamples=bootstrap, pairs_out=pairs)

        common.run(action)
