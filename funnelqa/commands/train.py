"""``funnelqa train-questioner`` and ``funnelqa train-simulator``: LoRA fine-tuning (the reverse process)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import typer

from funnelqa.commands.common import INPUT, run

PROFILE_FORM = typer.Option(
    "qa", "--profile-form",
    help="How the questioner sees what it learnt so far: 'qa' (questions with answers) or 'answers' "
    "(revealed profile tags only). Recorded in the run card; `simulate` reads it from there.",
)


def _train(role: str, examples: str, out: Path, profile_form: Optional[str], options: dict) -> None:
    from funnelqa.training import TrainConfig, train

    def action() -> None:
        config = TrainConfig(role=role, out=out, profile_form=profile_form, **options)
        card = train(config, examples)
        if card is not None:  # only the main process of a multi-process run reports
            print(json.dumps(card, ensure_ascii=False), flush=True)

    run(action)


def register(app: typer.Typer) -> None:
    def shared_options(
        examples: str = INPUT,
        out: Path = typer.Option(..., "--out", "-o", help="Directory for the adapter, run_card.json and checkpoints."),
        base: str = typer.Option("local", "--base", help="Base model: local[:smollm2-135m|gemma3-270m] or hf:PATH[+ADAPTER] (an adapter is trained further)."),
        lora_r: int = typer.Option(16, "--lora-r", min=1, help="LoRA rank."),
        lora_alpha: float = typer.Option(32.0, "--lora-alpha", min=0.0, help="LoRA alpha (scale = alpha / r)."),
        lora_dropout: float = typer.Option(0.05, "--lora-dropout", min=0.0, max=0.99, help="Dropout on the LoRA input."),
        target_modules: str = typer.Option("all-linear", "--target-modules", help="'all-linear' or comma-separated module names (e.g. q_proj,v_proj)."),
        lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak learning rate (the paper uses 1e-3)."),
        schedule: str = typer.Option("cosine", "--schedule", help="Learning-rate decay after warmup: cosine, linear or constant."),
        warmup_ratio: float = typer.Option(0.05, "--warmup-ratio", min=0.0, max=1.0, help="Fraction of the steps spent warming up linearly."),
        weight_decay: float = typer.Option(0.0, "--weight-decay", min=0.0, help="AdamW weight decay."),
        max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", min=0.0, help="Clip gradients to this norm (0: no clipping)."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per micro-batch on each process."),
        grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step (effective batch = batch-size x grad-accum x processes)."),
        epochs: int = typer.Option(3, "--epochs", min=1, help="Passes over the training examples (ignored when --max-steps is given)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps (overrides --epochs)."),
        max_length: int = typer.Option(1024, "--max-length", min=8, help="Longest example in tokens; longer prompts lose their start, targets are never cut."),
        eval_fraction: float = typer.Option(0.1, "--eval-fraction", min=0.0, max=0.9, help="Share of users held out for the eval loss (split by user id)."),
        eval_every: int = typer.Option(0, "--eval-every", min=0, help="Also compute the eval loss every N steps (0: only before and after training)."),
        save_every: int = typer.Option(100, "--save-every", min=0, help="Checkpoint every N steps for --resume (0: never)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out (same data and options)."),
        seed: int = typer.Option(0, "--seed", help="Seed for the split, the data order, LoRA init and dropout."),
        precision: str = typer.Option("auto", "--precision", help="auto (bf16 on a GPU that supports it, else fp32), fp32 or bf16."),
        gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in the backward pass: much less memory, about a third more compute."),
        layout: str = typer.Option("auto", "--layout", help="conversation: one chat sequence per user, loss on every assistant turn; steps: one sequence per example; auto: conversation except for --profile-form answers."),
    ) -> dict:
        return dict(
            examples=examples, out=out, base=base, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=target_modules, lr=lr, schedule=schedule, warmup_ratio=warmup_ratio,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, batch_size=batch_size, grad_accum=grad_accum,
            epochs=epochs, max_steps=max_steps, max_length=max_length, eval_fraction=eval_fraction,
            eval_every=eval_every, save_every=save_every, resume=resume, seed=seed, precision=precision,
            gradient_checkpointing=gradient_checkpointing, layout=layout,
        )

    # typer reads options from a function's signature; both commands share one list of them.
    shared_signature = inspect.signature(shared_options, eval_str=True)

    def with_shared_options(command):
        extra = [
            p for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in shared_signature.parameters
        ]
        command.__signature__ = shared_signature.replace(parameters=[*shared_signature.parameters.values(), *extra])
        return command

    @app.command("train-questioner")
    @with_shared_options
    def train_questioner(profile_form: str = PROFILE_FORM, **kwargs) -> None:
        """Fine-tune the questioner (Eq. 7-8): from what is known so far, ask the next funnel question.

        Reads the `questioner` lines of `funnelqa corrupt` output; other roles are ignored.
        Writes a peft LoRA adapter plus run_card.json to --out and prints the run card as one JSON line.
        """
        options = shared_options(**kwargs)
        _train("questioner", options.pop("examples"), options.pop("out"), profile_form, options)

    @app.command("train-simulator")
    @with_shared_options
    def train_simulator(**kwargs) -> None:
        """Fine-tune the user simulator (Eq. 10): from a profile and a question, answer and name the revealed tags.

        Reads the `simulator` lines of `funnelqa corrupt` output (negatives included); other roles are ignored.
        Writes a peft LoRA adapter plus run_card.json to --out and prints the run card as one JSON line.
        """
        options = shared_options(**kwargs)
        _train("simulator", options.pop("examples"), options.pop("out"), None, options)
