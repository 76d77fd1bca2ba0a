from funnelqa.backends import CachedBackend, Request
from funnelqa.backends.fake import FakeBackend
from funnelqa.cache import LLMCache


def test_rerun_is_served_from_cache(tmp_path):
    fake = FakeBackend(lambda r: r.messages[-1]["content"].upper())
    fake.batch_size = 2
    cache = LLMCache(tmp_path / "c.sqlite")
    backend = CachedBackend(fake, cache)
    requests = [Request.chat(None, text) for text in ["a", "b", "a", "c"]]
    assert backend.generate(requests) == ["A", "B", "A", "C"]
    assert backend.calls == 3  # the repeated prompt is asked once
    assert fake.batches == [2, 1]  # and the backend's batch size is respected

    again = CachedBackend(fake, LLMCache(tmp_path / "c.sqlite"))
    assert again.generate(requests) == ["A", "B", "A", "C"]
    assert again.calls == 0 and again.hits == 4


def test_options_are_part_of_the_key(tmp_path):
    fake = FakeBackend(lambda r: str(r.max_tokens))
    backend = CachedBackend(fake, LLMCache(tmp_path / "c.sqlite"))
    assert backend.generate([Request.chat(None, "x", max_tokens=5), Request.chat(None, "x", max_tokens=7)]) == ["5", "7"]


def test_two_scripts_with_different_answers_do_not_share_entries(tmp_path):
    cache = LLMCache(tmp_path / "c.sqlite")
    first = CachedBackend(FakeBackend(lambda r: "one"), cache)
    second = CachedBackend(FakeBackend(lambda r: "two"), cache)
    request = [Request.chat(None, "same prompt")]
    assert first.generate(request) == ["one"]
    assert second.generate(request) == ["two"]


def test_only_complete_answers_are_served_again(tmp_path):
    from funnelqa.backends import Answer

    replies = {"ok": "fine", "cut": Answer('{"ta', "length", "cut"), "blocked": Answer("", "blocked", "SAFETY"),
               "blank": " ", "failed": Answer("", "failed", "HTTP 500")}
    fake = FakeBackend(lambda r: replies[r.messages[-1]["content"]])
    first = CachedBackend(fake, LLMCache(tmp_path / "c.sqlite"))
    requests = [Request.chat(None, name) for name in replies]
    answers = first.generate_each(requests)
    assert [getattr(a, "finish", "stop") for a in answers] == ["stop", "length", "blocked", "stop", "failed"]

    again = CachedBackend(fake, LLMCache(tmp_path / "c.sqlite"))
    again.generate_each(requests)
    assert again.hits == 1 and again.calls == 4
    assert again.refreshed == 3  # cut, blocked and blank were stored with their status; the failure not at all

    again.forget(requests[:1])  # a stage found "fine" unusable
    third = CachedBackend(fake, LLMCache(tmp_path / "c.sqlite"))
    third.generate_each(requests[:1])
    assert third.hits == 0 and third.refreshed == 1


def test_answers_that_arrived_are_cached_before_a_failure_is_raised(tmp_path):
    import pytest

    from funnelqa.backends import Answer
    from funnelqa.errors import BackendError

    fake = FakeBackend(lambda r: Answer("", "failed", "gave up: HTTP 500") if r.messages[-1]["content"] == "b" else "A")
    backend = CachedBackend(fake, LLMCache(tmp_path / "c.sqlite"))
    with pytest.raises(BackendError, match="HTTP 500"):
        backend.generate([Request.chat(None, text) for text in "ab"])
    assert LLMCache(tmp_path / "c.sqlite").lookup(backend._keys([Request.chat(None, "a")]))[0]


def test_a_cache_written_before_statuses_is_upgraded(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, model TEXT, answer TEXT, created REAL)")
    db.executemany("INSERT INTO answers VALUES (?, 'm', ?, 0)", [("k1", "kept"), ("k2", "")])
    db.commit()
    db.close()
    found, stale = LLMCache(path).lookup(["k1", "k2"])
    assert found == {"k1": "kept"} and stale == {"k2"}
