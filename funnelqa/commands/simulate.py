"""`funnelqa simulate`: simulated interviews between a questioner and a user simulator (Algorithm 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from funnelqa.commands import common


def register(app: typer.Typer) -> None:
    """Add ``simulate`` to ``app``: ``simulate.simulate_file``."""
    @app.command("simulate")
    def simulate(
        forward: str = typer.Argument(..., help="Forward records (JSONL with tags and funnel questions), or '-'."),
        questioner: str = typer.Option(
            ..., "--questioner", "-q", help="Who asks: 'oracle', 'oracle-shuffled', or a model spec. " + common.MODEL_HELP
        ),
        simulator: str = typer.Option(..., "--simulator", "-s", help="Who answers (the simulated user): a model spec."),
        max_questions: int = typer.Option(10, "--max-questions", "-T", min=1, help="Questions per user at most (T)."),
        profile_form: Optional[str] = typer.Option(
            None,
            "--profile-form",
            help="What the questioner sees: 'answers' (revealed tags) or 'qa' (question/answer history). "
            "Default: the form in the adapter's run_card.json, else 'qa'.",
        ),
        seed: int = typer.Option(0, "--seed", help="Order of the questions for 'oracle-shuffled'."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Interview only the first N users."),
        no_repeat: bool = typer.Option(
            False, "--no-repeat",
            help="Guard a model questioner against repeating itself: a question that near-duplicates an earlier one "
            "of the interview is replaced by the first of 4 seeded samples that does not. Recorded per turn ('guard').",
        ),
        out: Optional[Path] = common.OUT,
        skip_invalid: bool = common.SKIP_INVALID,
        no_cache: bool = common.NO_CACHE,
        batch_size: int = common.BATCH_SIZE,
        dtype: str = common.DTYPE,
        concurrency: int = common.CONCURRENCY,
        timeout: float = common.TIMEOUT,
    ) -> None:
        """Interview every user from an empty profile; one session per user (JSONL).

        Each turn, all live interviews are asked in one batched call and answered in another.
        With --out, a re-run resumes where an interrupted one stopped.
        """

        def action() -> None:
            from funnelqa.simulate import simulate_file

            simulate_file(
                forward,
                questioner=questioner,
                simulator=simulator,
                max_questions=max_questions,
                profile_form=profile_form,
                out=common.out_path(out),
                options=common.backend_options(concurrency, timeout, batch_size, dtype),
                use_cache=not no_cache,
                seed=seed,
                limit=limit,
                skip_invalid=skip_invalid,
                no_repeat=no_repeat,
            )

        common.run(action)
