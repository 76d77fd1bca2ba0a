"""corrupt: turn forward records into questioner and simulator training examples (Eq. 7, 8, 10)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from funnelqa.commands import common


def run_corrupt(source: str, out: Optional[Path], *, seed: int, negatives: int, role: str, skip_invalid: bool) -> None:
    from funnelqa import records
    from funnelqa.console import stderr
    from funnelqa.corrupt import ROLES, check_corruptible, corrupt

    def validate(record):
        records.check_questions(record)
        check_corruptible(record)

    skipped: list[str] = []

    def report(error) -> None:
        skipped.append(str(error))
        stderr.print(f"[yellow]skipped[/] {error}")

    loaded = list(records.read_records(source, validate, on_invalid=report if skip_invalid else None))
    usable = [r for r in loaded if "error" not in r]
    roles = ROLES if role == "both" else (role,)
    counts = {"questioner": 0, "simulator": 0, "negative": 0}
    # Corruption takes seconds: a re-run starts over rather than resuming.
    with records.RecordWriter(common.out_path(out), resume=False) as writer:
        for example in corrupt(usable, seed=seed, negatives=negatives, roles=roles):
            writer.write(example)
            counts["negative" if example.get("negative") else example["role"]] += 1
    stderr.print(
        f"corrupt: {len(usable)} users -> {counts['questioner']} questioner, {counts['simulator']} simulator "
        f"and {counts['negative']} unanswerable examples; {len(loaded) - len(usable)} records with upstream "
        f"errors and {len(skipped)} invalid lines skipped"
    )


def register(app: typer.Typer) -> None:
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
        common.run(lambda: run_corrupt(source, out, seed=seed, negatives=negatives, role=role, skip_invalid=skip_invalid))
