"""corrupt: turn forward records into questioner and simulator training examples (Eq. 7, 8, 10)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from funnelqa.commands import common


def register(app: typer.Typer) -> None:
    """Add ``corrupt`` to ``app``: ``corrupt.corrupt_file``, its summary printed on stderr."""
    @app.command("corrupt")
    def corrupt_command(
        source: str = common.INPUT,
        out: Optional[Path] = common.OUT,
        seed: int = typer.Option(0, "--seed", help="Seed for drawing the unanswerable questions."),
        negatives: int = typer.Option(2, "--negatives", min=0, help="Unanswerable simulator examples per user."),
        role: str = typer.Option("both", "--role", help="questioner, simulator or both."),
        skip_invalid: bool = common.SKIP_INVALID,
    ) -> None:
        """Build training pairs by removing answered information step by step (paper Eq. 7, 8, 10).

        For a user with n questions: n questioner examples (partial profile JP_t -> Q_t, t = n-1..0) and
        n simulator examples (profile + Q_i -> A_i and revealed tags), plus unanswerable ones.
        Both profile forms are kept: 'known' (answers only) and 'history' (questions with answers).
        """
        if role not in ("questioner", "simulator", "both"):
            raise typer.BadParameter("use questioner, simulator or both", param_hint="--role")

        def action() -> None:
            from funnelqa.console import stderr
            from funnelqa.corrupt import ROLES, corrupt_file

            roles = ROLES if role == "both" else (role,)
            summary = corrupt_file(source, common.out_path(out), seed=seed, negatives=negatives, roles=roles,
                                   skip_invalid=skip_invalid)
            stderr.print(summary.describe())

        common.run(action)
