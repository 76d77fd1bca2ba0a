"""The forward pipeline through the real console script and the real google-genai client,
against a loopback server that answers like the Gemini API, faults included."""

import json

from funnelqa import records
from funnelqa.backends import Request
from funnelqa.backends.fake import scripted
from tests.conftest import run_cli
from tests.forward_script import forward_rules
from tests.gemini_server import FakeGeminiServer, gemini_prompt_text
from tests.test_cli import RECORDS


def test_forward_stages_with_gemini_survive_faults_then_rerun_from_cache(tmp_path):
    teacher = scripted(forward_rules(RECORDS))

    def responder(body):
        return teacher(Request.chat(None, gemini_prompt_text(body)))

    env = {"GEMINI_API_KEY": "test-key", "FUNNELQA_CACHE_DIR": str(tmp_path / "cache")}
    profiles = tmp_path / "profiles.jsonl"
    profiles.write_text("".join(json.dumps({"id": r["id"], "profile": r["profile"]}) + "\n" for r in RECORDS))
    with FakeGeminiServer(responder, slow_seconds=5) as server:
        env["FUNNELQA_GEMINI_BASE_URL"] = server.url
        server.inject("429", "500", "slow", "malformed")
        current = profiles
        for stage in ("structure", "rank", "generate-questions"):
            out = tmp_path / f"{stage}.jsonl"
            result = run_cli(stage, current, "--model", "gemini:gemini-2.0-flash", "--timeout", "1",
                             "--concurrency", "2", "--out", out, env=env)
            assert result.returncode == 0, result.stderr
            current = out
        assert not server.faults  # every injected fault was met and survived
        produced = records.load_records(current)
        assert [{k: r[k] for k in ("id", "tags", "questions")} for r in produced] == [
            {k: r[k] for k in ("id", "tags", "questions")} for r in RECORDS
        ]
        assert all("responseJsonSchema" in str(body) or "responseSchema" in str(body) for body in server.requests)
        seen = len(server.requests)

        for stage, source in (("structure", profiles), ("rank", tmp_path / "structure.jsonl"),
                              ("generate-questions", tmp_path / "rank.jsonl")):
            again = run_cli(stage, source, "--model", "gemini:gemini-2.0-flash", "--out", tmp_path / f"again-{stage}.jsonl", env=env)
            assert again.returncode == 0, again.stderr
            assert "0 model calls, 3 from cache" in again.stderr.replace("\n", " ")
        assert len(server.requests) == seen  # the re-run made zero calls
        assert (tmp_path / "again-generate-questions.jsonl").read_text() == current.read_text()
