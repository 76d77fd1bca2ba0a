"""``funnelqa train-questioner`` and ``funnelqa train-simulator``: LoRA fine-tuning (the reverse process).

Their options are TrainConfig's fields, each described once in funnelqa.training.config.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import MISSING, fields
from types import UnionType
from typing import Annotated, Any, get_args, get_type_hints

import typer

from funnelqa.commands.common import INPUT, run
from funnelqa.training import TrainConfig, train
from funnelqa.training.config import Option, flag, option_of


def _metavar(annotation: Any, description: Option) -> str | None:
    """The type column of --help for a bounded option, as typer writes it: '<int range> [x>=1]'.

    typer is told the bounds only as this text, so that TrainConfig is the one place that checks
    them (as UsageError: one line and exit code 2 on the command line, an exception in the library).
    """
    bounds = description.bounds()
    if bounds is None:
        return None
    if isinstance(annotation, UnionType):  # int | None
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    return f"<{annotation.__name__} range> [{bounds}]"


def _parameters(role: str) -> list[inspect.Parameter]:
    """The command's parameters: the examples argument, then one option per TrainConfig field ``role`` is offered."""
    types = get_type_hints(TrainConfig)
    parameters = [inspect.Parameter("examples", inspect.Parameter.KEYWORD_ONLY, default=INPUT, annotation=str)]
    for config_field in fields(TrainConfig):
        description = option_of(config_field)
        if description is None or role not in description.roles:
            continue
        names = [flag(config_field.name), *([description.short] if description.short else [])]
        info = typer.Option(*names, help=description.help, metavar=_metavar(types[config_field.name], description))
        default = inspect.Parameter.empty if config_field.default is MISSING else config_field.default
        parameters.append(inspect.Parameter(
            config_field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
            annotation=Annotated[types[config_field.name], info],
        ))
    return parameters


def _with_config_options(role: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Declare the options TrainConfig offers ``role`` as a command's parameters; its ``**options`` receive them.

    typer reads a command's parameters from its signature, and ``__signature__`` (PEP 362) is how a
    function states a signature other than the one its ``def`` line spells out.
    """
    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        command.__signature__ = inspect.Signature(_parameters(role))
        return command

    return decorate


def _train(role: str, examples: str, options: dict[str, Any]) -> None:
    def action() -> None:
        card = train(TrainConfig(role=role, **options), examples)
        if card is not None:  # only the main process of a multi-process run reports
            print(json.dumps(card, ensure_ascii=False), flush=True)

    run(action)


def register(app: typer.Typer) -> None:
    """Add ``train-questioner`` and ``train-simulator`` to ``app``, their options made from
    TrainConfig's fields; each prints the run card as one JSON line on stdout."""
    @app.command("train-questioner")
    @_with_config_options("questioner")
    def train_questioner(examples: str, **options: Any) -> None:
        """Fine-tune the questioner (Eq. 7-8): from what is known so far, ask the next funnel question.

        Reads the `questioner` lines of `funnelqa corrupt` output; other roles are ignored.
        Writes a peft LoRA adapter plus run_card.json to --out and prints the run card as one JSON line.
        """
        _train("questioner", examples, options)

    @app.command("train-simulator")
    @_with_config_options("simulator")
    def train_simulator(examples: str, **options: Any) -> None:
        """Fine-tune the user simulator (Eq. 10): from a profile and a question, answer and name the revealed tags.

        Reads the `simulator` lines of `funnelqa corrupt` output (negatives included); other roles are ignored.
        Writes a peft LoRA adapter plus run_card.json to --out and prints the run card as one JSON line.
        """
        _train("simulator", examples, options)
