"""What a training run is asked to do, checked once before any model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from funnelqa.errors import UsageError
from funnelqa.models import parse_model_spec
from funnelqa.render import PROFILE_FORMS

ROLES = ("questioner", "simulator")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
LAYOUTS = ("auto", "conversation", "steps")

# Options that change the result of every step; a resumed run must keep them, or its
# checkpoint would continue a different run. The rest (how often to save or evaluate) may change.
RESUME_MUST_MATCH = (
    "role", "base", "profile_form", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "schedule",
    "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size", "grad_accum", "epochs", "max_steps",
    "max_length", "eval_fraction", "seed", "precision", "layout",
)


@dataclass
class TrainConfig:
    role: str
    out: Path
    base: str = "local"
    # Questioner only: which render form the prompts use (simulate must use the same one).
    profile_form: str | None = "qa"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 3
    max_steps: int | None = None
    max_length: int = 1024
    eval_fraction: float = 0.1
    eval_every: int = 0
    save_every: int = 100
    resume: bool = False
    seed: int = 0
    precision: str = "auto"
    # Recompute activations in the backward pass: far less memory for about a third more compute.
    gradient_checkpointing: bool = False
    # How examples become sequences: one chat per user (conversation) or one per step (steps);
    # auto: conversation, except the questioner's 'answers' form (training.examples).
    layout: str = "auto"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.role not in ROLES:
            raise UsageError(f"unknown role {self.role!r}; use one of {', '.join(ROLES)}")
        if self.role == "questioner":
            if self.profile_form not in PROFILE_FORMS:
                raise UsageError(f"--profile-form must be one of {', '.join(PROFILE_FORMS)}, not {self.profile_form!r}")
        else:
            self.profile_form = None
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.layout not in LAYOUTS:
            raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        if self.layout == "conversation" and self.profile_form == "answers":
            raise UsageError("--layout conversation needs --profile-form qa: the 'answers' prompts are not one conversation")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        positive = {"lora_r": self.lora_r, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "epochs": self.epochs, "max_length": self.max_length}
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {self.max_steps}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UsageError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UsageError(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
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

    def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
        return [
            f"{key}: checkpoint has {saved.get(key)!r}, now {getattr(self, key)!r}"
            for key in RESUME_MUST_MATCH
            if saved.get(key) != getattr(self, key)
        ]
