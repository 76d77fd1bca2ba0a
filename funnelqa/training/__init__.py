"""LoRA fine-tuning of the questioner and the user simulator (the paper's reverse process).

``train(TrainConfig(role=..., out=...), "examples.jsonl")`` reads corrupt's examples of that role,
renders them with funnelqa.render, and writes a peft adapter plus run_card.json to ``out``.
Importing this package is cheap; torch is imported when ``train`` runs.
"""

from funnelqa.training.config import ROLES, TrainConfig
from funnelqa.training.loop import RUN_CARD, StepReport, Trainer, read_run_card, train

__all__ = ["ROLES", "RUN_CARD", "StepReport", "TrainConfig", "Trainer", "read_run_card", "train"]
