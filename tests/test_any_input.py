"""Any input, any script (issue 10): bad bytes, non-Latin text, odd model output, honest resume,
prompts beyond the context, unscorable sessions and credentials in URLs, beyond the field cases."""

import json
import subprocess
from pathlib import Path

import pytest

from funnelqa import metrics, parsing, records, render
from funnelqa.backends import BackendOptions, ModelSpec, Request, answer_status, load_backend
from funnelqa.cache import cache_key
from funnelqa.errors import InputError, OutputInUse
from funnelqa.forward import InvalidOutput, accept_questions, accept_rank, accept_structure
from funnelqa.redact import redact
from tests.conftest import funnelqa_executable, run_cli

TAGS = [{"tag": "Genre", "content": "The user enjoys crime films."}, {"tag": "Era", "content": "The user prefers the 1940s."}]
FORWARD = {"id": "u1", "tags": TAGS, "questions": [
    {"question": "What kinds of films do you enjoy?", "answer": "Crime films.", "tags": ["Genre"]},
    {"question": "Which decade?", "answer": "The forties.", "tags": ["Era"]},
]}


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def teacher(tmp_path: Path, response=None) -> str:
    script = tmp_path / "teacher.json"
    script.write_text(json.dumps([{"response": response or {"tags": TAGS}}]))
    return f"fake:{script}"


# ---- 1. bytes and encodings ----

SESSION = {"id": "u1", "turns": [{"question": "Q?", "answer": "Crime.", "tags": ["Genre"], "answered": True}],
           "elicited": TAGS[:1], "target": TAGS}


@pytest.mark.parametrize("command, first", [(["corrupt"], FORWARD), (["score"], SESSION),
                                            (["simulate", "-q", "oracle", "-s", "fake:x"], FORWARD)])
def test_invalid_utf8_through_stdin_is_one_line_in_every_command(command, first):
    data = json.dumps(first).encode() + b"\n" + b'{"id": "u2", "profile": "Mis\xe9rables"}\n'
    argv = [funnelqa_executable(), command[0], "-", *command[1:]]
    result = subprocess.run(argv, input=data, capture_output=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode().strip().splitlines()[-1] == "funnelqa: error: <stdin>:2: not valid UTF-8 (byte 0xe9 at byte 29 of the line)"
    assert result.stdout == b""


def test_a_bom_is_accepted_from_stdin_and_by_corrupt(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(FORWARD).encode() + b"\n")
    assert run_cli("corrupt", path).returncode == 0
    piped = subprocess.run([funnelqa_executable(), "corrupt", "-"], input=path.read_bytes(), capture_output=True)
    assert piped.returncode == 0 and piped.stdout


def test_lone_surrogates_never_crash_the_cache_or_the_writer(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "u1", "profile": "I love \\ud83d films"}\n', encoding="utf-8")  # an emoji cut in half
    [record] = records.load_records(path)
    assert record["profile"] == "I love \ufffd films"
    cache_key("m", {"prompt": "half \ud83d"})  # no UnicodeEncodeError
    assert records.dumps({"id": "x", "text": "a\udc80b"}) == '{"id": "x", "text": "a\ufffdb"}'
    # Through a stage with the on-disk cache, whose prompts hold the input's text.
    assert run_cli("structure", path, "--model", teacher(tmp_path), "--out", tmp_path / "c.jsonl").returncode == 0
    # A model answer that itself holds one reaches the cache and the writer.
    half = teacher(tmp_path, {"tags": [{"tag": "Genre", "content": "crime \ud83d films"}]})
    result = run_cli("structure", path, "--model", half, "--out", tmp_path / "s.jsonl")
    assert result.returncode == 0, result.stderr
    assert records.load_records(tmp_path / "s.jsonl")[0]["tags"][0]["content"] == "crime \ufffd films"


def test_pretty_printed_json_and_one_line_arrays_are_named(tmp_path):
    pretty = tmp_path / "p.json"
    pretty.write_text(json.dumps({"id": "u1", "profile": "x"}, indent=2))
    with pytest.raises(InputError, match="pretty-printed JSON, not JSONL"):
        records.load_records(pretty, on_invalid=lambda e: None)
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"id": "u1", "profile": "x"}]) + "\n")
    with pytest.raises(InputError, match="holds a JSON array, not JSONL"):
        records.load_records(array, on_invalid=lambda e: None)


# ---- 2. text beyond the Latin script ----

@pytest.mark.parametrize("names", [["Жанр", "Эпоха"], ["शैली", "युग"], ["Είδος", "Εποχή"], ["ジャンル", "苦手なジャンル"]])
def test_tag_names_in_any_script_match_and_do_not_collide(names):
    tags = [{"tag": name, "content": "x"} for name in names]
    assert parsing.match_tags([names[1].upper(), names[0] + ":"], tags) == [names[1], names[0]]
    assert len({parsing._normalise(name) for name in names}) == len(names)


def test_answers_in_any_script_count_as_answers():
    tags = [{"tag": "Жанр", "content": "Пользователь любит старые детективы."}]
    assert parsing.parse_simulator('{"answer": "Я люблю детективы.", "tags": ["Жанр"]}', tags) == ("Я люблю детективы.", ["Жанр"])
    # Prose with no tag named: the tag whose content it repeats is revealed.
    assert parsing.parse_simulator("Старые детективы, конечно.", tags) == ("Старые детективы, конечно.", ["Жанр"])
    assert not parsing.is_no_preference("Да")
    assert parsing.is_no_preference("No preference")


def test_unicode_rouge_scores_cjk_and_leaves_latin_numbers_equal_to_evaluate():
    cache = metrics.RougeCache()
    assert cache.score("時代劇が好きです", "時代劇が好きです")["rouge1"].fmeasure == 1.0
    assert 0 < cache.score("時代劇が好き", "時代劇が好きです")["rougeL"].fmeasure < 1
    latin = (["the user likes crime films", "café noir"], ["the user enjoys old crime films", "café au lait"])
    assert metrics.rouge(*latin, cache=metrics.RougeCache(tokenizer="auto")) == metrics.rouge(*latin, cache=metrics.RougeCache(tokenizer="default"))
    with pytest.raises(ValueError, match="unknown ROUGE tokenizer"):
        metrics.RougeCache(tokenizer="nltk")


# ---- 3. model output as models write it ----

@pytest.mark.parametrize("text, question", [
    ("<think>Maybe ask about actors? No.</think>\nWhat decade do you prefer?", "What decade do you prefer?"),
    ("Ask about actors? Hmm.</think>Which era do you like?", "Which era do you like?"),
    ("Have you seen St. Elmo's Fire or other Brat Pack films?", "Have you seen St. Elmo's Fire or other Brat Pack films?"),
    ("Do you like books by J. R. R. Tolkien?", "Do you like books by J. R. R. Tolkien?"),
    ("Did you like Star Wars: Episode IV?", "Did you like Star Wars: Episode IV?"),
    ("Great, thanks! What genres do you like?", "What genres do you like?"),
    ("Here is my next question: What genres do you like?", "What genres do you like?"),
    ("Отлично! Какие фильмы вам нравятся?", "Какие фильмы вам нравятся?"),
    ("どんな映画が好きですか？", "どんな映画が好きですか？"),
])
def test_questions_as_models_write_them(text, question):
    assert parsing.parse_question(text) == question


def test_a_reasoning_block_is_skipped_in_simulator_answers_and_json():
    text = '<think>{"answer": "Horror", "tags": ["Genre"]}</think>{"answer": "Crime films", "tags": ["Genre"]}'
    assert parsing.parse_simulator(text, TAGS) == ("Crime films", ["Genre"])
    assert parsing.extract_json('<think>draft: {"a": 1}</think> {"a": 2}') == {"a": 2}


@pytest.mark.parametrize("answer", [
    {"tags": [{"tag": None, "content": "x"}]},
    {"tags": [{"tag": "Genre", "content": ["Drama", "Comedy"]}]},
    {"tags": [{"tag": "Genre", "content": 3}]},
    {"tags": {"Genre": None}},
])
def test_structure_rejects_values_of_the_wrong_type(answer):
    with pytest.raises(InvalidOutput):
        accept_structure({"id": "u1", "profile": "x"}, json.dumps(answer))


def test_rank_and_questions_reject_values_of_the_wrong_type():
    with pytest.raises(InvalidOutput):
        accept_rank(FORWARD, json.dumps({"ranking": ["Genre", None]}))
    for item in ({"question": None, "answer": "a", "tags": ["Genre"]}, {"question": "Q?", "answer": ["a"], "tags": ["Genre"]},
                 {"question": "Q?", "answer": "a", "tags": [None]}):
        with pytest.raises(InvalidOutput):
            accept_questions(FORWARD, json.dumps({"questions": [item]}))
    # The simulator never turns a null tag or a list answer into the strings "None" or "['Drama']".
    assert parsing.parse_simulator('{"answer": ["Drama"], "tags": [null]}', TAGS) == (render.NO_PREFERENCE, [])


def test_a_wrongly_typed_answer_is_asked_again(tmp_path):
    script = tmp_path / "t.json"
    script.write_text(json.dumps([{"responses": [{"tags": [{"tag": None, "content": ["a"]}]}, {"tags": TAGS}]}]))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "u1", "profile": "I like old crime films."}) + "\n")
    result = run_cli("structure", path, "--model", f"fake:{script}", "--no-cache")
    assert result.returncode == 0, result.stderr
    assert jsonl(result.stdout)[0]["tags"] == TAGS and "1 re-asks" in result.stderr


# ---- 4. output files and resume ----

def _profiles(path: Path, n: int, text: str = "likes noir") -> Path:
    path.write_text("".join(json.dumps({"id": f"u{i}", "profile": f"{text} {i}"}) + "\n" for i in range(n)))
    return path


def test_resume_redoes_records_whose_input_changed_and_drops_stale_ones(tmp_path):
    out = tmp_path / "s.jsonl"
    killed = records.RecordWriter(out)
    for record in records.load_records(_profiles(tmp_path / "old.jsonl", 40, "old")):
        killed.is_done(record)
        killed.write({**record, "tags": TAGS})
        killed.write({**record, "tags": TAGS})  # a duplicate line must not reach the output
    killed.abandon()
    changed = _profiles(tmp_path / "new.jsonl", 20, "new")
    result = run_cli("structure", changed, "--model", teacher(tmp_path), "--out", out, "--no-cache")
    assert result.returncode == 0, result.stderr
    written = records.load_records(out)
    assert [r["id"] for r in written] == [f"u{i}" for i in range(20)]
    assert all(r["profile"].startswith("new") for r in written)
    assert "0 resumed" in result.stderr
    again = run_cli("structure", changed, "--model", teacher(tmp_path), "--out", out, "--no-cache")
    assert again.returncode == 0 and records.load_records(out) == written


def test_a_second_writer_of_the_same_out_refuses(tmp_path):
    out = tmp_path / "s.jsonl"
    with records.RecordWriter(out):
        with pytest.raises(OutputInUse, match="another funnelqa process is writing"):
            records.RecordWriter(out)
        result = run_cli("structure", _profiles(tmp_path / "p.jsonl", 2), "--model", teacher(tmp_path), "--out", out)
        assert result.returncode == 5
        assert len(result.stderr.strip().splitlines()) == 1 and "another funnelqa process" in result.stderr
    assert not Path(str(out) + ".lock").exists()


def test_an_input_error_before_any_work_leaves_no_partial(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": "u1", "profile": "Mis\xe9rables"}\n')
    out = tmp_path / "s.jsonl"
    result = run_cli("structure", path, "--model", teacher(tmp_path), "--out", out)
    assert result.returncode == 2
    assert list(tmp_path.glob("s.jsonl*")) == []
    # --skip-invalid that skipped every line: nothing done is a failure too.
    skipped = run_cli("structure", path, "--model", teacher(tmp_path), "--out", out, "--skip-invalid")
    assert skipped.returncode == 2 and "every line was invalid (1 skipped)" in skipped.stderr
    assert list(tmp_path.glob("s.jsonl*")) == []


# ---- 5. sizes the model cannot take ----

def test_a_prompt_beyond_the_context_fails_alone_before_generating(tmp_path):
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 48
    (model / "config.json").write_text(json.dumps(config))
    backend = load_backend(ModelSpec.parse(f"hf:{model}"), BackendOptions(device="cpu", dtype="float32"))
    long, short = Request.chat(None, "crime films " * 40, max_tokens=3), Request.chat(None, "hi", max_tokens=3)
    answers = backend.generate([long, short, long])
    finish, detail = answer_status(answers[0])
    assert finish == "failed" and "more than the model's context of 48 tokens" in detail
    assert answer_status(answers[2])[0] == "failed"
    assert answer_status(answers[1])[0] != "failed" and answers[1]


# ---- 6. sessions score cannot score ----

def test_a_session_with_an_empty_target_is_an_input_error(tmp_path):
    session = {"id": "s1", "turns": [], "elicited": [], "target": []}
    path = tmp_path / "sessions.jsonl"
    path.write_text(json.dumps(session) + "\n")
    result = run_cli("score", path)
    assert result.returncode == 2
    assert f"{path}:1: field 'target' is empty" in result.stderr


# ---- 7. secrets in any form ----

@pytest.mark.parametrize("text, shown", [
    ("openai:m@http://user:sk-SECRET@host:8000/v1", "openai:m@http://***@host:8000/v1"),
    ("at https://sk-SECRET@host/v1 (refused)", "at https://***@host/v1 (refused)"),
    ("https://host/v1?key=SECRET&x=1", "https://host/v1?key=***&x=1"),
    ("hf:/models/base+runs/q", "hf:/models/base+runs/q"),
])
def test_credentials_in_urls_are_redacted(text, shown):
    assert redact(text) == shown


def test_a_key_in_a_base_url_is_in_no_spec_cache_id_or_error_line(tmp_path):
    backend = load_backend(ModelSpec.parse("openai:m@http://user:sk-SECRET@127.0.0.1:9/v1"), BackendOptions(timeout=0.2, max_retries=0))
    assert "SECRET" not in backend.spec and "SECRET" not in backend.cache_id
    result = run_cli("structure", _profiles(tmp_path / "p.jsonl", 1), "--model",
                     "openai:m@http://user:sk-SECRET@127.0.0.1:9/v1", "--timeout", "0.2")
    assert result.returncode != 0 and "SECRET" not in result.stderr and "***@127.0.0.1:9" in result.stderr


@pytest.mark.parametrize("line, message", [
    ("[" * 100000, ":1: JSON nested too deeply"),
    ('{"id": "a", "profile": "x\x00y"}', ":1: malformed JSON (Invalid control character at column 26)"),
])
def test_pathological_lines_are_input_errors_not_tracebacks(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        records.load_records(path)
