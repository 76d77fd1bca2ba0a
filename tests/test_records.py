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
