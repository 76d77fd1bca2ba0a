"""The field cases of ../shared/field-cases (issue 10): each input behaves as that folder's README says.

Skipped when ../shared is absent; tests/test_any_input.py covers the same kinds with inputs of its own.
"""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

CASES = REPO.parent / "shared" / "field-cases"
pytestmark = pytest.mark.skipif(not CASES.is_dir(), reason="../shared/field-cases is absent")
TEACHER = f"fake:{CASES / 'structure-teacher.fake.json'}"


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_01_a_byte_order_mark_is_accepted():
    result = run_cli("structure", CASES / "01-bom-profiles.jsonl", "--model", TEACHER, "--no-cache")
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in jsonl(result.stdout)] == ["u1", "u2"]


def test_02_invalid_utf8_is_one_line_from_a_file_and_from_stdin():
    path = CASES / "02-latin1-profile.jsonl"
    result = run_cli("structure", path, "--model", TEACHER, "--no-cache")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"funnelqa: error: {path}:2: not valid UTF-8 (byte 0xe9 at byte 45 of the line)"]
    skipped = run_cli("structure", path, "--model", TEACHER, "--no-cache", "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert [r["id"] for r in jsonl(skipped.stdout)] == ["u1"]
    assert f"{path}:2: not valid UTF-8" in skipped.stderr and "1 invalid input lines skipped" in skipped.stderr
    import subprocess

    from tests.conftest import funnelqa_executable

    piped = subprocess.run([funnelqa_executable(), "structure", "-", "--model", TEACHER, "--no-cache"],
                           input=path.read_bytes(), capture_output=True)
    assert piped.returncode == 2 and piped.stdout == b""
    assert piped.stderr.decode().strip() == "funnelqa: error: <stdin>:2: not valid UTF-8 (byte 0xe9 at byte 45 of the line)"


@pytest.mark.parametrize("skip", [[], ["--skip-invalid"]])
def test_05_a_json_array_is_named_as_such(skip):
    path = CASES / "05-top-level-array.json"
    result = run_cli("structure", path, "--model", TEACHER, "--no-cache", *skip)
    assert result.returncode == 2 and result.stdout == ""
    assert f"funnelqa: error: {path}: holds a JSON array, not JSONL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_06_tag_names_in_japanese_are_ranked():
    result = run_cli("rank", CASES / "06-nonlatin-tag-names.jsonl", "--model",
                     f"fake:{CASES / '06-nonlatin-tag-names.fake.json'}", "--no-cache")
    assert result.returncode == 0, result.stderr
    [record] = jsonl(result.stdout)
    assert "error" not in record
    assert [t["tag"] for t in record["tags"]] == ["ジャンル", "苦手なジャンル", "監督"]


def test_07_identical_non_latin_text_scores_one_and_names_its_tokenizer():
    result = run_cli("score", CASES / "07-nonlatin-rouge-sessions.jsonl")
    assert result.returncode == 0, result.stderr
    [scores] = jsonl(result.stdout)
    assert scores["rouge1"] == scores["rouge2"] == scores["rougeL"] == 1.0
    assert scores["rouge_tokenizer"] == "unicode"
    default = jsonl(run_cli("score", CASES / "07-nonlatin-rouge-sessions.jsonl", "--rouge-tokenizer", "default").stdout)[0]
    assert default["rouge_tokenizer"] == "default" and default["rouge1"] == 0.0  # what evaluate would say


def test_11_the_answer_after_a_reasoning_block_is_used():
    result = run_cli("structure", CASES / "11-think-block-json.jsonl", "--no-cache",
                     "--model", f"fake:{CASES / '11-think-block-json.fake.json'}")
    assert result.returncode == 0, result.stderr
    [record] = jsonl(result.stdout)
    assert record["tags"] == [
        {"tag": "Genre", "content": "The user likes old crime films from the forties."},
        {"tag": "Disliked Genres", "content": "The user avoids horror."},
    ]


def test_13_titles_with_abbreviations_and_colons_keep_questions_whole():
    script = f"fake:{CASES / '13-movielens-title-questions.fake.json'}"
    result = run_cli("simulate", CASES / "13-movielens-title-questions.jsonl", "-q", script, "-s", script,
                     "-T", "1", "--no-cache")
    assert result.returncode == 0, result.stderr
    assert [s["turns"][0]["question"] for s in jsonl(result.stdout)] == [
        "Have you ever watched Mrs. Doubtfire or other family comedies?",
        "Did you enjoy Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb?",
        "Would you watch Alien vs. Predator again?",
    ]


def _tiny_with_context(tmp_path: Path, positions: int) -> Path:
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_18_a_prompt_beyond_the_context_is_an_error_record_naming_both_numbers(tmp_path):
    model = _tiny_with_context(tmp_path, 64)
    result = run_cli("structure", CASES / "18-profile-over-context.jsonl", "--model", f"hf:{model}",
                     "--max-tokens", "4", "--retries", "0", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    [record] = jsonl(result.stdout)
    message = record["error"]["message"]
    assert "more than the model's context of 64 tokens" in message
    prompt_tokens = int(message.split("the prompt is ")[1].split(" tokens")[0])
    assert prompt_tokens > 5000


def test_18_the_other_records_go_on(tmp_path):
    model = _tiny_with_context(tmp_path, 1024)
    inputs = tmp_path / "in.jsonl"
    shutil.copy(CASES / "18-profile-over-context.jsonl", inputs)
    with open(inputs, "a") as handle:
        handle.write(json.dumps({"id": "short", "profile": "I like noir."}) + "\n")
    result = run_cli("structure", inputs, "--model", f"hf:{model}", "--max-tokens", "4", "--retries", "0", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    long, short = jsonl(result.stdout)
    assert "context of 1024 tokens" in long["error"]["message"]
    # The short one was asked (the random model writes no JSON, but it did answer).
    assert "context" not in short["error"]["message"] and short["error"]["output"]
