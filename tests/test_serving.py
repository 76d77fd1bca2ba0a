"""Served inference: adapter folders as vLLM loads them, and `simulate` against one server with two adapters."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from funnelqa import render
from funnelqa.chat_template import encode_chat
from funnelqa.errors import BackendUnavailable, UsageError
from funnelqa.prompts import load
from funnelqa.records import load_records
from funnelqa.serving import VLLM_LORA_MODULES, read_adapter, serving_card, vllm_serve_args
from funnelqa.simulate import ANSWER_SCHEMA
from tests.conftest import run_cli
from tests.test_openai_backend import FakeOpenAIServer
from tests.test_train import corrupt_output, write_jsonl
from tests.tiny import build_tokenizer, make_tiny_model

SERVED = ("questioner", "simulator")
# Above --concurrency's default of 8: were the option lost on its way to a backend, fewer would be in flight.
CONCURRENCY = 10
# More users than requests in flight, so every turn has more to ask than the client may send at once.
USERS = 2 * CONCURRENCY + 1
# A request waits at most this long for its batch-mates; only a run that never reaches the
# concurrency waits it out (and then fails), a working one is released as soon as they arrive.
HOLD_SECONDS = 10.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def save_adapter(base: Path, out: Path, **options) -> Path:
    """An adapter saved the way the trainer saves one (peft, safetensors), LoRA on all linear layers by default."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM"} | options
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**settings))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(out, safe_serialization=True)
    return out


# ---- adapter folders as vLLM loads them ----

def test_an_all_linear_adapter_loads_in_vllm_as_it_is(tiny, tmp_path):
    adapter = save_adapter(tiny, tmp_path / "q")
    written = json.loads((adapter / "adapter_config.json").read_text())
    # peft writes all-linear out as module paths; vLLM reads the tensor names, by their last part.
    assert isinstance(written["target_modules"], list) and "model.layers.0.self_attn.q_proj" in written["target_modules"]
    info = read_adapter(adapter)
    assert info.vllm_ready and info.problems == ()
    assert info.r == 16 and info.lora_alpha == 32
    assert info.target_modules == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    assert set(info.target_modules) <= VLLM_LORA_MODULES
    assert info.base_path == str(tiny) and info.base_transformers == json.loads((tiny / "config.json").read_text())["transformers_version"]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj"], "use_dora": True}, "DoRA"),
        ({"target_modules": ["q_proj"], "r": 600}, "rank r=600"),
    ],
)
def test_what_vllm_refuses_is_named(tiny, tmp_path, options, problem):
    info = read_adapter(save_adapter(tiny, tmp_path / "a", **options))
    assert not info.vllm_ready
    assert any(problem in text for text in info.problems), info.problems
    with pytest.raises(UsageError, match="would not load"):
        vllm_serve_args({"questioner": info})


def test_a_folder_without_adapter_is_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match="not a peft adapter"):
        read_adapter(tmp_path)


def test_one_server_command_serves_both_adapters_of_one_base(tiny, tmp_path):
    questioner = read_adapter(save_adapter(tiny, tmp_path / "q"))
    simulator = read_adapter(save_adapter(tiny, tmp_path / "s", r=8, lora_alpha=16))
    args = vllm_serve_args({"questioner": questioner, "simulator": simulator})
    assert args == [
        "vllm", "serve", str(tiny), "--enable-lora",
        "--lora-modules", f"questioner={tmp_path / 'q'}", f"simulator={tmp_path / 's'}",
        "--max-lora-rank", "16", "--max-loras", "2",
    ]
    odd = read_adapter(save_adapter(tiny, tmp_path / "a=b,c", r=20))
    args = vllm_serve_args({"questioner": odd})
    # A path vLLM's NAME=PATH form cannot carry goes as JSON; rank 20 needs vLLM's next allowed rank.
    assert json.loads(args[args.index("--lora-modules") + 1]) == {"name": "questioner", "path": str(tmp_path / "a=b,c")}
    assert args[args.index("--max-lora-rank") + 1] == "32"
    other_base = make_tiny_model(tmp_path / "other")
    with pytest.raises(UsageError, match="one base model"):
        vllm_serve_args({"questioner": questioner, "simulator": read_adapter(save_adapter(other_base, tmp_path / "o"))})


def test_the_run_card_says_how_to_serve_the_adapter(tiny, tmp_path):
    from funnelqa.training import TrainConfig, train

    examples = write_jsonl(tmp_path / "examples.jsonl", corrupt_output(4))
    out = tmp_path / "run"
    config = TrainConfig(role="simulator", out=out, base=f"hf:{tiny}", max_steps=1, batch_size=4, save_every=0, eval_fraction=0.0)
    card = train(config, examples, show_progress=False)
    serving = card["serving"]
    assert serving == json.loads((out / "run_card.json").read_text())["serving"]
    assert serving["vllm_ready"] and serving["problems"] == []
    assert serving["r"] == 16 and serving["base_path"] == card["base_path"] == str(tiny)
    assert serving["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert serving["vllm_serve"] == vllm_serve_args({"simulator": read_adapter(out)})
    assert serving_card(out, "simulator") == serving


# ---- simulate against one server that serves both adapters ----

def prompt_role(messages: list[dict[str, str]]) -> str:
    """Whose prompt a request carries, from its system prompt: "questioner", "simulator" or "other"."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    if system == load("questioner_system"):
        return "questioner"
    if system.startswith(load("simulator_system")):
        return "simulator"
    return "other"


class TwoAdapterServer(FakeOpenAIServer):
    """One vLLM server with an adapter per role: ``/v1/chat/completions`` answers a request by its
    ``model`` (404 for a name it does not serve, as vLLM does), "questioner" with a question and
    "simulator" with the JSON answer naming the profile's tags one per turn, in profile order.

    ``served`` records (model name, whose prompt) per request; ``max_in_flight`` the most requests
    inside at once per model. A request is held until ``hold_until`` of its model are inside (or
    ``HOLD_SECONDS`` pass), so a client that keeps that many in flight is seen doing so.
    """

    def __init__(self, hold_until: int):
        super().__init__(self.reply)
        self.hold_until = hold_until
        self.served: list[tuple[str, str]] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.full = {name: threading.Event() for name in SERVED}

    def rejection(self, body: dict[str, Any]) -> tuple[int, str] | None:
        if body.get("model") not in SERVED:
            return 404, f"The model `{body.get('model')}` does not exist."
        return None

    def reply(self, body: dict[str, Any]) -> str:
        model, messages = body["model"], body["messages"]
        with self._lock:
            self.served.append((model, prompt_role(messages)))
            self.in_flight[model] += 1
            self.max_in_flight[model] = max(self.max_in_flight[model], self.in_flight[model])
            if self.in_flight[model] >= self.hold_until:
                self.full[model].set()
        self.full[model].wait(HOLD_SECONDS)
        try:
            if model == "questioner":
                asked = sum(m["role"] == "assistant" for m in messages)
                return f"Question {asked + 1}: what else do you enjoy?"
            profile = [line[2:].split(": ", 1) for line in messages[0]["content"].split("\n") if line.startswith("- ")]
            tag, content = profile[sum(m["role"] == "user" for m in messages) - 1]
            return render.simulator_target(content, [tag])
        finally:
            with self._lock:
                self.in_flight[model] -= 1


def forward_records(users: int) -> list[dict]:
    """Forward records of three tags each: the simulator above reveals one per turn."""
    tags = ["Genre", "Era", "Director"]
    return [
        {
            "id": f"u{u}",
            "tags": [{"tag": tag, "content": f"User {u} says something about {tag.lower()}."} for tag in tags],
            "questions": [{"question": f"What about {tag.lower()}?", "answer": "Something.", "tags": [tag]} for tag in tags],
        }
        for u in range(users)
    ]


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """`funnelqa simulate` (the CLI, as a user runs it) against the two-adapter server: (server, sessions).

    Without the cache every request reaches the server (with it, the first turn's questioner
    prompt, the same for every user, would be asked once)."""
    folder = tmp_path_factory.mktemp("served")
    forward = write_jsonl(folder / "forward.jsonl", forward_records(USERS))
    with TwoAdapterServer(hold_until=CONCURRENCY) as server:
        url = f"{server.url}/v1"
        result = run_cli(
            "simulate", forward, "--questioner", f"openai:questioner@{url}", "--simulator", f"openai:simulator@{url}",
            "--concurrency", str(CONCURRENCY), "--max-questions", "5", "--no-cache", "--out", folder / "sessions.jsonl",
        )
    assert result.returncode == 0, result.stderr
    return server, load_records(folder / "sessions.jsonl")


def test_each_role_reaches_its_own_served_adapter(served_run):
    server, sessions = served_run
    # Three tags each, one revealed per turn: every interview completes in three turns.
    assert [s["stop"] for s in sessions] == ["complete"] * USERS
    assert all(len(s["turns"]) == 3 and s["elicited"] == s["target"] for s in sessions)
    assert Counter(server.served) == {("questioner", "questioner"): 3 * USERS, ("simulator", "simulator"): 3 * USERS}
    # The simulator's requests ask for the answer schema (vLLM's structured output); the questioner's do not.
    formats = {(body["model"], json.dumps(body.get("response_format"), sort_keys=True)) for body in server.requests}
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    assert formats == {("questioner", "null"), ("simulator", json.dumps(schema, sort_keys=True))}


def test_concurrency_requests_of_each_role_are_in_flight_at_once(served_run):
    server, _ = served_run
    # --concurrency at once, for each role: what keeps a server's batch full. Fewer would mean the
    # option did not reach that role's backend (its default is 8); more, that the client ignores it.
    assert server.max_in_flight == {"questioner": CONCURRENCY, "simulator": CONCURRENCY}


def served_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt vLLM's chat endpoint builds: the whole conversation rendered by the tokenizer's
    chat template with the generation prompt, then tokenized without special tokens (the
    ChatCompletionRequest defaults add_generation_prompt=True, add_special_tokens=False)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_served_prompt_is_the_training_prompt_token_for_token(served_run):
    """Training tokenizes a conversation piece by piece (funnelqa.chat_template); a server renders
    and tokenizes it whole. For the conversations simulate sends, the ids are the same."""
    server, _ = served_run
    tokenizer = build_tokenizer()
    for body in server.requests:
        assert served_prompt_ids(tokenizer, body["messages"]) == list(encode_chat(tokenizer, body["messages"]).input_ids)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["local:smollm2-135m", "local:gemma3-270m"])
def test_served_prompts_match_training_for_the_embedded_models(served_run, base):
    from funnelqa.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(base)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    server, _ = served_run
    for body in server.requests:
        assert served_prompt_ids(tokenizer, body["messages"]) == list(encode_chat(tokenizer, body["messages"]).input_ids)
