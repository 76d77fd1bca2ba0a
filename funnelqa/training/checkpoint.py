"""Checkpoints for --resume: trainable weights, optimizer, scheduler, every process's RNG, and the step.

A checkpoint is written to ``step-N.partial`` and renamed to ``step-N`` once complete, so a run
killed while saving leaves the previous checkpoint intact. Only the newest one is kept. The data
order needs no saving: it is a function of (seed, epoch) and the step number.
"""

from __future__ import annotations

import json
import random
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


def rng_state() -> dict[str, Any]:
    """This process's random states: ``python``, ``numpy``, ``torch`` (CPU) and, with CUDA, ``cuda`` (every GPU's)."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved; the CUDA states only where CUDA is available."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    accelerator.wait_for_everyone()
    torch.save(rng_state(), partial / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
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
    """Restore weights, optimizer, scheduler and this process's RNG (call after everything is built)."""
    import torch

    load_trainable_state(accelerator.unwrap_model(model), torch.load(checkpoint / "adapter.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(checkpoint / f"rng-{accelerator.process_index}.pt", weights_only=False))
