import json

import pytest

from funnelqa import records
from funnelqa.errors import InputError


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_bad_lines_name_file_and_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", '{"id": "a", "profile": "likes noir"}', "", '{"id": "b", "profile": ')
    reader = records.read_records(path, records.check_profile)
    assert next(reader)["id"] == "a"
    with pytest.raises(InputError) as caught:
        next(reader)
    assert str(caught.value).startswith(f"{path}:3: malformed JSON")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"profile": "x"}', "missing field 'id'"),
        ('{"id": "a"}', "missing field 'profile'"),
        ('{"id": "a", "profile": "   "}', "field 'profile' is empty"),
        ('["a"]', "expected a JSON object"),
    ],
)
def test_contract_violations(tmp_path, line, message):
    path = write_lines(tmp_path / "p.jsonl", line)
    with pytest.raises(InputError, match=message):
        list(records.read_records(path, records.check_profile))


GOOD_A, GOOD_B = b'{"id": "a", "profile": "x"}', b'{"id": "b", "profile": "y"}'
BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(
    "data, outcome",
    [
        (BOM + GOOD_A + b"\r\n\r\n \t\n" + GOOD_B, ["a", "b"]),  # an editor's BOM, CRLF, blank lines
        (BOM + b"\n" + GOOD_A + b"\n", ["a"]),
        # jsonlines alone would drop a BOM or RS at the start of any line: only the file's first BOM goes.
        (GOOD_A + b"\n" + BOM + GOOD_B + b"\n", ":2: malformed JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1)"),
        (BOM + BOM + GOOD_A + b"\n", ":1: malformed JSON (Unexpected UTF-8 BOM"),
        (GOOD_A + b"\n\x1e" + GOOD_B + b"\n", ":2: malformed JSON (Expecting value at column 1)"),
        (GOOD_A + b"\n" + BOM + b'{"id": "b", "profile": "\xe9"}\n', ":2: not valid UTF-8 (byte 0xe9 at byte 28 of the line)"),
        (GOOD_A + b'\n{"id": "b", "profile": \r\n', ":2: malformed JSON (Expecting value at column 24)"),
        (GOOD_A + b"\nnull\n", ":2: expected a JSON object, got NoneType"),
        (b'{"id": "a", "n": ' + b"9" * 5000 + b"}\n", ":1: Exceeds the limit (4300 digits)"),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: JSON nested too deeply"),
    ],
)
def test_odd_bytes_read_as_they_always_did(tmp_path, data, outcome):
    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    if isinstance(outcome, list):
        assert [r["id"] for r in records.read_records(path)] == outcome
    else:
        with pytest.raises(InputError) as caught:
            list(records.read_records(path))
        assert str(caught.value).startswith(f"{path}{outcome}")


def test_duplicate_ids_and_skip_invalid(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        '{"id": "a", "profile": "x"}',
        '{"id": "a", "profile": "y"}',
        '{"id": "b", "profile": "z"}',
    )
    with pytest.raises(InputError, match=r":2: duplicate id 'a'"):
        list(records.read_records(path, records.check_profile))
    skipped = []
    kept = list(records.read_records(path, records.check_profile, on_invalid=skipped.append))
    assert [r["id"] for r in kept] == ["a", "b"]
    assert skipped[0].line == 2


def test_records_with_upstream_errors_pass_validation(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", json.dumps({"id": "a", "profile": "x", "error": {"stage": "structure"}}))
    assert list(records.read_records(path, records.check_tags))[0]["error"]["stage"] == "structure"


def test_questions_must_reveal_existing_tags(tmp_path):
    record = {"id": "a", "tags": [{"tag": "Genre", "content": "likes noir"}],
              "questions": [{"question": "Q?", "answer": "A", "tags": ["Era"]}]}
    with pytest.raises(ValueError, match="lacks"):
        records.check_questions(record)


def test_writer_is_atomic_and_resumes(tmp_path):
    out = tmp_path / "out.jsonl"
    writer = records.RecordWriter(out)
    assert not writer.is_done({"id": "a"})
    writer.write({"id": "a"})
    writer.abandon()  # killed: no output yet, the partial file stays
    assert not out.exists()
    with open(writer.partial_path, "a") as handle:
        handle.write('{"id": "b", "cut sho')  # the kill cut the last line short
    resumed = records.RecordWriter(out)
    assert set(resumed.done) == {"a"}
    assert resumed.is_done({"id": "a"}) and not resumed.is_done({"id": "b"})
    resumed.write({"id": "b"})
    resumed.commit()
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]
    assert not resumed.partial_path.exists()
