import json
import os
import subprocess
import sys

import pytest

from funnelqa import records
from tests.conftest import EXAMPLES, REPO, funnelqa_executable, run_cli
from tests.forward_script import forward_rules

COMMANDS = ["structure", "rank", "generate-questions", "corrupt", "train-questioner", "train-simulator", "export", "simulate", "chat", "score"]

RECORDS = [
    {
        "id": f"u{i}",
        "profile": f"User {i} loves {genre} films and avoids musicals; a fan of {director}.",
        "tags": [
            {"tag": "Genre", "content": f"The user loves {genre} films."},
            {"tag": "Disliked Genres", "content": "The user avoids musicals."},
            {"tag": "Directors", "content": f"The user is a fan of {director}."},
        ],
        "questions": [
            {"question": "What kinds of movies do you enjoy?", "answer": f"Mostly {genre}.", "tags": ["Genre"]},
            {"question": "Anything you avoid?", "answer": "Musicals.", "tags": ["Disliked Genres"]},
            {"question": "Any favourite directors?", "answer": f"{director}.", "tags": ["Directors"]},
        ],
    }
    for i, (genre, director) in enumerate([("noir", "Billy Wilder"), ("western", "Sergio Leone"), ("sci-fi", "Denis Villeneuve")])
]


def test_help_lists_every_stage_and_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from funnelqa.cli import app\n"
        f"for args in [['--help']] + [[c, '--help'] for c in {COMMANDS!r}]:\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'google.genai', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    listing = run_cli("--help").stdout
    for command in COMMANDS:
        assert command in listing


def test_forward_pipeline_through_shell_pipes(tmp_path):
    script = tmp_path / "teacher.json"
    script.write_text(json.dumps(forward_rules(RECORDS)))
    profiles = "".join(json.dumps({"id": r["id"], "profile": r["profile"]}) + "\n" for r in RECORDS)
    exe = funnelqa_executable()
    model = f"--model fake:{script}"
    pipeline = f"{exe} structure {model} | {exe} rank {model} - | {exe} generate-questions {model}"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], input=profiles, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    produced = [json.loads(line) for line in result.stdout.splitlines()]
    assert produced == RECORDS
    assert "generate-questions: 3 ok, 0 failed" in result.stderr


def test_examples_forward_file_round_trips_through_the_pipeline(tmp_path):
    forward = EXAMPLES / "forward.jsonl"
    if not forward.exists():
        pytest.skip("examples/forward.jsonl not written yet")
    expected = records.load_records(forward, records.check_questions)
    script = tmp_path / "teacher.json"
    script.write_text(json.dumps(forward_rules(expected)))
    current = EXAMPLES / "profiles.jsonl"
    for stage in ("structure", "rank", "generate-questions"):
        out = tmp_path / f"{stage}.jsonl"
        result = run_cli(stage, current, "--model", f"fake:{script}", "--out", out)
        assert result.returncode == 0, result.stderr
        current = out
    produced = records.load_records(current)
    assert [{k: r[k] for k in ("id", "tags", "questions")} for r in produced] == [
        {k: r[k] for k in ("id", "tags", "questions")} for r in expected
    ]


def test_bad_input_gives_one_line_naming_file_and_line(tmp_path):
    script = tmp_path / "teacher.json"
    script.write_text(json.dumps(forward_rules(RECORDS)))
    lines = json.dumps({"id": "a", "profile": "likes noir"}) + "\n" + '{"id": "b", "profile": \n'
    result = run_cli("structure", "--model", f"fake:{script}", input=lines)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["funnelqa: error: <stdin>:2: malformed JSON (Expecting value at column 24)"]
    assert result.stdout == ""


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "a"}', "missing field 'profile'"),
        ('{"id": "a", "profile": ""}', "field 'profile' is empty"),
    ],
)
def test_missing_field_and_empty_profile(tmp_path, line, message):
    path = tmp_path / "in.jsonl"
    path.write_text(line + "\n")
    script = tmp_path / "teacher.json"
    script.write_text("[]")
    result = run_cli("structure", path, "--model", f"fake:{script}")
    assert result.returncode == 2
    assert f"{path}:1: {message}" in result.stderr and "Traceback" not in result.stderr


def test_duplicate_ids_and_skip_invalid_keep_the_good_records(tmp_path):
    script = tmp_path / "teacher.json"
    script.write_text(json.dumps(forward_rules(RECORDS)))
    path = tmp_path / "in.jsonl"
    rows = [{"id": r["id"], "profile": r["profile"]} for r in RECORDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:1]))
    strict = run_cli("structure", path, "--model", f"fake:{script}", "--out", tmp_path / "s.jsonl")
    assert strict.returncode == 2 and f"{path}:4: duplicate id 'u0'" in strict.stderr
    assert not (tmp_path / "s.jsonl").exists()  # never a half-written output
    lenient = run_cli("structure", path, "--model", f"fake:{script}", "--skip-invalid", "--out", tmp_path / "s.jsonl")
    assert lenient.returncode == 0, lenient.stderr
    assert "1 invalid input lines skipped" in lenient.stderr
    assert [r["id"] for r in records.load_records(tmp_path / "s.jsonl")] == ["u0", "u1", "u2"]


def test_unusable_model_output_is_written_with_an_error_and_counted(tmp_path):
    script = tmp_path / "bad.json"
    script.write_text(json.dumps([{"response": "I am a small model and I like turtles."}]))
    result = run_cli("structure", "--model", f"fake:{script}", "--retries", "1",
                     input=json.dumps({"id": "a", "profile": "likes noir"}) + "\n")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["error"]["stage"] == "structure" and "after 2 attempts" in record["error"]["message"]
    assert "0 ok, 1 failed" in result.stderr


def test_missing_key_or_model_package_says_how_to_fix_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    result = subprocess.run([funnelqa_executable(), "structure", "--model", "gemini:gemini-2.0-flash"],
                            input='{"id": "a", "profile": "p"}\n', capture_output=True, text=True, env=env)
    assert result.returncode == 3
    assert len(result.stderr.strip().splitlines()) == 1 and "GEMINI_API_KEY" in result.stderr
    unknown = run_cli("rank", "--model", "nosuch:thing", input='{"id": "a", "tags": [{"tag": "G", "content": "c"}]}\n')
    assert unknown.returncode == 2 and "unknown model spec 'nosuch:thing'" in unknown.stderr
