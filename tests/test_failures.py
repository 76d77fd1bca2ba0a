"""Failures stay local and temporary (issue 11): a record whose calls fail for good becomes one
`error` record while the others are written; failures are never served from the cache; error
texts name the finish or block reason and the token budget. Driven through the console script
against loopback servers that answer like the real APIs, faults included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.gemini_server import FakeGeminiServer, Fault, gemini_prompt_text

FIELD_CASES = REPO.parent / "shared" / "field-cases"
MODEL = "gemini:gemini-2.0-flash"
# A structure answer of about 100 tokens (4 characters each in the fake).
TAGS = {"tags": [{"tag": "Genre", "content": "Gritty war films with graphic battle scenes, seen on a big screen."},
                 {"tag": "Era", "content": "Anything from the last fifty years, with long and detailed battle sequences."},
                 {"tag": "Mood", "content": "Serious and tense, never played for laughs, with a strong sense of history."}]}


def field_case(name: str) -> Path:
    path = FIELD_CASES / name
    if not path.exists():
        pytest.skip(f"../shared/field-cases/{name} is absent")
    return path


def write_profiles(path: Path, count: int) -> list[str]:
    ids = [f"u{i}" for i in range(count)]
    path.write_text("".join(json.dumps({"id": i, "profile": f"Profile of {i}: likes war films."}) + "\n" for i in ids))
    return ids


def structure(source, env, *options):
    return run_cli("structure", source, "--model", MODEL, "--concurrency", "4", "--timeout", "5", *options, env=env)


@pytest.fixture
def env(tmp_path):
    return {"GEMINI_API_KEY": "test-key", "FUNNELQA_CACHE_DIR": str(tmp_path / "cache"),
            "FUNNELQA_BACKOFF_BASE": "0.01"}


def by_id(stdout: str) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, stdout.splitlines())}


def test_a_record_failing_for_good_is_one_error_record_and_healthy_answers_are_not_bought_again(tmp_path, env):
    profiles = tmp_path / "profiles.jsonl"
    ids = write_profiles(profiles, 12)
    healthy = False

    def respond(body):
        if "Profile of u5:" in gemini_prompt_text(body) and not healthy:
            return Fault("500")
        return json.dumps(TAGS)

    with FakeGeminiServer(respond) as server:
        env["FUNNELQA_GEMINI_BASE_URL"] = server.url
        first = structure(profiles, env, "--retries", "1")
        assert first.returncode == 0, first.stderr
        out = by_id(first.stdout)
        assert list(out) == ids
        assert [i for i, r in out.items() if "error" in r] == ["u5"]
        assert "gave up after" in out["u5"]["error"]["message"] and "HTTP 500" in out["u5"]["error"]["message"]
        assert all(out[i]["tags"] == TAGS["tags"] for i in ids if i != "u5")
        summary = first.stderr.replace("\n", " ")
        assert "11 ok, 1 failed" in summary and "HTTP retries" in summary
        waits = [line for line in first.stderr.splitlines() if "; retry " in line]
        assert len(waits) == 5 and all("HTTP 500" in line for line in waits)  # each wait, with its reason

        healthy = True
        asked = len(server.requests)
        again = structure(profiles, env)
        assert again.returncode == 0, again.stderr
        assert len(server.requests) == asked + 1  # only the missing answer is bought
        assert all("error" not in r for r in by_id(again.stdout).values())
        assert "1 model calls, 11 from cache" in again.stderr.replace("\n", " ")


def test_a_blocked_answer_is_cached_as_a_failure_and_healed_on_a_healthy_rerun(tmp_path, env):
    profiles = tmp_path / "profiles.jsonl"
    write_profiles(profiles, 3)
    blocked = True

    def respond(body):
        if "Profile of u1:" in gemini_prompt_text(body) and blocked:
            return Fault("safety")
        return json.dumps(TAGS)

    with FakeGeminiServer(respond) as server:
        env["FUNNELQA_GEMINI_BASE_URL"] = server.url
        first = structure(profiles, env)
        assert first.returncode == 0, first.stderr
        error = by_id(first.stdout)["u1"]["error"]["message"]
        assert error.startswith("blocked by the model's safety filter (answer blocked: finishReason SAFETY")
        assert len(server.requests) == 3  # a block is not re-asked

        blocked = False
        again = structure(profiles, env)
        assert again.returncode == 0, again.stderr
        assert by_id(again.stdout)["u1"]["tags"] == TAGS["tags"]
        assert "1 model calls, 2 from cache, 1 cached failures asked again" in again.stderr.replace("\n", " ")


def test_an_unparseable_answer_is_not_served_from_the_cache_again(tmp_path, env):
    profiles = tmp_path / "profiles.jsonl"
    write_profiles(profiles, 2)
    broken = True

    def respond(body):
        return "no JSON here" if broken and "Profile of u0:" in json.dumps(body) else json.dumps(TAGS)

    with FakeGeminiServer(respond) as server:
        env["FUNNELQA_GEMINI_BASE_URL"] = server.url
        first = structure(profiles, env, "--retries", "1")
        assert "error" in by_id(first.stdout)["u0"]
        broken = False
        again = structure(profiles, env, "--retries", "1")
        assert "error" not in by_id(again.stdout)["u0"]
        assert "1 model calls, 1 from cache, 1 cached failures asked again" in again.stderr.replace("\n", " ")


def test_openai_backend_keeps_healthy_records_and_names_no_choices(tmp_path, env):
    from tests.test_openai_backend import FakeOpenAIServer

    profiles = tmp_path / "profiles.jsonl"
    write_profiles(profiles, 6)

    def respond(body):
        prompt = json.dumps(body["messages"])
        if "Profile of u2:" in prompt:
            return Fault("503")
        if "Profile of u4:" in prompt:
            return Fault("no-choices")
        return json.dumps(TAGS)

    with FakeOpenAIServer(respond) as server:
        result = run_cli("structure", profiles, "--model", f"openai:m@{server.url}/v1", "--retries", "1",
                         "--concurrency", "3", env=env)
    assert result.returncode == 0, result.stderr
    out = by_id(result.stdout)
    assert sorted(i for i, r in out.items() if "error" in r) == ["u2", "u4"]
    assert "HTTP 503" in out["u2"]["error"]["message"]
    assert "no choices in the answer" in out["u4"]["error"]["message"]


def test_field_case_09_a_blocked_profile_costs_only_itself_and_no_request_holds_an_empty_part(env):
    case = field_case("09-gemini-empty-retry-part.jsonl")

    def respond(body):
        return Fault("blocked") if "war films" in gemini_prompt_text(body) else json.dumps(TAGS)

    with FakeGeminiServer(respond) as server:
        env["FUNNELQA_GEMINI_BASE_URL"] = server.url
        result = structure(case, env)
        parts = [part["text"] for body in server.requests for content in body["contents"] for part in content["parts"]]
    assert result.returncode == 0, result.stderr
    out = by_id(result.stdout)
    assert out["u2"]["tags"] == TAGS["tags"]
    assert "promptFeedback.blockReason SAFETY" in out["u1"]["error"]["message"]
    assert all(text.strip() for text in parts)


def test_an_empty_answer_is_re_asked_without_an_empty_part(tmp_path, env):
    profiles = tmp_path / "profiles.jsonl"
    write_profiles(profiles, 1)
    answers = iter(["", json.dumps(TAGS)])
    with FakeGeminiServer(lambda body: next(answers)) as server:
        env["FUNNELQA_GEMINI_BASE_URL"] = server.url
        result = structure(profiles, env)
        assert result.returncode == 0, result.stderr
        assert by_id(result.stdout)["u0"]["tags"] == TAGS["tags"]
        assert server.requests[1]["contents"][1]["parts"][0]["text"] == "(empty reply)"


def test_field_case_10_a_max_tokens_cut_is_named_and_re_asked_with_more_room(tmp_path, env):
    case = field_case("10-gemini-max-tokens.jsonl")
    with FakeGeminiServer(lambda body: json.dumps(TAGS)) as server:
        env["FUNNELQA_GEMINI_BASE_URL"] = server.url
        reported = structure(case, env, "--max-tokens", "32", "--retries", "0", "--no-cache")
        assert reported.returncode == 0, reported.stderr
        message = by_id(reported.stdout)["u1"]["error"]["message"]
        assert "finishReason MAX_TOKENS at maxOutputTokens=32" in message

        server.requests.clear()
        healed = structure(case, env, "--max-tokens", "32", "--no-cache")
        assert healed.returncode == 0, healed.stderr
        assert by_id(healed.stdout)["u1"]["tags"] == TAGS["tags"]
        budgets = [body["generationConfig"]["maxOutputTokens"] for body in server.requests]
        assert budgets == [32, 64, 128]  # never the same request twice
        assert len({json.dumps(body, sort_keys=True) for body in server.requests}) == 3


def test_the_token_budget_stops_at_its_cap(monkeypatch):
    from funnelqa import forward
    from funnelqa.backends import Answer
    from funnelqa.backends.fake import FakeBackend

    monkeypatch.setattr(forward, "MAX_TOKENS_CAP", 64)
    seen = []

    def cut(request):
        seen.append(request.max_tokens)
        return Answer('{"tags": [', "length", f"cut at {request.max_tokens}")

    summary = forward.StageSummary("structure")
    [record] = forward.process_batch(forward.STAGES["structure"], [{"id": "u", "profile": "p"}], FakeBackend(cut), 5,
                                     summary, max_tokens=16)
    assert seen == [16, 32, 64]
    assert "cut at its token budget (cut at 64; the cap is 64)" in record["error"]["message"]
