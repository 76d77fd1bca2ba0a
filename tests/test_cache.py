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
