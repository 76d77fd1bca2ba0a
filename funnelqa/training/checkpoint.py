"""Checkpoints for --resume: trainable weights, optimizer, scheduler and the step, written by the main process.

A checkpoint is written to ``step-N.partial`` and renamed to ``step-N`` once complete, so a run
killed while saving leaves the previous checkpoint intact. Only the newest one is kept. Neither the
data order nor any random state needs saving: the order is a function of (seed, epoch) and the
step number, and each micro-batch's dropout of (seed, step, its place in the step)
(``batching.dropout_seed``). So a checkpoint is the same whatever the number of processes that
wrote it, and resumes on any number that keeps each step's micro-batches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from funnelqa.errors import UsageError

CHECKPOINTS = "checkpoints"
STATE = "state.json"


def checkpoint_root(out: Path) -> Path:
    """``OUT/checkpoints``, the folder of the ``step-NNNNNNN`` checkpoints."""
    return Path(out) / CHECKPOINTS


def latest_checkpoint(out: Path) -> Path | None:
    """The finished checkpoint with the highest step under ``OUT/checkpoints`` (a ``step-N`` folder
    holding state.json; ``.partial`` ones are ignored), or None."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial") and (p / STATE).exists()]
    return max(done, key=lambda p: int(p.name.removeprefix("step-")), default=None)


def trainable_state(model) -> dict[str, Any]:
    """``{parameter name: CPU copy}`` of the parameters that require grad, i.e. the LoRA weights."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, weights: dict[str, Any]) -> None:
    """Copy ``weights`` (``trainable_state``'s) into the model's trainable parameters, on their
    device and dtype. Raises UsageError when the names differ: another adapter's checkpoint."""
    import torch

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        missing = sorted(set(params) ^ set(weights))[:3]
        raise UsageError(f"checkpoint does not match the model's adapter (e.g. {missing})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))


def save_checkpoint(accelerator, out: Path, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
    """Collective: every process must call it. Returns the checkpoint directory."""
    import torch

    root = checkpoint_root(out)
    final = root / f"step-{step:07d}"
    partial = root / f"step-{step:07d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        torch.save(trainable_state(accelerator.unwrap_model(model)), partial / "adapter.pt")
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        (partial / STATE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for older in root.glob("step-*"):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's state.json: ``options``, ``num_processes``, ``data_sha256``, ``history`` and ``step``."""
    return json.loads((checkpoint / STATE).read_text(encoding="utf-8"))


def load_checkpoint(accelerator, checkpoint: Path, model, optimizer, scheduler) -> None:
    """Restore weights, optimizer and scheduler (call after everything is built)."""
    import torch

    load_trainable_state(accelerator.unwrap_model(model), torch.load(checkpoint / "adapter.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
