import json

import pytest

from funnelqa import forward, records
from funnelqa.backends import BackendOptions, CachedBackend, ModelSpec
from funnelqa.backends.fake import FakeBackend, prompt_text
from funnelqa.cache import LLMCache
from funnelqa.errors import BackendError, InputError
from funnelqa.forward import STAGES, accept_questions, accept_rank, accept_structure, run_forward_stage, InvalidOutput

TAGS = [{"tag": "Genre", "content": "The user likes noir."}, {"tag": "Directors", "content": "The user likes Wilder."}]
RECORD = {"id": "a", "profile": "Loves film noir, especially Billy Wilder.", "tags": TAGS}


def test_structure_accepts_wrapped_bare_and_mapping_forms():
    expected = [{"tag": "Genre", "content": "likes noir"}]
    assert accept_structure(RECORD, '```json\n{"tags": [{"tag": "Genre", "content": "likes noir"}]}\n```')["tags"] == expected
    assert accept_structure(RECORD, 'Sure! [{"tag": "Genre", "content": "likes noir"}]')["tags"] == expected
    assert accept_structure(RECORD, '{"tags": {"Genre": "likes noir"}}')["tags"] == expected
    with pytest.raises(InvalidOutput, match="twice"):
        accept_structure(RECORD, '{"tags": [{"tag": "Genre", "content": "a"}, {"tag": "genre", "content": "b"}]}')
    with pytest.raises(ValueError):
        accept_structure(RECORD, "I cannot do that.")


def test_rank_must_be_a_permutation():
    ranked = accept_rank(RECORD, '{"ranking": ["directors", "Genre"]}')
    assert [t["tag"] for t in ranked["tags"]] == ["Directors", "Genre"]
    with pytest.raises(InvalidOutput, match="leaves out"):
        accept_rank(RECORD, '{"ranking": ["Genre"]}')
    with pytest.raises(InvalidOutput, match="do not exist"):
        accept_rank(RECORD, '{"ranking": ["Genre", "Directors", "Mood"]}')


def test_questions_must_map_to_existing_tags_and_cover_all():
    good = {"questions": [{"question": "What do you like?", "answer": "Noir.", "tags": ["Genre"]},
                          {"question": "Directors?", "answer": "Wilder.", "tags": ["Directors"]}]}
    assert accept_questions(RECORD, json.dumps(good))["questions"][1]["tags"] == ["Directors"]
    unknown = {"questions": [dict(good["questions"][0], tags=["Mood"])] + good["questions"][1:]}
    with pytest.raises(InvalidOutput, match="do not exist"):
        accept_questions(RECORD, json.dumps(unknown))
    with pytest.raises(InvalidOutput, match="no question reveals"):
        accept_questions(RECORD, json.dumps({"questions": good["questions"][:1]}))


def test_invalid_answers_are_retried_with_the_reason_then_written_as_errors(tmp_path):
    answers = {"a": ['{"ranking": ["Genre"]}', '{"ranking": ["Genre", "Directors"]}'], "b": ["nope"] * 5}

    def respond(request):
        user = "a" if "noir" in prompt_text(request) else "b"
        return answers[user].pop(0) if len(answers[user]) > 1 else answers[user][0]

    other = {"id": "b", "profile": "x", "tags": [{"tag": "Mood", "content": "The user likes calm films."}]}
    backend = FakeBackend(respond)
    out = tmp_path / "ranked.jsonl"
    with records.RecordWriter(out) as writer:
        summary = run_forward_stage(STAGES["rank"], [RECORD, other], backend, writer, retries=2)
    written = records.load_records(out)
    assert [r["id"] for r in written] == ["a", "b"]
    assert "error" not in written[0]
    assert written[1]["error"]["stage"] == "rank" and "after 3 attempts" in written[1]["error"]["message"]
    assert (summary.ok, summary.failed) == (1, 1)
    retry_prompt = backend.requests[2].messages[-1]["content"]
    assert "leaves out tags: ['Directors']" in retry_prompt
    assert backend.batches == [2, 2, 1]  # each attempt is one batched call


def test_killed_stage_resumes_without_repeating_finished_records(tmp_path):
    source = [dict(RECORD, id=str(i), tags=[TAGS[0], {"tag": "Directors", "content": f"likes director {i}"}])
              for i in range(6)]
    cache = LLMCache(tmp_path / "cache.sqlite")
    fail_after = {"n": 0}

    def respond(request):
        fail_after["n"] += 1
        if fail_after["n"] > 4:
            raise KeyboardInterrupt  # the process is killed halfway
        return '{"ranking": ["Genre", "Directors"]}'

    out = tmp_path / "ranked.jsonl"
    first = CachedBackend(FakeBackend(respond), cache)
    with pytest.raises(KeyboardInterrupt):
        with records.RecordWriter(out) as writer:
            run_forward_stage(STAGES["rank"], source, first, writer, batch_size=2)
    assert not out.exists()

    calls = []
    second = FakeBackend(lambda r: calls.append(r) or '{"ranking": ["Genre", "Directors"]}')
    with records.RecordWriter(out) as writer:
        summary = run_forward_stage(STAGES["rank"], source, CachedBackend(second, cache), writer, batch_size=2)
    assert summary.resumed == 4 and len(calls) == 2
    assert [r["id"] for r in records.load_records(out)] == [str(i) for i in range(6)]


def test_records_with_upstream_errors_pass_through_untouched():
    failed = {"id": "z", "profile": "p", "error": {"stage": "structure", "message": "m"}}
    backend = FakeBackend(lambda r: pytest.fail("no model call for a failed record"))

    class Collect(list):
        def is_done(self, record):
            return False

        def write(self, record):
            self.append(record)

        def write_many(self, items):
            self.extend(items)

    sink = Collect()
    summary = run_forward_stage(STAGES["rank"], [failed], backend, sink)
    assert sink == [failed] and summary.passed_through == 1


class ClosingBackend(FakeBackend):
    """A fake that counts its closes."""

    closed = 0

    def close(self) -> None:
        self.closed += 1


RANKED = '{"ranking": ["Genre", "Directors"]}'


def _rank_file(tmp_path, monkeypatch, lines, respond):
    """Run `rank` over ``lines`` with a ClosingBackend answering ``respond``; (backend, the run)."""
    backend = ClosingBackend(respond)
    monkeypatch.setattr(forward, "open_backend", lambda *args, **kwargs: backend)
    source = tmp_path / "tagged.jsonl"
    source.write_text("".join(line + "\n" for line in lines))
    return backend, lambda: forward.run_file("rank", source, tmp_path / "ranked.jsonl", ModelSpec.parse("fake"),
                                             options=BackendOptions(batch_size=1))


def test_a_forward_run_closes_its_backend_on_success(tmp_path, monkeypatch):
    backend, run = _rank_file(tmp_path, monkeypatch, [json.dumps(RECORD)], lambda r: RANKED)
    summary = run()
    assert backend.closed == 1 and (summary.ok, summary.failed) == (1, 0)
    assert summary.describe().startswith("rank: 1 ok, 0 failed")


def _interrupt(request):
    raise KeyboardInterrupt


def _backend_down(request):
    raise BackendError("no server")


@pytest.mark.parametrize("lines, respond, error, message", [
    ([json.dumps(RECORD), "not json"], lambda r: RANKED, InputError, "tagged.jsonl:2: malformed JSON"),
    ([json.dumps(RECORD)], _backend_down, BackendError, "no server"),
    ([json.dumps(RECORD)], _interrupt, KeyboardInterrupt, None),
])
def test_a_forward_run_closes_its_backend_when_it_fails(tmp_path, monkeypatch, lines, respond, error, message):
    backend, run = _rank_file(tmp_path, monkeypatch, lines, respond)
    with pytest.raises(error, match=message):
        run()
    assert backend.closed == 1


def test_an_interrupted_forward_run_resumes(tmp_path, monkeypatch):
    lines = [json.dumps(dict(RECORD, id=name)) for name in ("a", "b")]
    answered = []

    def once(request):
        if answered:
            raise KeyboardInterrupt
        answered.append(request)
        return RANKED

    with pytest.raises(KeyboardInterrupt):
        _rank_file(tmp_path, monkeypatch, lines, once)[1]()
    summary = _rank_file(tmp_path, monkeypatch, lines, lambda r: RANKED)[1]()
    assert (summary.resumed, summary.ok) == (1, 1)
    assert [r["id"] for r in records.load_records(tmp_path / "ranked.jsonl")] == ["a", "b"]
