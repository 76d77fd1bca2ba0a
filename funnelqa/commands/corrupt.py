"""corrupt: turn forward records into questioner and simulator training examples (Eq. 7, 8, 10)."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer

from funnelqa.commands import common


@contextlib.contextmanager
def _rereadable(source: str) -> Iterator[str]:
    """A path that can be read twice: the file itself, or stdin spooled to a temporary file."""
    if source != "-":
        yield source
        return
    with tempfile.NamedTemporaryFile(prefix="funnelqa-corrupt-", suffix=".jsonl") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        yield spool.name


def _named(error, source: str):
    # Lines of spooled stdin are reported as stdin's, not the temporary file's.
    from funnelqa.errors import InputError
    from funnelqa.records import source_name

    return InputError(source_name(source), error.line, error.message) if source == "-" else error


def run_corrupt(source: str, out: Optional[Path], *, seed: int, negatives: int, role: str, skip_invalid: bool) -> None:
    from funnelqa import records
    from funnelqa.console import stderr
    from funnelqa.corrupt import ROLES, NegativePool, check_corruptible, corrupt
    from funnelqa.errors import InputError

    def validate(record):
        records.check_questions(record)
        check_corruptible(record)

    skipped: list[str] = []

    def report(error) -> None:
        error = _named(error, source)
        skipped.append(str(error))
        stderr.print(f"[yellow]skipped[/] {error}")

    roles = ROLES if role == "both" else (role,)
    counts = {"questioner": 0, "simulator": 0, "negative": 0, "errors": 0}
    try:
        with _rereadable(source) as path:
            pool = None
            if negatives > 0 and "simulator" in roles:
                # First pass: the questions alone, for the negatives; the second streams the records.
                usable = (r for r in records.read_records(path, validate, on_invalid=report if skip_invalid else None)
                          if "error" not in r)
                pool = NegativePool.from_records(usable)
            # Bad lines were reported by the first pass (when there was one): the second only skips them.
            quiet = (lambda error: None) if pool is not None else report
            loaded = records.read_records(path, validate, on_invalid=quiet if skip_invalid else None)

            def usable_records():
                nonlocal users
                for record in loaded:
                    if "error" in record:
                        counts["errors"] += 1
                    else:
                        users += 1
                        yield record

            users = 0
            # Corruption takes seconds: a re-run starts over rather than resuming.
            with records.RecordWriter(common.out_path(out), resume=False) as writer:
                for example in corrupt(usable_records(), seed=seed, negatives=negatives, roles=roles, pool=pool):
                    writer.write(example)
                    counts["negative" if example.get("negative") else example["role"]] += 1
    except InputError as exc:
        raise _named(exc, source) from None
    stderr.print(
        f"corrupt: {users} users -> {counts['questioner']} questioner, {counts['simulator']} simulator "
        f"and {counts['negative']} unanswerable examples; {counts['errors']} records with upstream "
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
