"""`funnelqa chat`: an interview with a person in it, answering a questioner or asking a user simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from funnelqa.commands import common


def register(app: typer.Typer) -> None:
    """Add ``chat`` to ``app``: ``chat.chat`` with a person as the user (or as the questioner)."""
    @app.command("chat")
    def chat(
        questioner: Optional[str] = typer.Option(
            None, "--questioner", "-q",
            help="The model asks and you answer: a model spec, or 'oracle' / 'oracle-shuffled' (with --target). "
            + common.MODEL_HELP,
        ),
        simulator: Optional[str] = typer.Option(
            None, "--simulator", "-s",
            help="You ask and this user simulator answers as the --target user, naming the tags it reveals.",
        ),
        target: Optional[str] = typer.Option(
            None, "--target", help="Forward records (JSONL): the known user you play (--questioner) or the simulator plays.",
        ),
        user_id: Optional[str] = typer.Option(
            None, "--id", help="The user in --target (not needed when it holds one). Without --target: the session's id.",
        ),
        tagger: Optional[str] = typer.Option(
            None, "--tagger",
            help="Maps your answers onto the known user's tags: a user simulator model spec, e.g. the trained "
            "simulator local+runs/s, or 'words' (no model: the tags whose words the answer repeats). Default: local.",
        ),
        max_questions: int = typer.Option(10, "--max-questions", "-T", min=1, help="Questions at most (T)."),
        profile_form: Optional[str] = typer.Option(
            None, "--profile-form",
            help="What the questioner sees: 'answers' (revealed tags; needs --target) or 'qa' (question/answer "
            "history). Default: the form in the adapter's run_card.json, else 'qa'.",
        ),
        no_repeat: bool = typer.Option(
            False, "--no-repeat",
            help="Guard a model questioner against repeating itself, as in simulate. Recorded per turn ('guard').",
        ),
        seed: int = typer.Option(0, "--seed", help="Order of the questions for 'oracle-shuffled'."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the session here (atomically) instead of stdout."),
        no_cache: bool = common.NO_CACHE,
        dtype: str = common.DTYPE,
        concurrency: int = common.CONCURRENCY,
        timeout: float = common.TIMEOUT,
    ) -> None:
        """Interview with a person in it: one session (JSONL) on stdout or --out.

        Your lines come from the terminal or a pipe (one per line). An empty line or 'skip' answers
        'No preference'; /profile shows the known user; /done ends; Ctrl-C or end of input end too,
        keeping every turn. With --target and --id the session scores with `funnelqa score`
        beside simulated ones; without, its 'profile' (the questions with your answers) pipes into
        `funnelqa structure`.
        """

        def action() -> None:
            from funnelqa.chat import chat as run_chat

            run_chat(
                questioner=questioner,
                simulator=simulator,
                target=target,
                user_id=user_id,
                tagger=tagger,
                max_questions=max_questions,
                profile_form=profile_form,
                no_repeat=no_repeat,
                seed=seed,
                out=common.out_path(out),
                options=common.backend_options(concurrency, timeout, dtype=dtype),
                use_cache=not no_cache,
            )

        common.run(action)
