"""The training loop: LoRA on a causal LM, loss on target tokens only, accelerate for devices.

One process trains on a CPU or a GPU; ``accelerate launch`` runs several processes, each taking
its share of every step's micro-batches (data parallel). The loss of a step is the mean over all
its target tokens, whatever process or micro-batch they fell into, and each micro-batch draws its
dropout from its own seed, so ``--grad-accum`` and the number of processes change the speed, not
the result (up to float rounding), as long as their product stays the same.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from funnelqa import __version__
from funnelqa.errors import UsageError
from funnelqa.records import write_json_atomic
from funnelqa.serving import serving_card
from funnelqa.training.batching import StepPlan, collate, dropout_seed, length_grouped_batches, target_loss_sum
from funnelqa.training.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from funnelqa.training.config import TrainConfig
from funnelqa.training.examples import Encoded, encode_examples, read_examples, resolve_layout, split_users

RUN_CARD = "run_card.json"
# The final train loss is the token-weighted mean over this many last steps: one step is noisy.
FINAL_LOSS_STEPS = 10


@dataclass(frozen=True)
class StepReport:
    """What the loop tells ``on_step`` after each optimizer step (main process only)."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_second: float
    eval_loss: float | None


def read_run_card(out: Path) -> dict[str, Any] | None:
    """``OUT/run_card.json`` as a dict, or None while the run has not finished (no card yet)."""
    path = Path(out) / RUN_CARD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _check_out_dir(config: TrainConfig, checkpoint: Path | None) -> None:
    if config.resume:
        return
    if (config.out / RUN_CARD).exists():
        raise UsageError(f"{config.out} already holds a finished run; choose another --out")
    if checkpoint is not None:
        raise UsageError(
            f"{config.out} holds a checkpoint of an unfinished run ({checkpoint.name}); "
            "pass --resume to continue it, or choose another --out"
        )


def _precision(config: TrainConfig) -> str:
    import torch

    if config.precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return config.precision


def _wrap_in_lora(model, config: TrainConfig):
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        # The base spec named an adapter: training continues it, with its own rank and targets.
        return model
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_module_list(),
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft still asks transformers a deprecated question; the warning is theirs to fix, not the user's.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as exc:
        raise UsageError(f"cannot apply LoRA with --target-modules {config.target_modules!r}: {exc}") from None


def _enable_checkpointing(model) -> None:
    # Non-reentrant checkpointing needs no gradient on the inputs and replays dropout exactly.
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def evaluate_loss(model, examples: list[Encoded], batch_size: int, pad_id: int, accelerator) -> float | None:
    """Mean target-token loss over ``examples``; each process takes a share, the sums are reduced."""
    import torch

    if not examples:
        return None
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    # The unwrapped model: DDP's forward would sync buffers, and processes may run unequal batch counts.
    inner = accelerator.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for batch_indices in mine:
            batch = collate([examples[i] for i in batch_indices], pad_id).to(accelerator.device)
            totals[0] += target_loss_sum(inner, batch).double()
            totals[1] += batch.target_tokens
    inner.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1])


def train(
    config: TrainConfig,
    source: str | Path,
    *,
    show_progress: bool = True,
) -> dict[str, Any] | None:
    """Fine-tune a LoRA adapter on the ``config.role`` examples in ``source`` (a path or '-').

    Writes the adapter (peft format) and run_card.json into ``config.out`` and returns the run
    card on the main process (None on the others). With ``config.resume`` it continues from the
    last checkpoint in ``config.out``; a finished run is reported again, not retrained.
    """
    if config.resume and (finished := read_run_card(config.out)) is not None:
        from accelerate import PartialState

        return finished if PartialState().is_main_process else None
    return Trainer(config, source).run(show_progress=show_progress)


class Trainer:
    """One training run in two phases, so a caller can look at the model before and after:
    building it reads the examples, loads the model and restores a checkpoint when resuming;
    ``run`` trains, saves the adapter and the run card, and returns the card."""

    def __init__(self, config: TrainConfig, source: str | Path):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, set_seed

        from funnelqa.console import stderr
        from funnelqa.models import load_causal_lm, resolve_base

        self.started = time.perf_counter()
        self.config = config
        checkpoint = latest_checkpoint(config.out)
        _check_out_dir(config, checkpoint)

        self.precision = _precision(config)
        # cpu=True on a machine without CUDA lets several CPU processes (torchrun, or accelerate
        # launch --multi_gpu, as configs/accelerate/cpu-2proc.yaml does) form a gloo group;
        # accelerate otherwise runs each one alone.
        self.accelerator = accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision="bf16" if self.precision == "bf16" else "no"
        )
        self.is_main = accelerator.is_main_process
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
            # Sharded weights would need gathering to evaluate, checkpoint and save; LoRA on the
            # small bases funnelqa trains fits every GPU whole, so data parallel is enough.
            raise UsageError(
                f"accelerate's {accelerator.distributed_type.value} is not supported: the trainer keeps a whole "
                "model on each process; launch data parallel (configs/accelerate/multi-gpu-ddp.yaml)"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != accelerator.num_processes:
            raise UsageError(
                f"launched as {launched} processes but accelerate formed a group of {accelerator.num_processes}; "
                "on CPUs use `accelerate launch --config_file configs/accelerate/cpu-2proc.yaml` (--multi_gpu), "
                "or `torchrun --nproc_per_node N -m funnelqa ...`"
            )
        if accelerator.num_processes > 1 and str(source) == "-":
            raise UsageError("several processes cannot share stdin; give the examples as a file")

        saved: dict[str, Any] = {}
        if checkpoint is not None:
            saved = read_state(checkpoint)
            mismatches = config.resume_mismatches(saved["options"], saved["num_processes"], accelerator.num_processes)
            if mismatches:
                raise UsageError(f"cannot resume {checkpoint}: options differ ({'; '.join(mismatches)})")

        self.data = read_examples(source, config.role)
        if saved and saved["data_sha256"] != self.data.sha256:
            raise UsageError(f"cannot resume {checkpoint}: the examples differ from the ones it was trained on")

        set_seed(config.seed)  # the same LoRA initialisation on every process
        with accelerator.main_process_first():  # the first process converts a GGUF once, the others reuse it
            self.base_path = resolve_base(config.base)
            model, self.tokenizer = load_causal_lm(
                config.base,
                device=str(accelerator.device),
                dtype=torch.bfloat16 if self.precision == "bf16" else torch.float32,
                trainable_adapter=True,
            )
        model = _wrap_in_lora(model, config)
        if config.gradient_checkpointing:
            _enable_checkpointing(model.get_base_model())
        model.train()

        self.train_users, self.eval_users = split_users(self.data.users, config.eval_fraction, config.seed)
        self.layout = resolve_layout(config.role, config.profile_form, config.layout)
        encoded, self.encode_stats = encode_examples(
            self.tokenizer, self.data, config.role, config.profile_form, config.max_length, self.layout, config.seed
        )
        self.train_set = [e for e in encoded if e.user in self.train_users]
        self.eval_set = [e for e in encoded if e.user in self.eval_users]
        if not self.train_set:
            raise UsageError(f"no training example fits --max-length {config.max_length}; raise it")
        if self.is_main and self.encode_stats.incomplete_users:
            users = self.encode_stats.incomplete_users
            stderr.print(
                f"[yellow]{len(users)} user(s) left out: their steps do not chain into one interview "
                f"(missing or inconsistent steps): {', '.join(users[:5])}{' ...' if len(users) > 5 else ''}"
            )
        if self.is_main and self.encode_stats.truncated:
            stderr.print(f"[yellow]{self.encode_stats.truncated} prompt(s) longer than --max-length lost their start")
        if self.is_main and self.encode_stats.dropped_too_long:
            stderr.print(
                f"[yellow]{self.encode_stats.dropped_too_long} example(s) dropped: the target alone exceeds --max-length"
            )

        self.plan = StepPlan(len(self.train_set), config.batch_size, config.grad_accum, accelerator.num_processes)
        self.total_steps = config.max_steps or config.epochs * self.plan.steps_per_epoch
        warmup_steps = math.ceil(config.warmup_ratio * self.total_steps)

        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self._model, self.optimizer = accelerator.prepare(model, optimizer)
        # Not prepared: accelerate would step it once per process; it steps once per optimizer step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, warmup_steps, self.total_steps)
        )

        self.step = 0
        self.history: dict[str, Any] = {
            "step_losses": [], "eval": [], "train_tokens": 0, "train_seconds": 0.0, "wall_seconds": 0.0, "parts": [],
        }
        self.resumed_from: int | None = None
        self._epoch_batches: tuple[int, list[list[int]]] = (-1, [])
        if checkpoint is not None:
            load_checkpoint(accelerator, checkpoint, self._model, self.optimizer, self.scheduler)
            self.step = self.resumed_from = saved["step"]
            # A checkpoint written before runs recorded their parts was written by one part.
            self.history = {"parts": [[0, saved["num_processes"]]], **saved["history"]}
            if self.is_main:
                stderr.print(f"resuming from {checkpoint} (step {self.step} of {self.total_steps})")
        # Each stretch of steps run without a break, and on how many processes: a resumed run may change the count.
        self.history["parts"].append([self.step, accelerator.num_processes])

    @property
    def model(self):
        """The peft model being trained (unwrapped from any data-parallel wrapper)."""
        return self.accelerator.unwrap_model(self._model)

    def evaluate(self) -> float | None:
        """The eval loss now: mean cross-entropy in nats per target token over the held-out users'
        sequences, summed over every process; None when no user was held out."""
        return evaluate_loss(self._model, self.eval_set, self.config.batch_size, self.tokenizer.pad_token_id, self.accelerator)

    def run(self, *, on_step: Callable[[StepReport], None] | None = None, show_progress: bool = True) -> dict[str, Any] | None:
        """Train to ``total_steps``, with the eval loss before, every ``eval_every`` steps and at
        the end, and a checkpoint every ``save_every`` steps; ``on_step`` gets a StepReport after
        each step (main process). Then saves the adapter (peft format, safetensors) and
        run_card.json in ``config.out``, removes the checkpoints and returns the card on the main
        process, None on the others. Collective: every process must call it."""
        config, history = self.config, self.history
        if not history["eval"]:
            history["eval"].append([0, self.evaluate()])
        progress = _Progress(self.total_steps, self.step, enabled=self.is_main and show_progress)
        with progress:
            progress.show_eval(history["eval"][-1][1])
            while self.step < self.total_steps:
                loss = self._train_step()
                eval_loss = None
                if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total_steps:
                    eval_loss = self.evaluate()
                    history["eval"].append([self.step, eval_loss])
                if config.save_every and self.step % config.save_every == 0 and self.step < self.total_steps:
                    save_checkpoint(
                        self.accelerator, config.out, self.step, self._model, self.optimizer, self.scheduler, self._state()
                    )
                report = StepReport(
                    step=self.step,
                    total_steps=self.total_steps,
                    loss=loss,
                    lr=self.scheduler.get_last_lr()[0],
                    tokens_per_second=history["train_tokens"] / max(history["train_seconds"], 1e-9),
                    eval_loss=eval_loss,
                )
                progress.update(report)
                if self.is_main and on_step is not None:
                    on_step(report)
            if history["eval"][-1][0] != self.step:
                history["eval"].append([self.step, self.evaluate()])
                progress.show_eval(history["eval"][-1][1])

        card = None
        if self.is_main:
            model = self.model
            model.peft_config["default"].base_model_name_or_path = str(self.base_path)
            model.save_pretrained(config.out, safe_serialization=True)
            card = self._card()
            write_json_atomic(config.out / RUN_CARD, card)
            _remove_checkpoints(config.out)
        self.accelerator.wait_for_everyone()
        return card

    def _train_step(self) -> float:
        """One optimizer step over this process's share of the step's micro-batches; returns the mean target loss."""
        import torch

        accelerator, plan = self.accelerator, self.plan
        epoch, step_in_epoch = divmod(self.step, plan.steps_per_epoch)
        if self._epoch_batches[0] != epoch:
            lengths = [len(e) for e in self.train_set]
            self._epoch_batches = (epoch, length_grouped_batches(lengths, self.config.batch_size, self.config.seed, epoch))
        batches = self._epoch_batches[1]
        pad_id = self.tokenizer.pad_token_id
        micro = [
            (place, collate([self.train_set[i] for i in indices], pad_id))
            for place, indices in plan.step_batches(batches, step_in_epoch, accelerator.process_index)
        ]
        tick = time.perf_counter()
        counts = torch.tensor(
            [sum(b.target_tokens for _, b in micro), sum(b.tokens for _, b in micro)],
            dtype=torch.float64, device=accelerator.device,
        )
        target_tokens, tokens = (float(x) for x in accelerator.reduce(counts, reduction="sum"))
        loss_total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for i, (place, batch) in enumerate(micro):
            batch = batch.to(accelerator.device)
            torch.manual_seed(dropout_seed(self.config.seed, self.step, place))
            syncing = i == len(micro) - 1  # gradients are exchanged once per step, after the last micro-batch
            with nullcontext() if syncing else accelerator.no_sync(self._model):
                loss_sum = target_loss_sum(self._model, batch)
                # DDP averages gradients over processes; scaling by their number makes the step's
                # gradient that of the mean over every target token of the step.
                accelerator.backward(loss_sum * (accelerator.num_processes / target_tokens))
            loss_total += loss_sum.detach().double()
        if self.config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = float(accelerator.reduce(loss_total, reduction="sum"))
        self.step += 1
        self.history["step_losses"].append([loss_total, target_tokens])
        self.history["train_tokens"] += int(tokens)
        self.history["train_seconds"] += time.perf_counter() - tick
        return loss_total / target_tokens

    def _wall_seconds(self) -> float:
        return self.history["wall_seconds"] + (time.perf_counter() - self.started)

    def _state(self) -> dict[str, Any]:
        return {
            "options": self.config.options(),
            "num_processes": self.accelerator.num_processes,
            "data_sha256": self.data.sha256,
            "history": {**self.history, "wall_seconds": self._wall_seconds()},
        }

    def _card(self) -> dict[str, Any]:
        config, history, stats = self.config, self.history, self.encode_stats
        losses = history["step_losses"]
        tail = losses[-FINAL_LOSS_STEPS:]
        seconds = history["train_seconds"]
        return {
            "role": config.role,
            "adapter": str(config.out),
            "base": config.base,
            "base_path": str(self.base_path),
            "profile_form": config.profile_form,
            "serving": serving_card(config.out, config.role),
            "data": {"source": self.data.source, "sha256": self.data.sha256},
            "layout": self.layout,
            "examples": {
                "train": len(self.train_set),
                "eval": len(self.eval_set),
                "train_users": len(self.train_users),
                "eval_users": len(self.eval_users),
                "truncated": stats.truncated,
                "dropped_too_long": stats.dropped_too_long,
                "conversations": stats.conversations if self.layout == "conversation" else None,
                "windows_split": stats.windows_split if self.layout == "conversation" else None,
                "incomplete_users": stats.incomplete_users,
                "unanswerable_turns": stats.unanswerable_turns if config.role == "questioner" else None,
                "target_tokens": sum(e.target_length for e in self.train_set),
                "tokens_per_epoch": sum(len(e) for e in self.train_set),
                "negatives": sum(1 for r in self.data.examples if r.get("negative")) if config.role == "simulator" else None,
                "other_roles": dict(self.data.other_roles),
            },
            "options": config.options(),
            "steps": self.step,
            "epochs": round(self.step / self.plan.steps_per_epoch, 3),
            "effective_batch_size": config.batch_size * config.grad_accum * self.accelerator.num_processes,
            "processes": self.accelerator.num_processes,
            "parts": [{"from_step": step, "processes": n} for step, n in history["parts"]],
            "device": self.accelerator.device.type,
            "precision": self.precision,
            "train_loss_first": losses[0][0] / losses[0][1] if losses else None,
            "train_loss_final": sum(s for s, _ in tail) / sum(n for _, n in tail) if tail else None,
            "eval_loss_before": history["eval"][0][1],
            "eval_loss_after": history["eval"][-1][1],
            "eval_history": history["eval"],
            "train_tokens": history["train_tokens"],
            "tokens_per_second": round(history["train_tokens"] / seconds, 1) if seconds else None,
            "train_seconds": round(seconds, 2),
            "wall_seconds": round(self._wall_seconds(), 2),
            "resumed_from_step": self.resumed_from,
            "funnelqa_version": __version__,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _remove_checkpoints(out: Path) -> None:
    import shutil

    from funnelqa.training.checkpoint import checkpoint_root

    # The finished adapter and card supersede them; --resume of a finished run just reports the card.
    shutil.rmtree(checkpoint_root(out), ignore_errors=True)


class _Progress:
    """The rich progress bar on stderr: step, loss, eval loss, tokens/s, ETA. When stderr is not a
    terminal (a log file, CI) a bar cannot redraw, so about twenty plain lines are written instead."""

    def __init__(self, total: int, done: int, *, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.step = done
        self.loss_text = ""
        self.eval_text = ""
        self.speed_text = ""
        if enabled:
            from funnelqa.console import progress, stderr

            self.console = stderr
            self.log_every = None if stderr.is_terminal else max(1, total // 20)
            self.bar = progress()
            self.task = self.bar.add_task("train", total=total, completed=done, status="")

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

    def update(self, report: StepReport) -> None:
        self.step = report.step
        self.loss_text = f"loss {report.loss:.3f}"
        self.speed_text = f"{report.tokens_per_second:,.0f} tok/s"
        if report.eval_loss is not None:
            self.eval_text = f"eval {report.eval_loss:.3f}"
        self._render(log=bool(self.enabled and self.log_every and report.step % self.log_every == 0))

    def show_eval(self, eval_loss: float | None) -> None:
        self.eval_text = f"eval {eval_loss:.3f}" if eval_loss is not None else ""
        self._render(log=bool(self.enabled and self.log_every))

    def _render(self, *, log: bool) -> None:
        if not self.enabled:
            return
        status = "  ".join(t for t in (self.loss_text, self.eval_text, self.speed_text) if t)
        self.bar.update(self.task, completed=self.step, status=status)
        if log:
            self.console.print(f"train: step {self.step}/{self.total}  {status}", highlight=False)
