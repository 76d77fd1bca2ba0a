"""`funnelqa export`: the trainer's sequences as {"messages": [...]} records, read back token for token."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from funnelqa.chat_template import encode_chat
from funnelqa.corrupt import corrupt
from funnelqa.errors import InputError, UsageError
from funnelqa.records import load_records
from funnelqa.render import NO_PREFERENCE
from funnelqa.training.examples import IGNORE_INDEX, encode_examples, read_examples, resolve_layout
from funnelqa.training.export import export_file
from tests.conftest import EXAMPLES, REPO, run_cli
from tests.tiny import build_tokenizer

SEED = 5  # not the default, so a test would see the seed ignored
CASES = [  # (role, --profile-form, --layout)
    ("questioner", None, "auto"),
    ("questioner", "answers", "auto"),
    ("questioner", "qa", "steps"),
    ("simulator", None, "auto"),
    ("simulator", None, "steps"),
]


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """Real corrupt output of six example users (two unanswerable questions each)."""
    forward = load_records(EXAMPLES / "forward.jsonl")[:6]
    path = tmp_path_factory.mktemp("export") / "examples.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in corrupt(forward, seed=0)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_back(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(token ids, labels) of an exported record, as a fine-tuner honouring "weight" trains it."""
    messages = record["messages"]
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["weight"] == 1]
    chat = encode_chat(tokenizer, messages, generation_prompt=False, targets=trained)
    labels = [IGNORE_INDEX] * len(chat.input_ids)
    for start, end in chat.targets:
        labels[start:end] = chat.input_ids[start:end]
    return list(chat.input_ids), labels


@pytest.mark.parametrize(("role", "form", "layout"), CASES)
def test_read_back_equals_what_the_trainer_builds(examples, tokenizer, tmp_path, role, form, layout):
    out = tmp_path / "export.jsonl"
    summary = export_file(examples, out, role=role, profile_form=form, layout=layout, seed=SEED)
    records = read_jsonl(out)
    # The trainer's own path, as train-questioner / train-simulator take it (max length: no windows).
    trainer_form = (form or "qa") if role == "questioner" else None
    resolved = resolve_layout(role, trainer_form, layout)
    encoded, stats = encode_examples(tokenizer, read_examples(examples, role), role, trainer_form, 10**6, resolved, SEED)

    assert summary.layout == resolved == stats.layout and summary.records == len(records) == len(encoded) > 0
    for record, sequence in zip(records, encoded):
        assert (record["id"], record["role"], record["profile_form"], record["layout"]) == (
            sequence.user, role, trainer_form, resolved)
        ids, labels = read_back(tokenizer, record)
        assert ids == list(sequence.input_ids)
        assert labels == sequence.labels()
        assert all(("weight" in m) == (m["role"] == "assistant") for m in record["messages"])
        assert {m["weight"] for m in record["messages"] if m["role"] == "assistant"} <= {0, 1}
    if resolved == "steps":
        assert [r["step"] for r in records if "step" in r] == [
            e["step"] for e in read_examples(examples, role).examples if "step" in e]


def test_unanswerable_questioner_turns_are_context_only(examples, tmp_path):
    out = tmp_path / "q.jsonl"
    summary = export_file(examples, out, role="questioner", seed=SEED)
    negatives = read_examples(examples, "questioner").negatives
    for record in read_jsonl(out):
        messages = record["messages"]
        untrained = {i for i, m in enumerate(messages) if m["role"] == "assistant" and m["weight"] == 0}
        answered_no = {i for i, m in enumerate(messages[:-1])
                       if m["role"] == "assistant" and messages[i + 1]["content"] == NO_PREFERENCE}
        assert untrained == answered_no and len(untrained) == 2
        assert sorted(messages[i]["content"] for i in untrained) == sorted(negatives[record["id"]])
        assert messages[-1]["role"] == "assistant" and messages[-1]["weight"] == 1  # ends on a target
    assert summary.context_turns == 12 and summary.users == 6 and not summary.left_out


def test_bad_requests_and_bad_lines(examples, tmp_path):
    with pytest.raises(UsageError, match="questioner's"):
        export_file(examples, None, role="simulator", profile_form="qa")
    with pytest.raises(UsageError, match="needs --profile-form qa"):
        export_file(examples, None, role="questioner", profile_form="answers", layout="conversation")
    lines = examples.read_text(encoding="utf-8").splitlines()
    broken = json.loads(lines[2])
    del broken["target"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:2], json.dumps(broken), *lines[3:]]) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:3: missing field 'target'"):
        export_file(bad, tmp_path / "never.jsonl", role="questioner")
    assert not (tmp_path / "never.jsonl").exists()


def test_cli_writes_jsonl_only_and_reports_on_stderr(examples, tmp_path):
    result = run_cli("export", examples, "--role", "questioner", "--seed", str(SEED))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 6 and all(r["messages"] for r in records)
    assert result.stderr.strip().startswith("export: 6 questioner conversation records of 6 users")
    library = tmp_path / "library.jsonl"
    export_file(examples, library, role="questioner", seed=SEED)
    assert result.stdout == library.read_text(encoding="utf-8")

    piped = run_cli("export", "-", "--role", "simulator", "--layout", "steps",
                    input=examples.read_text(encoding="utf-8"))
    assert piped.returncode == 0, piped.stderr
    assert len(piped.stdout.splitlines()) == len(read_examples(examples, "simulator").examples)

    refused = run_cli("export", examples, "--role", "simulator", "--profile-form", "answers")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        "funnelqa: error: --profile-form is the questioner's: the simulator always reads the whole profile"]


def test_trl_prepares_the_export_as_the_trainer_does(examples, tmp_path):
    """With trl installed (not a dependency): examples/train_with_trl.py's template and
    assistant_only_loss give trl the token ids and labels train-questioner builds."""
    pytest.importorskip("trl")
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from funnelqa.models import load_tokenizer
    from tests.tiny import make_tiny_model

    spec = importlib.util.spec_from_file_location("train_with_trl", REPO / "examples" / "train_with_trl.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "q.jsonl"
    export_file(examples, out, role="questioner", seed=SEED)
    encoded, _ = encode_examples(load_tokenizer(f"hf:{base}"), read_examples(examples, "questioner"), "questioner",
                                 "qa", 10**6, "conversation", SEED)

    tokenizer = AutoTokenizer.from_pretrained(base)
    dataset = load_dataset("json", data_files=str(out), split="train")
    script.check_template(tokenizer, dataset["messages"])
    tokenizer.chat_template = script.TRAINING_TEMPLATE
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base), train_dataset=dataset, processing_class=tokenizer,
        args=SFTConfig(output_dir=str(tmp_path / "run"), assistant_only_loss=True, max_length=None, bf16=False,
                       report_to="none"),
        peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    prepared = trainer.train_dataset
    assert prepared["id"] == [e.user for e in encoded]
    assert prepared["input_ids"] == [list(e.input_ids) for e in encoded]
    assert prepared["labels"] == [e.labels() for e in encoded]
