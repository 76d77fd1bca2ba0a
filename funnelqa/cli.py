"""The ``funnelqa`` command: a thin layer of subcommands over the library.

Each subcommand lives in ``funnelqa/commands/``, parses its options, and calls one library
function. Heavy imports (torch, transformers, google-genai) happen inside those functions, so
``funnelqa --help`` stays fast.
"""

from __future__ import annotations

import typer

from funnelqa import __version__
from funnelqa.commands import chat, corrupt, experiment, export, forward, score, simulate, train

app = typer.Typer(
    name="funnelqa",
    help=(
        "Teach language models to ask good clarifying questions.\n\n"
        "Pipeline: structure | rank | generate-questions > forward.jsonl; corrupt; "
        "train-questioner / train-simulator (or export for another trainer); simulate; score; or all of it with experiment; "
        "chat puts a person in an "
        "interview. Every stage reads JSONL from a "
        "path or '-' and writes JSONL to stdout (or --out)."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

for module in (forward, corrupt, train, export, simulate, chat, score, experiment):
    module.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"funnelqa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    pass


def main() -> None:
    """The ``funnelqa`` console script and ``python -m funnelqa``: runs the subcommand named in
    sys.argv and exits with its code: 0, or a FunnelQAError's ``exit_code`` (1 in general, 2 bad
    input or usage, 3 backend unavailable, 4 backend error, 5 output in use), 130 on Ctrl-C,
    141 when the reader of stdout went away."""
    app()
