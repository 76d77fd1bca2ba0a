"""What a training run is asked to do, checked once before any model is loaded.

Every option of ``train-questioner`` and ``train-simulator`` is a field of TrainConfig, described
once beside its default by an Option: its help text, the values it accepts, and whether a resumed
run may change it. The commands build their options from these fields (funnelqa.commands.train),
so the command line, the checks and the resume rule cannot drift apart.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from funnelqa.corrupt import ROLES
from funnelqa.errors import UsageError
from funnelqa.models import parse_model_spec
from funnelqa.render import PROFILE_FORMS

# The key of a field's Option in its dataclasses metadata.
OPTION = "option"


@dataclass(frozen=True)
class Option:
    """How one TrainConfig field is offered on the command line and what values it accepts.

    ``min`` and ``max`` are inclusive bounds (``min_exclusive``: the value must exceed ``min``);
    a None bound, or a None value, is not checked. ``choices``: the accepted strings, if limited.
    ``short``: an extra one-letter flag. ``roles``: the commands that offer the option.
    ``resumable``: a resumed run may change it, because it changes no step's result; every other
    field must equal the checkpoint's. ``per_process``: what must equal the checkpoint's is the
    value times the number of processes (``--grad-accum``: the step's micro-batches are the same
    whichever processes run them).
    """

    help: str
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    choices: tuple[str, ...] = ()
    short: str | None = None
    roles: tuple[str, ...] = ROLES
    resumable: bool = False
    per_process: bool = False

    def bounds(self) -> str | None:
        """The bounds as typer's --help writes them ('x>=1', 'x>0.0', '0.0<=x<=0.9'); None if unbounded."""
        if self.min is None:
            return None if self.max is None else f"x<={self.max}"
        if self.max is None:
            return f"x{'>' if self.min_exclusive else '>='}{self.min}"
        return f"{self.min}{'<' if self.min_exclusive else '<='}x<={self.max}"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not accepted, as the end of a sentence; None when it is."""
        if value is None:
            return None
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, not {value!r}"
        too_low = self.min is not None and (value <= self.min if self.min_exclusive else value < self.min)
        if too_low or (self.max is not None and value > self.max):
            return f"must be in the range {self.bounds()}, got {value}"
        return None


def option(default: Any = MISSING, **description: Any) -> Any:
    """A TrainConfig field offered as a command-line option; ``description`` holds Option's fields."""
    return field(default=default, metadata={OPTION: Option(**description)})


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: ``lora_r`` -> ``--lora-r``."""
    return "--" + name.replace("_", "-")


def option_of(config_field: Field) -> Option | None:
    """The field's Option; None for a field that is not a command-line option (``role``)."""
    return config_field.metadata.get(OPTION)


@dataclass
class TrainConfig:
    """The options of one training run. Raises UsageError, naming the flag, for a value it cannot train with."""

    # Not an option: each command trains one role.
    role: str
    out: Path = option(help="Directory for the adapter, run_card.json and checkpoints.", short="-o", resumable=True)
    base: str = option(
        "local",
        help="Base model: local[:smollm2-135m|gemma3-270m] or hf:PATH[+ADAPTER] (an adapter is trained further).",
    )
    lora_r: int = option(16, help="LoRA rank.", min=1)
    lora_alpha: float = option(32.0, help="LoRA alpha (scale = alpha / r).", min=0.0)
    lora_dropout: float = option(0.05, help="Dropout on the LoRA input.", min=0.0, max=0.99)
    target_modules: str = option(
        "all-linear", help="'all-linear' or comma-separated module names (e.g. q_proj,v_proj).",
    )
    lr: float = option(1e-3, help="Peak learning rate (the paper uses 1e-3).", min=0.0, min_exclusive=True)
    schedule: str = option(
        "cosine", help="Learning-rate decay after warmup: cosine, linear or constant.",
        choices=("cosine", "linear", "constant"),
    )
    warmup_ratio: float = option(0.05, help="Fraction of the steps spent warming up linearly.", min=0.0, max=1.0)
    weight_decay: float = option(0.0, help="AdamW weight decay.", min=0.0)
    max_grad_norm: float = option(1.0, help="Clip gradients to this norm (0: no clipping).", min=0.0)
    batch_size: int = option(8, help="Examples per micro-batch on each process.", min=1)
    grad_accum: int = option(
        1, help="Micro-batches per optimizer step on each process (effective batch = batch-size x grad-accum x processes).",
        min=1, per_process=True,
    )
    epochs: int = option(3, help="Passes over the training examples (ignored when --max-steps is given).", min=1)
    max_steps: int | None = option(None, help="Stop after this many optimizer steps (overrides --epochs).", min=1)
    max_length: int = option(
        1024, help="Longest example in tokens; longer prompts lose their start, targets are never cut.", min=8,
    )
    eval_fraction: float = option(
        0.1, help="Share of users held out for the eval loss (split by user id).", min=0.0, max=0.9,
    )
    eval_every: int = option(
        0, help="Also compute the eval loss every N steps (0: only before and after training).", min=0, resumable=True,
    )
    save_every: int = option(100, help="Checkpoint every N steps for --resume (0: never).", min=0, resumable=True)
    resume: bool = option(
        False, help="Continue from the last checkpoint in --out (same data and options).", resumable=True,
    )
    seed: int = option(0, help="Seed for the split, the data order, LoRA init and dropout.")
    precision: str = option(
        "auto", help="auto (bf16 on a GPU that supports it, else fp32), fp32 or bf16.", choices=("auto", "fp32", "bf16"),
    )
    gradient_checkpointing: bool = option(
        False, help="Recompute activations in the backward pass: much less memory, about a third more compute.",
        resumable=True,
    )
    layout: str = option(
        "auto",
        help="conversation: one chat sequence per user, loss on every assistant turn; steps: one sequence per example; "
        "auto: conversation except for --profile-form answers.",
        choices=("auto", "conversation", "steps"),
    )
    # Last, so that --help lists it after the options both commands share. None for the simulator.
    profile_form: str | None = option(
        "qa",
        help="How the questioner sees what it learnt so far: 'qa' (questions with answers) or 'answers' "
        "(revealed profile tags only). Recorded in the run card; `simulate` reads it from there.",
        choices=PROFILE_FORMS, roles=("questioner",),
    )

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.role not in ROLES:
            raise UsageError(f"unknown role {self.role!r}; use one of {', '.join(ROLES)}")
        for config_field in fields(self):
            description = option_of(config_field)
            if description is None:
                continue
            if self.role not in description.roles:
                # The other command's option: this run has none, and its run card says so.
                setattr(self, config_field.name, None)
                continue
            problem = description.problem(getattr(self, config_field.name))
            if problem is not None:
                raise UsageError(f"{flag(config_field.name)} {problem}")
        # Imported here: this module builds the CLI's options, and --help must stay light.
        from funnelqa.training.examples import resolve_layout

        resolve_layout(self.role, self.profile_form, self.layout)
        parse_model_spec(self.base)
        if not self.target_module_list():
            raise UsageError("--target-modules names no module; use 'all-linear' or e.g. q_proj,v_proj")

    def target_module_list(self) -> str | list[str]:
        """peft's spelling: the string 'all-linear', or a list of module names."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]

    def options(self) -> dict[str, Any]:
        """The options as the run card records them."""
        data = asdict(self)
        data["out"] = str(self.out)
        return data

    def resume_mismatches(self, saved: dict[str, Any], saved_processes: int = 1, processes: int = 1) -> list[str]:
        """Each option a resumed run may not change that differs from ``saved`` (the options of a
        checkpoint written by ``saved_processes`` processes, resumed on ``processes``), as
        'name: checkpoint has X, now Y'; empty when the run can resume."""
        mismatches = []
        for config_field in fields(self):
            description = option_of(config_field)
            if description is not None and description.resumable:
                continue
            name, now = config_field.name, getattr(self, config_field.name)
            if description is not None and description.per_process:
                before = saved.get(name)
                if before * saved_processes != now * processes:
                    mismatches.append(
                        f"{name} x processes: checkpoint has {before} x {saved_processes} = {before * saved_processes}, "
                        f"now {now} x {processes} = {now * processes}"
                    )
            elif saved.get(name) != now:
                mismatches.append(f"{name}: checkpoint has {saved.get(name)!r}, now {now!r}")
        return mismatches
