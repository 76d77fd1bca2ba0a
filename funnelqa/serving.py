"""What an inference server needs to serve the adapters `train-questioner` and `train-simulator` write.

One vLLM server serves the base model with both adapters, one served name each (docs/serving.md).
This module reads an adapter folder as vLLM's LoRA loader does and says whether it will load:

- ``adapter_config.json`` must give ``r``, ``lora_alpha`` and ``target_modules``; vLLM refuses
  ``modules_to_save``, DoRA (``use_dora``), a ``bias`` other than "none", and ``r`` above
  ``--max-lora-rank``, which takes only the values in ``VLLM_LORA_RANKS``
  (vllm/lora/peft_helper.py ``validate_legal``, vllm/config/lora.py ``MaxLoRARanks``);
- the modules come from the tensor names in ``adapter_model.safetensors``, not from
  ``target_modules`` (vllm/lora/lora_model.py ``from_local_checkpoint``): every name must be a
  ``lora_A``/``lora_B`` weight of a layer the model takes LoRA on. peft writes ``all-linear`` out
  as module names (``q_proj``, ...); the tensor names carry full paths
  (``model.layers.0.self_attn.q_proj.lora_A.weight``), which vLLM reads by their module part.

Nothing here imports torch or vLLM: the trainer calls ``serving_card`` for the run card.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from funnelqa.errors import BackendUnavailable, UsageError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# vLLM's --max-lora-rank accepts only these values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The attention and MLP projections, by their Hugging Face names, that vLLM's decoder models take
# LoRA on (Llama and Gemma 3, the bases funnelqa embeds, pack q/k/v into qkv_proj and gate/up into
# gate_up_proj and accept both spellings). peft's all-linear picks exactly these in those models.
VLLM_LORA_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"}
)
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class AdapterServing:
    """One adapter folder as a server sees it.

    ``adapter``: the folder, absolute. ``base_path``: the base model folder it was trained on
    (``base_model_name_or_path``; for ``local`` the converted model in funnelqa's cache, with its
    tokenizer and chat template). ``base_transformers``: the transformers version that wrote that
    folder's config.json (a folder written by transformers 5 needs a server built on it).
    ``target_modules``: the kinds of layer the weights adapt (``q_proj``, ...), sorted.
    ``problems``: why vLLM would refuse it; empty when it loads as it is.
    """

    adapter: str
    base_path: str
    base_transformers: str | None
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def vllm_ready(self) -> bool:
        """True when vLLM loads the folder as it is."""
        return not self.problems


def read_adapter(adapter: str | Path) -> AdapterServing:
    """The serving facts of a peft adapter folder; BackendUnavailable when it holds no adapter."""
    folder = Path(adapter).expanduser().resolve()
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        with safe_open(folder / ADAPTER_WEIGHTS, framework="np") as weights:
            names = list(weights.keys())
    except (OSError, ValueError) as exc:
        raise BackendUnavailable(f"{folder} is not a peft adapter with safetensors weights: {exc}") from None
    problems = [f"adapter_config.json lacks {key!r}" for key in ("r", "lora_alpha", "target_modules") if key not in config]
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= VLLM_LORA_RANKS[-1]:
        problems.append(f"rank r={rank!r}: vLLM serves ranks 1 to {VLLM_LORA_RANKS[-1]}")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: vLLM serves LoRA weights only")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora): vLLM does not serve it")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}: vLLM serves adapters without bias")
    kinds = set()
    for name in names:
        if not name.endswith(_LORA_SUFFIXES):
            problems.append(f"tensor {name}: vLLM loads only lora_A/lora_B weights")
            continue
        kinds.add(name.rsplit(".", 3)[-3])
    unsupported = sorted(kinds - VLLM_LORA_MODULES)
    if unsupported:
        problems.append(f"LoRA on {', '.join(unsupported)}: vLLM takes LoRA on {', '.join(sorted(VLLM_LORA_MODULES))}")
    base_path = str(config.get("base_model_name_or_path") or "")
    return AdapterServing(
        adapter=str(folder),
        base_path=base_path,
        base_transformers=_written_by(Path(base_path)) if base_path else None,
        r=rank if isinstance(rank, int) else 0,
        lora_alpha=config.get("lora_alpha", 0),
        target_modules=tuple(sorted(kinds)),
        problems=tuple(problems),
    )


def _written_by(base: Path) -> str | None:
    try:
        return json.loads((base / "config.json").read_text(encoding="utf-8")).get("transformers_version")
    except (OSError, ValueError, AttributeError):
        return None


def vllm_serve_args(adapters: Mapping[str, AdapterServing]) -> list[str]:
    """``vllm serve`` with the base model and every adapter under its served name (the mapping's key).

    ``--max-lora-rank`` is the smallest value vLLM accepts that holds every adapter's rank, and
    ``--max-loras`` the number of adapters, so requests for all of them share a batch. Raises
    UsageError when the adapters were trained on different bases or one would not load.
    """
    if not adapters:
        raise UsageError("name at least one adapter to serve")
    bases = {info.base_path for info in adapters.values()}
    if len(bases) != 1:
        raise UsageError(f"one server serves adapters of one base model; these were trained on {sorted(bases)}")
    for name, info in adapters.items():
        if info.problems:
            raise UsageError(f"vLLM would not load {name} ({info.adapter}): {'; '.join(info.problems)}")
    rank = max(info.r for info in adapters.values())
    args = ["vllm", "serve", bases.pop(), "--enable-lora", "--lora-modules"]
    for name, info in adapters.items():
        # vLLM reads NAME=PATH only when the path holds no '=' or ','; otherwise it wants JSON.
        plain = "=" not in info.adapter and "," not in info.adapter and "=" not in name
        args.append(f"{name}={info.adapter}" if plain else json.dumps({"name": name, "path": info.adapter}))
    max_rank = next(allowed for allowed in VLLM_LORA_RANKS if allowed >= rank)
    return args + ["--max-lora-rank", str(max_rank), "--max-loras", str(len(adapters))]


def serving_card(adapter: str | Path, name: str) -> dict[str, Any]:
    """The run card's ``serving`` entry: ``read_adapter``'s fields, ``vllm_ready``, and
    ``vllm_serve``, the server command for this adapter alone under ``name`` (None when vLLM
    would refuse it; ``problems`` says why)."""
    info = read_adapter(adapter)
    card = asdict(info)
    card.update(target_modules=list(info.target_modules), problems=list(info.problems), vllm_ready=info.vllm_ready)
    card["vllm_serve"] = vllm_serve_args({name: info}) if info.vllm_ready else None
    return card
