"""LoRA training (train-questioner, train-simulator) on a tiny random model, offline."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from funnelqa import render
from funnelqa.errors import InputError, UsageError
from funnelqa.training import Trainer, TrainConfig, train
from funnelqa.training.batching import StepPlan, collate, length_grouped_batches, target_loss_sum
from funnelqa.training.checkpoint import latest_checkpoint
from funnelqa.chat_template import encode_chat
from funnelqa.training.examples import (
    IGNORE_INDEX,
    encode_examples,
    encode_steps,
    questioner_conversations,
    read_examples,
    render_example,
    split_users,
)
from tests.conftest import REPO
from tests.tiny import make_tiny_model

GENRES = ["crime", "comedy", "westerns", "animation", "thrillers", "romance"]
ERAS = ["1970s", "1990s", "2010s"]
DIRECTORS = ["the Coen brothers", "Sergio Leone", "Hayao Miyazaki"]
QUESTIONS = [
    ("What kinds of movies do you usually enjoy?", "Genre"),
    ("Do you prefer recent films or classics?", "Era"),
    ("Which directors do you follow?", "Director"),
]


def corrupt_output(users: int = 12, seed: int = 0) -> list[dict]:
    """Examples in the format `funnelqa corrupt` writes (questioner t = n-1..0, simulator + negatives)."""
    rng = random.Random(seed)
    lines = []
    for u in range(users):
        tags = [
            {"tag": "Genre", "content": f"The user enjoys {rng.choice(GENRES)}."},
            {"tag": "Era", "content": f"The user prefers films from the {rng.choice(ERAS)}."},
            {"tag": "Director", "content": f"The user likes {rng.choice(DIRECTORS)}."},
        ]
        questions = [{"question": q, "answer": t["content"], "tags": [tag]} for (q, tag), t in zip(QUESTIONS, tags)]
        for t in range(len(questions) - 1, -1, -1):
            revealed = {name for q in questions[:t] for name in q["tags"]}
            lines.append({
                "id": f"u{u}", "role": "questioner", "step": t,
                "known": [tag for tag in tags if tag["tag"] in revealed],
                "history": [{"question": q["question"], "answer": q["answer"]} for q in questions[:t]],
                "target": questions[t]["question"], "target_tags": questions[t]["tags"],
            })
        for q in questions:
            lines.append({"id": f"u{u}", "role": "simulator", "profile_tags": tags, "question": q["question"],
                          "answer": q["answer"], "tags": q["tags"], "negative": False})
        lines.append({"id": f"u{u}", "role": "simulator", "profile_tags": tags, "question": "Do you like opera?",
                      "answer": render.NO_PREFERENCE, "tags": [], "negative": True})
    return lines


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small gains nothing from a second thread, and on a busy machine two threads
    waiting for each other at every op make a step a hundred times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "examples.jsonl", corrupt_output())


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from funnelqa.models import load_tokenizer

    return load_tokenizer(f"hf:{tiny}")


def config(tiny: Path, out: Path, role: str = "questioner", **options) -> TrainConfig:
    defaults = dict(batch_size=4, lr=5e-3, max_steps=12, save_every=0, eval_fraction=0.2)
    return TrainConfig(role=role, out=out, base=f"hf:{tiny}", **{**defaults, **options})


@pytest.fixture(scope="module")
def trained(tiny, examples, tmp_path_factory):
    """One questioner run, shared: the trainer (with its in-memory model), the initial weights and the card."""
    trainer = Trainer(config(tiny, tmp_path_factory.mktemp("run") / "q"), examples)
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    card = trainer.run(show_progress=False)
    return trainer, initial, card


# ---- examples: reading, rendering, labels ----

def test_reads_only_its_role_and_hashes_the_file(examples):
    data = read_examples(examples, "simulator")
    assert {r["role"] for r in data.examples} == {"simulator"}
    assert data.other_roles == {"questioner": 36}
    assert len(data.examples) == 48 and len(data.users) == 12
    import hashlib

    assert data.sha256 == hashlib.sha256(examples.read_bytes()).hexdigest()


def test_input_without_the_role_or_with_bad_lines_names_file_and_line(tmp_path):
    only_simulator = write_jsonl(tmp_path / "s.jsonl", [e for e in corrupt_output(2) if e["role"] == "simulator"])
    with pytest.raises(InputError, match="holds no questioner examples .*8 simulator.*use train-simulator"):
        read_examples(only_simulator, "questioner")
    forward = write_jsonl(tmp_path / "f.jsonl", [{"id": "u1", "tags": [], "questions": []}])
    with pytest.raises(InputError, match=r"f.jsonl:1: missing field 'role'"):
        read_examples(forward, "questioner")
    broken = corrupt_output(1)
    del broken[2]["target"]
    with pytest.raises(InputError, match=r"b.jsonl:3: missing field 'target'"):
        read_examples(write_jsonl(tmp_path / "b.jsonl", broken), "questioner")


def test_prompt_is_render_through_the_chat_template_and_target_ends_the_turn(tokenizer):
    example = corrupt_output(1)[1]  # questioner, step 1: one question already answered
    messages, target = render_example(example, "questioner", "qa")
    assert messages == render.questioner_messages(example["known"], example["history"], "qa")
    chat = encode_chat(tokenizer, [*messages, {"role": "assistant", "content": target}], generation_prompt=False)
    (start, end), = chat.targets[-1:]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(chat.input_ids[:start]) == prompt
    assert tokenizer.decode(chat.input_ids[start:end]) == render.questioner_target(example["target"]) + "<|im_end|>\n"
    answers_form, _ = render_example(example, "questioner", "answers")
    assert answers_form == render.questioner_messages(example["known"], example["history"], "answers")
    simulator = next(e for e in corrupt_output(1) if e["role"] == "simulator")
    assert render_example(simulator, "simulator", None) == (
        render.simulator_messages(simulator["profile_tags"], simulator["question"]),
        render.simulator_target(simulator["answer"], simulator["tags"]),
    )


def test_prompt_tokens_carry_no_loss_and_target_tokens_do(tokenizer):
    lines = [e for e in corrupt_output(2) if e["role"] == "questioner"]
    encoded, stats = encode_steps(tokenizer, lines, "questioner", "qa", max_length=1024)
    assert stats.encoded == len(lines) and stats.truncated == 0
    for item, line in zip(encoded, lines):
        messages, target = render_example(line, "questioner", "qa")
        prompt_ids = list(encode_chat(tokenizer, messages).input_ids)
        labels = item.labels()
        assert list(item.input_ids[: len(prompt_ids)]) == prompt_ids
        assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert tokenizer.decode(labels[len(prompt_ids) :]) == target + "<|im_end|>\n"
    batch = collate(encoded[:4], tokenizer.pad_token_id)
    for row, item in enumerate(encoded[:4]):
        labelled = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert labelled == list(item.input_ids[item.first_target :])
        assert batch.attention_mask[row].sum() == len(item)


def conversation_data(tmp_path, lines):
    return read_examples(write_jsonl(tmp_path / "c.jsonl", lines), "questioner")


def test_a_conversation_labels_exactly_the_target_tokens_of_its_per_step_examples(tokenizer, tmp_path):
    lines = corrupt_output(3)
    # Without unanswerable turns a conversation is every step's prompt at once: same prefixes, same targets.
    plain = conversation_data(tmp_path, [e for e in lines if not e.get("negative")])
    steps, _ = encode_steps(tokenizer, plain.examples, "questioner", "qa", max_length=1024)
    chats, stats = encode_examples(tokenizer, plain, "questioner", "qa", 1024, "conversation")
    assert stats.conversations == 3 and len(chats) == 3 and not stats.incomplete_users
    for chat in chats:
        mine = sorted((e for e in steps if e.user == chat.user), key=len)
        assert len(chat.targets) == len(mine) == 3
        for (start, end), step in zip(chat.targets, mine):
            assert chat.input_ids[start:end] == step.input_ids[step.first_target :]
            assert chat.input_ids[:start] == step.input_ids[: step.first_target]
        assert chat.target_length == sum(e.target_length for e in mine)
        assert len(chat) < sum(len(e) for e in mine)
    # With corrupt's negatives the questioner also hears "No preference" to questions it is not
    # trained to ask: the labelled tokens are still exactly the steps' targets, nothing more.
    negatives = conversation_data(tmp_path, lines)
    assert negatives.negatives == {f"u{u}": ["Do you like opera?"] for u in range(3)}
    with_negatives, stats = encode_examples(tokenizer, negatives, "questioner", "qa", 1024, "conversation", seed=1)
    assert stats.unanswerable_turns == 3
    for chat in with_negatives:
        mine = sorted((e for e in steps if e.user == chat.user), key=len)
        assert [chat.input_ids[a:b] for a, b in chat.targets] == [e.input_ids[e.first_target :] for e in mine]
        text = tokenizer.decode(chat.input_ids)
        assert text.count("Do you like opera?") == 1 and text.count(f"user\n{render.NO_PREFERENCE}") == 1
        assert "Do you like opera?" not in tokenizer.decode([t for a, b in chat.targets for t in chat.input_ids[a:b]])


def test_simulator_conversation_reads_the_profile_once_and_trains_every_answer(tokenizer, tmp_path):
    data = read_examples(write_jsonl(tmp_path / "s.jsonl", corrupt_output(2)), "simulator")
    steps, _ = encode_steps(tokenizer, data.examples, "simulator", None, max_length=1024)
    chats, stats = encode_examples(tokenizer, data, "simulator", None, 1024, "conversation")
    assert len(chats) == 2 and stats.layout == "conversation"
    for chat in chats:
        mine = [e for e in steps if e.user == chat.user]
        assert sorted(chat.input_ids[a:b] for a, b in chat.targets) == sorted(e.input_ids[e.first_target :] for e in mine)
        assert tokenizer.decode(chat.input_ids).count("Profile:") == 1
        assert len(chat) < sum(len(e) for e in mine) / 2


def test_incomplete_chains_are_reported_not_trained(tmp_path):
    lines = [e for e in corrupt_output(3) if e["role"] == "questioner"]
    broken = [e for e in lines if not (e["id"] == "u1" and e["step"] == 1)]
    changed = [dict(e, target="Something else?") if e["id"] == "u2" and e["step"] == 0 else e for e in broken]
    data = conversation_data(tmp_path, changed)
    conversations, incomplete = questioner_conversations(data.examples, {}, seed=0)
    assert [c.user for c in conversations] == ["u0"] and incomplete == ["u1", "u2"]


def test_long_conversations_split_between_turns_and_every_window_repeats_the_system_prompt(tokenizer, tmp_path):
    data = read_examples(write_jsonl(tmp_path / "s.jsonl", corrupt_output(2)), "simulator")
    whole, _ = encode_examples(tokenizer, data, "simulator", None, 4096, "conversation")
    limit = min(len(e) for e in whole) - 20  # one turn less than a whole interview
    windows, stats = encode_examples(tokenizer, data, "simulator", None, limit, "conversation")
    assert stats.windows_split == 2 and len(windows) > 2 and stats.dropped_too_long == 0
    assert all(len(w) <= limit for w in windows)
    for user in ("u0", "u1"):
        full = next(e for e in whole if e.user == user)
        parts = [w for w in windows if w.user == user]
        assert sorted(w.input_ids[a:b] for w in parts for a, b in w.targets) == sorted(
            full.input_ids[a:b] for a, b in full.targets
        )
        assert all(tokenizer.decode(w.input_ids).count("Profile:") == 1 for w in parts)


def test_long_prompts_lose_their_start_and_targets_are_never_cut(tokenizer):
    lines = [e for e in corrupt_output(2) if e["role"] == "simulator"]
    full, _ = encode_steps(tokenizer, lines, "simulator", None, max_length=4096)
    longest_target = max(e.target_length for e in full)
    limit = min(len(e) for e in full) - 5
    assert longest_target < limit
    cut, stats = encode_steps(tokenizer, lines, "simulator", None, max_length=limit)
    assert stats.truncated == len(lines) and stats.dropped_too_long == 0
    for whole, short in zip(full, cut):
        assert len(short) == limit and short.truncated
        assert short.input_ids == whole.input_ids[-limit:]
        assert short.target_length == whole.target_length
    kept, stats = encode_steps(tokenizer, lines, "simulator", None, max_length=longest_target)
    assert stats.dropped_too_long >= 1
    assert all(e.target_length < longest_target for e in kept)


def test_left_padded_batch_loss_equals_the_sum_of_unpadded_losses(tokenizer, tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    lines = [e for e in corrupt_output(2) if e["role"] == "simulator"]
    encoded, _ = encode_steps(tokenizer, lines, "simulator", None, max_length=1024)
    # Conversations too: several target spans per row, with untrained turns between them.
    data = read_examples(write_jsonl(tmp_path / "c.jsonl", corrupt_output(2)), "questioner")
    encoded += encode_examples(tokenizer, data, "questioner", "qa", 1024, "conversation")[0]
    assert len({len(e) for e in encoded}) > 1  # the batch really is padded
    with torch.no_grad():
        batched = target_loss_sum(model, collate(encoded, tokenizer.pad_token_id))
        alone = sum(target_loss_sum(model, collate([e], tokenizer.pad_token_id)) for e in encoded)
        # Reference without our left padding or logits_to_keep: the model's own loss on full logits.
        reference = sum(
            model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels()])).loss * e.target_length
            for e in encoded
        )
    assert torch.allclose(batched, alone, rtol=1e-4)
    assert torch.allclose(batched, reference, rtol=1e-4)


# ---- batching and the split ----

def test_length_grouped_batches_cover_every_example_once_with_little_padding():
    rng = random.Random(1)
    lengths = [rng.randint(20, 400) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert batches != length_grouped_batches(lengths, 8, seed=0, epoch=1)

    def padding(groups):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in groups)

    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i : i + 8] for i in range(0, 1000, 8)]
    assert padding(batches) < padding(random_batches) / 5


def test_step_plan_gives_every_process_an_equal_disjoint_share():
    plan = StepPlan(n_examples=10, batch_size=2, grad_accum=2, num_processes=2)
    epoch = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert plan.steps_per_epoch == 2
    first = [plan.step_batches(epoch, 0, rank) for rank in (0, 1)]
    assert first == [[(0, [0, 1]), (2, [4, 5])], [(1, [2, 3]), (3, [6, 7])]]
    # The last step wraps around to the epoch's start so that both processes run two micro-batches.
    assert [plan.step_batches(epoch, 1, rank) for rank in (0, 1)] == [[(0, [8, 9]), (2, [2, 3])], [(1, [0, 1]), (3, [4, 5])]]
    # One process accumulating four runs the same micro-batches in the same places.
    alone = StepPlan(n_examples=10, batch_size=2, grad_accum=4, num_processes=1)
    assert sorted(first[0] + first[1]) == alone.step_batches(epoch, 0, 0)


def test_split_keeps_each_user_on_one_side():
    users = [f"u{i}" for i in range(50)]
    train_users, eval_users = split_users(users, 0.2, seed=3)
    assert len(eval_users) == 10 and not train_users & eval_users and train_users | eval_users == set(users)
    assert split_users(users, 0.2, seed=3) == (train_users, eval_users)
    assert split_users(users, 0.0, seed=3) == (set(users), set())
    assert split_users(["only"], 0.5, seed=3) == ({"only"}, set())


# ---- training ----

def test_training_lowers_the_loss(trained):
    _, _, card = trained
    assert card["steps"] == 12
    assert card["eval_loss_after"] < card["eval_loss_before"] - 1.0
    assert card["train_loss_final"] < card["train_loss_first"] - 1.0


def test_only_the_adapter_changes(trained, tiny):
    from transformers import AutoModelForCausalLM

    trainer, initial, _ = trained
    original = dict(AutoModelForCausalLM.from_pretrained(tiny).named_parameters())
    after = dict(trainer.model.named_parameters())
    lora = [name for name in after if "lora_" in name]
    assert lora and all(after[name].requires_grad for name in lora)
    assert all(not (after[name] == initial[name]).all() for name in lora if "lora_B" in name)
    base = [name for name in after if "lora_" not in name]
    for name in base:
        plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert (after[name] == original[plain]).all(), name
        assert not after[name].requires_grad


def test_run_card_and_adapter_files(trained, tiny, examples):
    trainer, _, card = trained
    out = trainer.config.out
    assert json.loads((out / "run_card.json").read_text()) == card
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny)
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    assert card["role"] == "questioner" and card["profile_form"] == "qa"
    assert card["base"] == f"hf:{tiny}" and card["base_path"] == str(tiny)
    assert card["data"]["sha256"] == read_examples(examples, "questioner").sha256
    assert card["layout"] == "conversation" and card["examples"]["conversations"] == 12
    assert card["examples"]["train"] + card["examples"]["eval"] == 12 and card["examples"]["unanswerable_turns"] == 12
    assert card["examples"]["eval_users"] == 2 and card["examples"]["other_roles"] == {"simulator": 48}
    assert card["tokens_per_second"] > 0 and card["wall_seconds"] >= card["train_seconds"] > 0


def test_plain_transformers_and_peft_load_the_adapter(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, _, _ = trained
    out = trainer.config.out
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    input_ids = torch.tensor([trainer.train_set[0].input_ids])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=input_ids).logits, trainer.model.eval()(input_ids=input_ids).logits, atol=1e-5)


def test_saved_adapter_loads_through_the_hf_backend_and_answers_like_the_trained_model(trained, tiny):
    import torch

    from funnelqa.backends import BackendOptions, ModelSpec, Request, load_backend

    trainer, _, _ = trained
    model, tokenizer = trainer.model.eval(), trainer.tokenizer
    backend = load_backend(ModelSpec.parse(f"hf:{tiny}+{trainer.config.out}"), BackendOptions(device="cpu", dtype="float32"))
    for line in corrupt_output(2, seed=5)[:3]:
        messages, _ = render_example(line, "questioner", "qa")
        prompt = {"input_ids": torch.tensor([encode_chat(tokenizer, messages).input_ids])}
        with torch.no_grad():
            output = model.generate(
                **prompt, max_new_tokens=12, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        expected = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert backend.generate([Request(messages=tuple(messages), max_tokens=12)]) == [expected]


class Killed(Exception):
    """Raised by an on_step callback: the run stops as if killed."""


def test_resume_continues_from_the_checkpoint_to_the_same_weights(tiny, examples, tmp_path):
    from safetensors.torch import load_file

    options = dict(max_steps=6, save_every=2)
    uninterrupted = train(config(tiny, tmp_path / "a", **options), examples, show_progress=False)

    def kill_at_step_5(report):
        if report.step == 5:
            raise Killed

    with pytest.raises(Killed):
        Trainer(config(tiny, tmp_path / "b", **options), examples).run(on_step=kill_at_step_5, show_progress=False)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"
    assert not (tmp_path / "b" / "run_card.json").exists()

    with pytest.raises(UsageError, match="pass --resume"):
        train(config(tiny, tmp_path / "b", **options), examples)
    with pytest.raises(UsageError, match="options differ.*lr"):
        train(config(tiny, tmp_path / "b", resume=True, **{**options, "lr": 1e-4}), examples)

    resumed = train(config(tiny, tmp_path / "b", resume=True, **options), examples, show_progress=False)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert resumed["eval_loss_before"] == uninterrupted["eval_loss_before"]
    assert resumed["train_loss_final"] == pytest.approx(uninterrupted["train_loss_final"], rel=1e-5)
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-6, name
    # A finished run is reported again, not retrained.
    assert train(config(tiny, tmp_path / "b", resume=True, **options), examples) == resumed


# ---- several processes ----

CPU_2PROC = REPO / "configs" / "accelerate" / "cpu-2proc.yaml"
# Two conversations per micro-batch, two micro-batches per step (one per process, or both on one),
# four steps: the run crosses an epoch (five micro-batches of ten training users).
GLOBAL_4 = dict(batch_size=2, max_steps=4, save_every=2)
# Largest difference allowed between an adapter weight trained by 2 processes and by 1 process
# accumulating the same micro-batches (the weights themselves are 0.01 to 0.15 in absolute value).
# Measured here: 0.0. Two gloo processes add the same two float32 gradients as accumulation does
# (a + b either way), and the loss scale that undoes DDP's averaging is a power of two, so nothing
# rounds differently. With more processes, or another all-reduce (NCCL), the summation order
# differs, the gradients differ in their last bits, and Adam carries that into the weights.
PROCESS_TOLERANCE = 1e-6
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "run_card.json"]


def flags(tiny: Path, **options) -> list[str]:
    """The command-line flags of ``config(tiny, ..., **options)``'s options."""
    chosen = {k: v for k, v in config(tiny, Path("unused"), **options).options().items() if k in
              {"base", "batch_size", "lr", "max_steps", "save_every", "eval_fraction", "grad_accum", "resume"}}
    out = []
    for name, value in chosen.items():
        if value is True:
            out.append(f"--{name.replace('_', '-')}")
        elif value is not False:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def launch(*args) -> subprocess.CompletedProcess:
    """`accelerate launch` with the shipped two-process CPU config, as docs/training.md shows it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), *map(str, args)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    from safetensors.torch import load_file

    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= PROCESS_TOLERANCE, name


@pytest.fixture(scope="module")
def accumulated(tiny, examples, tmp_path_factory):
    """One process accumulating two micro-batches per step, uninterrupted: the reference run."""
    out = tmp_path_factory.mktemp("accumulated") / "one"
    return out, train(config(tiny, out, grad_accum=2, **GLOBAL_4), examples, show_progress=False)


def test_two_launched_processes_train_the_adapter_of_one_process_accumulating(tiny, examples, accumulated, tmp_path):
    """2 processes x --grad-accum 1 = 1 process x --grad-accum 2, LoRA dropout (0.05) included."""
    reference, single = accumulated
    result = launch("-m", "funnelqa", "train-questioner", examples, "--out", tmp_path / "ddp",
                    *flags(tiny, grad_accum=1, **GLOBAL_4))
    assert result.returncode == 0, result.stderr[-3000:]
    # Only the main process reports: one card on stdout, one progress line per step on stderr.
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    card = json.loads(lines[0])
    assert result.stderr.count("train: step 1/4 ") == 1
    assert card["processes"] == 2 and card["parts"] == [{"from_step": 0, "processes": 2}]
    assert card["effective_batch_size"] == single["effective_batch_size"] == 4
    assert card["steps"] == 4 and card["epochs"] > 1
    # Only the main process writes: no second copy, no partial file, no checkpoint left behind.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ADAPTER_FILES
    assert card["train_tokens"] == single["train_tokens"]
    assert card["eval_loss_before"] == pytest.approx(single["eval_loss_before"], rel=1e-6)
    assert card["eval_loss_after"] == pytest.approx(single["eval_loss_after"], rel=1e-5)
    assert card["train_loss_final"] == pytest.approx(single["train_loss_final"], rel=1e-5)
    assert_same_adapter(tmp_path / "ddp", reference)


def test_the_shipped_accelerate_configs_are_what_their_names_say():
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = {path.stem: load_config_from_file(str(path)) for path in sorted(CPU_2PROC.parent.glob("*.yaml"))}
    assert {name: (c.distributed_type.value, c.num_processes) for name, c in loaded.items()} == {
        "cpu-2proc": ("MULTI_GPU", 2), "multi-gpu-ddp": ("MULTI_GPU", 2), "one-gpu": ("NO", 1),
    }


def test_sharded_training_is_refused(tiny, examples, tmp_path, monkeypatch):
    """FSDP cannot form on a CPU, so accelerate is made to report it."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(UsageError, match="FSDP is not supported.*multi-gpu-ddp.yaml"):
        Trainer(config(tiny, tmp_path / "q"), examples)


def test_a_checkpoint_resumes_on_another_process_count_that_keeps_the_global_batch(tiny, examples, accumulated, tmp_path):
    reference, _ = accumulated

    # Two processes checkpoint at step 2 and crash after step 3; one process, accumulating two, finishes.
    options = config(tiny, tmp_path / "from2", grad_accum=1, **GLOBAL_4).options()
    result = launch(REPO / "tests" / "train_until.py", examples, 3, json.dumps(options))
    assert result.returncode != 0 and "stopped after step 3" in result.stderr
    checkpoint = latest_checkpoint(tmp_path / "from2")
    assert checkpoint.name == "step-0000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adapter.pt", "optimizer.pt", "scheduler.pt", "state.json"]
    card = train(config(tiny, tmp_path / "from2", grad_accum=2, resume=True, **GLOBAL_4), examples, show_progress=False)
    assert card["resumed_from_step"] == 2 and card["processes"] == 1
    assert card["parts"] == [{"from_step": 0, "processes": 2}, {"from_step": 2, "processes": 1}]
    assert_same_adapter(tmp_path / "from2", reference)

    # One process checkpoints at step 2 and is killed after step 3; two processes finish.
    def kill_after_step_3(report):
        if report.step == 3:
            raise Killed

    with pytest.raises(Killed):
        Trainer(config(tiny, tmp_path / "from1", grad_accum=2, **GLOBAL_4), examples).run(
            on_step=kill_after_step_3, show_progress=False
        )
    # Another global batch would train other steps: refused, in one line.
    refused = invoke("train-questioner", examples, "--out", tmp_path / "from1", *flags(tiny, grad_accum=1, resume=True, **GLOBAL_4))
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines() == [
        f"funnelqa: error: cannot resume {latest_checkpoint(tmp_path / 'from1')}: options differ "
        "(grad_accum x processes: checkpoint has 2 x 1 = 2, now 1 x 1 = 1)"
    ]
    result = launch("-m", "funnelqa", "train-questioner", examples, "--out", tmp_path / "from1",
                    *flags(tiny, grad_accum=1, resume=True, **GLOBAL_4))
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads(result.stdout)
    assert card["parts"] == [{"from_step": 0, "processes": 1}, {"from_step": 2, "processes": 2}]
    assert sorted(p.name for p in (tmp_path / "from1").iterdir()) == ADAPTER_FILES
    assert_same_adapter(tmp_path / "from1", reference)


# ---- the command line ----

def invoke(*args: str, input: str | None = None):
    from typer.testing import CliRunner

    from funnelqa.cli import app

    return CliRunner().invoke(app, list(map(str, args)), input=input)


def test_cli_trains_from_stdin_and_prints_the_run_card_as_one_json_line(tiny, examples, tmp_path):
    result = invoke(
        "train-questioner", "-", "--out", tmp_path / "q", "--base", f"hf:{tiny}", "--profile-form", "answers",
        "--max-steps", "2", "--batch-size", "4", "--save-every", "0", input=examples.read_text(),
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    card = json.loads(lines[0])
    assert card["profile_form"] == "answers" and card["steps"] == 2 and card["layout"] == "steps"
    assert card["data"] == {"source": "<stdin>", "sha256": read_examples(examples, "questioner").sha256}
    assert card["options"]["lora_r"] == 16 and card["options"]["lr"] == 1e-3


@pytest.mark.parametrize(
    "command, make_input, message",
    [
        ("train-questioner", lambda tmp: tmp / "missing.jsonl", "missing.jsonl: no such file"),
        ("train-questioner",
         lambda tmp: write_jsonl(tmp / "sim.jsonl", [e for e in corrupt_output(2) if e["role"] == "simulator"]),
         "holds no questioner examples"),
        ("train-simulator",
         lambda tmp: write_jsonl(tmp / "q.jsonl", [e for e in corrupt_output(2) if e["role"] == "questioner"]),
         "holds no simulator examples"),
    ],
)
def test_cli_bad_input_gives_one_error_line_and_a_nonzero_exit(command, make_input, message, tmp_path, tiny):
    result = invoke(command, make_input(tmp_path), "--out", tmp_path / "out", "--base", f"hf:{tiny}")
    assert result.exit_code == 2
    assert result.stdout == ""
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("funnelqa: error:") and message in errors[0]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_cli_rejects_bad_options_before_loading_anything(tmp_path, examples):
    result = invoke("train-questioner", examples, "--out", tmp_path / "o", "--profile-form", "essay")
    assert result.exit_code == 2 and "--profile-form must be one of answers, qa" in result.stderr
    result = invoke("train-simulator", examples, "--out", tmp_path / "o", "--base", "nowhere:x")
    assert result.exit_code == 2 and "neither local" in result.stderr


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lora_r", 0, "--lora-r must be in the range x>=1, got 0"),
        ("lr", 0.0, "--lr must be in the range x>0.0, got 0.0"),
        ("eval_fraction", 0.95, "--eval-fraction must be in the range 0.0<=x<=0.9, got 0.95"),
        ("schedule", "step", "--schedule must be one of cosine, linear, constant, not 'step'"),
    ],
)
def test_config_checks_the_bounds_for_library_callers_too(option, value, message, tmp_path):
    with pytest.raises(UsageError, match=re.escape(message)):
        TrainConfig(role="simulator", out=tmp_path, **{option: value})


def test_cli_out_of_range_option_gives_one_error_line(tmp_path, examples):
    result = invoke("train-simulator", examples, "--out", tmp_path / "o", "--lora-dropout", "1.5")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["funnelqa: error: --lora-dropout must be in the range 0.0<=x<=0.99, got 1.5"]


def test_a_resumed_run_may_change_only_what_changes_no_step(tmp_path):
    saved = TrainConfig(role="questioner", out=tmp_path / "a").options()
    changed = TrainConfig(role="questioner", out=tmp_path / "b", eval_every=5, save_every=7, resume=True,
                          gradient_checkpointing=True)
    assert changed.resume_mismatches(saved) == []
    assert TrainConfig(role="questioner", out=tmp_path, seed=1).resume_mismatches(saved) == ["seed: checkpoint has 0, now 1"]
    # --grad-accum may change with the number of processes, as long as each step keeps its micro-batches.
    two = TrainConfig(role="questioner", out=tmp_path, grad_accum=2).options()
    assert TrainConfig(role="questioner", out=tmp_path, grad_accum=1).resume_mismatches(two, 1, 2) == []
    assert TrainConfig(role="questioner", out=tmp_path, grad_accum=4).resume_mismatches(two, 2, 1) == []
    assert TrainConfig(role="questioner", out=tmp_path, grad_accum=2).resume_mismatches(two, 1, 2) == [
        "grad_accum x processes: checkpoint has 2 x 1 = 2, now 2 x 2 = 4"
    ]


def test_gradient_checkpointing_recomputes_the_same_gradients(tiny, examples, tmp_path):
    from safetensors.torch import load_file

    options = dict(max_steps=3, eval_fraction=0.0)
    train(config(tiny, tmp_path / "plain", **options), examples, show_progress=False)
    checkpointed = Trainer(config(tiny, tmp_path / "gc", gradient_checkpointing=True, **options), examples)
    base = checkpointed.model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    checkpointed.run(show_progress=False)
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    recomputed = load_file(tmp_path / "gc" / "adapter_model.safetensors")
    for name in plain:
        assert (plain[name] - recomputed[name]).abs().max() < 1e-5, name


# ---- training and inference see the same tokens ----

def test_simulate_prompts_are_the_training_conversations_token_for_token(tiny, tmp_path):
    """At turn t, the questioner's and the simulator's prompts in `simulate` are the tokens that
    precede target t in the training conversation of that user."""
    from funnelqa.backends import BackendOptions, ModelSpec, load_backend
    from funnelqa.questioners import LLMQuestioner
    from funnelqa.interview import Interview
    from funnelqa.simulate import UserSimulator

    lines = [e for e in corrupt_output(1) if not e.get("negative")]
    backend = load_backend(ModelSpec.parse(f"hf:{tiny}"), BackendOptions(device="cpu", dtype="float32"))
    tokenizer = backend.tokenizer
    profile = lines[-1]["profile_tags"]
    questions = [(q, t["content"], [t["tag"]]) for (q, _), t in zip(QUESTIONS, profile)]
    record = {"id": "u0", "tags": profile,
              "questions": [{"question": q, "answer": a, "tags": tags} for q, a, tags in questions]}
    for role, ask in (("questioner", LLMQuestioner(backend, "qa")), ("simulator", UserSimulator(backend))):
        data = read_examples(write_jsonl(tmp_path / f"{role}.jsonl", lines), role)
        chat, = encode_examples(tokenizer, data, role, "qa" if role == "questioner" else None, 4096, "conversation")[0]
        for t in range(len(questions)):
            interview = Interview(record)
            for q, a, tags in questions[:t]:
                interview.add_turn(q, a, tags, raw=None)
            request = ask.request(interview) if role == "questioner" else ask.request(interview, questions[t][0])
            prompt = backend.encode(request)
            assert prompt == list(chat.input_ids[: chat.targets[t][0]]), (role, t)
    backend.close()
