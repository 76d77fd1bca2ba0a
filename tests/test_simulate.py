import json
from pathlib import Path

import pytest

from funnelqa import parsing, render
from funnelqa.backends import ModelSpec, Request
from funnelqa.backends.fake import FakeBackend
from funnelqa.errors import UsageError
from funnelqa.questioners import LLMQuestioner, OracleQuestioner, default_profile_form, parse_questioner
from funnelqa.records import RecordWriter, load_records, check_questions
from funnelqa.score import tag_recall
from funnelqa.simulate import UserSimulator, run_interviews, simulate_file
from tests.conftest import run_cli


def make_record(user: str, topics: list[tuple[str, str]]) -> dict:
    """A forward record whose question i reveals tag i; question texts are unique per user."""
    return {
        "id": user,
        "tags": [{"tag": tag, "content": f"{user} content about {tag.lower()}."} for tag, _ in topics],
        "questions": [
            {"question": f"{user}: what about {tag.lower()}?", "answer": answer, "tags": [tag]} for tag, answer in topics
        ],
    }


RECORDS = [
    make_record("ann", [("Genre", "Crime."), ("Tone", "Dark."), ("Era", "The 1970s.")]),
    make_record("bob", [("Genre", "Westerns.")]),
    make_record("cid", [("Genre", "Comedy."), ("Directors", "Billy Wilder.")]),
]


def record_simulator(records) -> FakeBackend:
    """A simulated user that knows every record: a record's own question gets its answer and tags."""
    answers = {}
    for record in records:
        for q in record["questions"]:
            messages = render.simulator_messages(record["tags"], q["question"])
            answers[messages[0]["content"], messages[-1]["content"]] = render.simulator_target(q["answer"], q["tags"])
    no_answer = render.simulator_target(render.NO_PREFERENCE, [])

    def respond(request):
        return answers.get((request.messages[0]["content"], request.messages[-1]["content"]), no_answer)

    return FakeBackend(respond, name="fake:record-sim")


def interview(records, questioner, simulator, **kwargs):
    meta = {"questioner": questioner.spec, "simulator": simulator.spec, "profile_form": "qa"}
    return list(run_interviews(records, questioner, UserSimulator(simulator), meta=meta, **kwargs))


def test_oracle_reveals_everything_and_stops_when_complete():
    sessions = interview(RECORDS, OracleQuestioner(), record_simulator(RECORDS), max_questions=10)
    assert [s["id"] for s in sessions] == ["ann", "bob", "cid"]
    ann = sessions[0]
    assert ann["stop"] == "complete"
    assert [t["question"] for t in ann["turns"]] == [q["question"] for q in RECORDS[0]["questions"]]
    assert [t["answer"] for t in ann["turns"]] == ["Crime.", "Dark.", "The 1970s."]
    assert all(t["answered"] for t in ann["turns"])
    # Revealed tags carry their content from the target profile (Algorithm 2, line 7).
    assert ann["elicited"] == RECORDS[0]["tags"]
    assert ann["target"] == RECORDS[0]["tags"]
    assert ann["questioner"] == "oracle" and ann["max_questions"] == 10
    assert [len(s["turns"]) for s in sessions] == [3, 1, 2]


def test_question_limit_stops_the_interview():
    sessions = interview(RECORDS, OracleQuestioner(), record_simulator(RECORDS), max_questions=2)
    assert [len(s["turns"]) for s in sessions] == [2, 1, 2]
    assert [s["stop"] for s in sessions] == ["limit", "complete", "complete"]
    assert [t["tag"] for t in sessions[0]["elicited"]] == ["Genre", "Tone"]
    with pytest.raises(UsageError):
        interview(RECORDS, OracleQuestioner(), record_simulator(RECORDS), max_questions=0)


def questions_by_turn(*questions: str) -> FakeBackend:
    """An LLM questioner for ONE user that asks questions[t] at turn t (the last one repeats)."""
    asked = []

    def respond(request: Request) -> str:
        asked.append(request)
        return questions[min(len(asked) - 1, len(questions) - 1)]

    return FakeBackend(respond, name="fake:questioner")


def test_no_preference_for_questions_the_profile_cannot_answer():
    simulator = record_simulator(RECORDS)
    questioner = questions_by_turn("Do you like musicals?", "ann: what about tone?")
    sessions = interview(RECORDS[:1], LLMQuestioner(questioner, "qa"), simulator, max_questions=2)
    first, second = sessions[0]["turns"]
    assert first == {"question": "Do you like musicals?", "answer": "No preference", "tags": [], "answered": False,
                     "raw": render.simulator_target("No preference", [])}
    assert second["answered"] and second["tags"] == ["Tone"]
    assert [t["tag"] for t in sessions[0]["elicited"]] == ["Tone"]


def test_unparseable_simulator_output_counts_as_unanswered():
    questioner = questions_by_turn("What do you like?")
    babbling = FakeBackend(lambda request: "I am a simulated user and I like many things", name="fake:babble")
    sessions = interview(RECORDS[:1], LLMQuestioner(questioner, "qa"), babbling, max_questions=3)
    assert [t["answered"] for t in sessions[0]["turns"]] == [False, False, False]
    assert sessions[0]["elicited"] == [] and sessions[0]["stop"] == "limit"


def test_an_empty_question_spends_the_turn_without_asking_the_simulator():
    questioner = questions_by_turn("", "ann: what about genre?")
    simulator = record_simulator(RECORDS)
    sessions = interview(RECORDS[:1], LLMQuestioner(questioner, "qa"), simulator, max_questions=2)
    assert sessions[0]["turns"][0]["question"] == "" and not sessions[0]["turns"][0]["answered"]
    assert simulator.batches == [1]


def test_lockstep_one_batched_call_per_turn_and_role():
    questioner = FakeBackend(lambda request: "What about genre?", name="fake:q")
    # Every user's Genre question is answered; ann and cid need more, bob is complete after one turn.
    simulator = FakeBackend(lambda request: render.simulator_target("Yes.", ["Genre"]), name="fake:s")
    sessions = interview(RECORDS, LLMQuestioner(questioner, "answers"), simulator, max_questions=3)
    assert questioner.batches == [3, 2, 2]
    assert simulator.batches == [3, 2, 2]
    assert [s["stop"] for s in sessions] == ["limit", "complete", "limit"]


def test_questioner_sees_the_partial_profile_in_profile_order_and_the_history():
    record = RECORDS[0]
    simulator = record_simulator(RECORDS)
    for form in ("answers", "qa"):
        questioner = questions_by_turn("ann: what about era?", "ann: what about genre?", "Anything else?")
        interview([record], LLMQuestioner(questioner, form), simulator, max_questions=3)
        third = questioner.requests[2]
        known = [record["tags"][0], record["tags"][2]]  # Genre before Era, as in the profile, not as revealed
        history = [{"question": "ann: what about era?", "answer": "The 1970s."},
                   {"question": "ann: what about genre?", "answer": "Crime."}]
        assert list(third.messages) == render.questioner_messages(known, history, form)


def test_oracle_shuffled_asks_the_same_questions_in_a_seeded_order():
    records = [make_record(f"u{i}", [(f"T{k}", f"A{k}.") for k in range(6)]) for i in range(4)]
    simulator = record_simulator(records)
    ordered = interview(records, OracleQuestioner(), simulator, max_questions=6)
    shuffled = interview(records, OracleQuestioner(seed=1), simulator, max_questions=6)
    again = interview(records, OracleQuestioner(seed=1), simulator, max_questions=6)
    other = interview(records, OracleQuestioner(seed=2), simulator, max_questions=6)

    def asked(sessions):
        return [[t["question"] for t in s["turns"]] for s in sessions]

    assert [sorted(q) for q in asked(shuffled)] == [sorted(q) for q in asked(ordered)]
    assert asked(shuffled) != asked(ordered)
    assert asked(shuffled) == asked(again)
    assert asked(shuffled) != asked(other)
    assert all(s["stop"] == "complete" for s in shuffled)


def test_oracle_stops_when_its_questions_run_out():
    deaf = FakeBackend(lambda request: render.simulator_target(render.NO_PREFERENCE, []), name="fake:deaf")
    sessions = interview(RECORDS, OracleQuestioner(), deaf, max_questions=10)
    assert [s["stop"] for s in sessions] == ["exhausted"] * 3
    assert [len(s["turns"]) for s in sessions] == [3, 1, 2]


def test_oracle_recovers_every_tag_of_the_real_data(shared_forward):
    records = load_records(shared_forward, check_questions)
    longest = max(len(r["questions"]) for r in records)
    sessions = interview(records, OracleQuestioner(), record_simulator(records), max_questions=longest)
    assert len(sessions) == len(records)
    assert all(tag_recall(s["elicited"], s["target"]) == 1.0 for s in sessions)
    assert all(s["stop"] == "complete" for s in sessions)


def test_default_profile_form_reads_the_adapters_run_card(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert default_profile_form(parse_questioner(f"hf:{tmp_path}/base+{adapter}")) == "qa"
    (adapter / "run_card.json").write_text(json.dumps({"profile_form": "answers"}))
    assert default_profile_form(parse_questioner(f"hf:{tmp_path}/base+{adapter}")) == "answers"
    assert default_profile_form(parse_questioner(f"local+{adapter}")) == "answers"
    assert default_profile_form(parse_questioner("local")) == "qa"
    assert default_profile_form(parse_questioner("oracle")) == "qa"


# ---- through files and the CLI, with scripted fake backends ----

def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def simulator_script(records) -> list[dict]:
    rules = [
        {"last": q["question"], "response": {"answer": q["answer"], "tags": q["tags"]}}
        for record in records
        for q in record["questions"]
    ]
    return rules + [{"response": {"answer": "No preference", "tags": []}}]


def test_resume_skips_users_an_interrupted_run_finished(tmp_path):
    forward = write_jsonl(tmp_path / "forward.jsonl", RECORDS)
    script = tmp_path / "sim.json"
    script.write_text(json.dumps(simulator_script(RECORDS)))
    out = tmp_path / "sessions.jsonl"
    kwargs = dict(questioner="oracle", simulator=f"fake:{script}", out=out, use_cache=False, progress=False)
    assert simulate_file(forward, **kwargs) == 3
    complete = load_records(out)

    # A run killed after the first session: its partial file holds ann (marked, to prove it is kept
    # rather than redone) and half a line of bob.
    out.unlink()
    killed = RecordWriter(out)
    assert not killed.is_done(load_records(forward)[0])
    killed.write({**complete[0], "marker": "from the first run"})
    killed.abandon()
    with open(tmp_path / "sessions.jsonl.partial", "a") as handle:
        handle.write(json.dumps(complete[1])[:40])
    assert simulate_file(forward, **kwargs) == 2
    resumed = load_records(out)
    assert [s["id"] for s in resumed] == ["ann", "bob", "cid"]
    assert resumed[0]["marker"] == "from the first run"
    assert [{k: v for k, v in s.items() if k != "marker"} for s in resumed] == complete
    assert not (tmp_path / "sessions.jsonl.partial").exists()


def test_simulate_cli_with_scripted_fake_backends(tmp_path):
    forward = write_jsonl(tmp_path / "forward.jsonl", RECORDS)
    questioner = tmp_path / "q.json"
    questioner.write_text(json.dumps([{"responses": ["Sure! What kinds of movies do you like?", "ann: what about tone?"]}]))
    simulator = tmp_path / "s.json"
    simulator.write_text(json.dumps(simulator_script(RECORDS)))
    result = run_cli("simulate", forward, "--questioner", f"fake:{questioner}", "--simulator", f"fake:{simulator}",
                     "--max-questions", "2", "--profile-form", "answers", "--no-cache")
    assert result.returncode == 0, result.stderr
    sessions = [json.loads(line) for line in result.stdout.splitlines()]
    assert [s["id"] for s in sessions] == ["ann", "bob", "cid"]
    assert sessions[0]["turns"][0]["question"] == "What kinds of movies do you like?"
    assert sessions[0]["turns"][1]["tags"] == ["Tone"]
    assert {s["profile_form"] for s in sessions} == {"answers"}
    assert "turn 1/2" in result.stderr and "answered" in result.stderr


def test_one_model_plays_both_roles_and_is_opened_once(tmp_path, monkeypatch):
    import funnelqa.simulate as simulate_module

    forward = write_jsonl(tmp_path / "forward.jsonl", RECORDS)
    script = tmp_path / "both.json"
    rules = [{"contains": "Ask the next question", "response": "bob: what about genre?"}] + simulator_script(RECORDS)
    script.write_text(json.dumps(rules))
    opened = []
    real_open = simulate_module.open_backend
    monkeypatch.setattr(simulate_module, "open_backend", lambda spec, *a, **k: opened.append(spec) or real_open(spec, *a, **k))
    out = tmp_path / "sessions.jsonl"
    simulate_file(forward, questioner=f"fake:{script}", simulator=f"fake:{script}", max_questions=2, out=out,
                  use_cache=False, progress=False)
    assert opened == [ModelSpec.parse(f"fake:{script}")]
    sessions = load_records(out)
    assert [s["stop"] for s in sessions] == ["limit", "complete", "limit"]
    assert sessions[1]["elicited"] == RECORDS[1]["tags"]


def test_simulate_cli_reports_bad_input_with_its_line(tmp_path):
    forward = write_jsonl(tmp_path / "forward.jsonl", [RECORDS[0], {"id": "x", "tags": RECORDS[0]["tags"]}])
    result = run_cli("simulate", forward, "--questioner", "oracle", "--simulator", "fake:nothing.json", "--no-cache")
    assert result.returncode == 2
    assert f"{forward}:2" in result.stderr and "questions" in result.stderr


def test_simulate_cli_takes_a_dtype_and_names_a_wrong_one(tmp_path):
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    forward = write_jsonl(tmp_path / "forward.jsonl", RECORDS[:1])
    common = ["simulate", forward, "-q", "oracle", "-s", f"hf:{model}", "-T", "1", "--no-cache"]
    wrong = run_cli(*common, "--dtype", "int3")
    assert wrong.returncode == 2 and "unknown dtype 'int3'" in wrong.stderr
    right = run_cli(*common, "--dtype", "bfloat16")
    assert right.returncode == 0, right.stderr
    assert [json.loads(line)["id"] for line in right.stdout.splitlines()] == ["ann"]


def test_a_transformers_model_in_both_roles_batched_and_cached(tmp_path):
    from funnelqa.backends import BackendOptions, ModelSpec, open_backend
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    # Short outputs keep the random model quick; the code path is the real one.
    backend = open_backend(ModelSpec.parse(f"hf:{model}"), BackendOptions(batch_size=2), cache_path=tmp_path / "cache.sqlite")

    def run():
        asker = LLMQuestioner(backend, "qa", max_tokens=8)
        return list(run_interviews(RECORDS, asker, UserSimulator(backend, max_tokens=12), max_questions=2))

    sessions = run()
    assert [s["id"] for s in sessions] == ["ann", "bob", "cid"]
    assert all(1 <= len(s["turns"]) <= 2 for s in sessions)
    calls = backend.calls
    assert calls > 0
    # The same interviews again are served from the LLM cache, with the same result.
    assert run() == sessions
    assert backend.calls == calls


# ---- the lenient parsers simulate relies on ----

PROFILE = [{"tag": "Genre", "content": "x"}, {"tag": "Themes", "content": "y"}, {"tag": "Disliked Genres", "content": "z"}]


@pytest.mark.parametrize(
    "text, question",
    [
        ("What kinds of movies do you enjoy?", "What kinds of movies do you enjoy?"),
        ("Sure! Here is my question: What genres do you like? I hope that helps.", "What genres do you like?"),
        ("**Question:** Do you like Dr. Strangelove?", "Do you like Dr. Strangelove?"),
        ("1. What era do you prefer?\n2. Which directors?", "What era do you prefer?"),
        ('{"question": "What mood do you like?"}', "What mood do you like?"),
        ('Next question: "Which directors do you follow?"', "Which directors do you follow?"),
        ("Great, thanks.\nWhat do you avoid?\nA: musicals", "What do you avoid?"),
        ("Tell me about your favourite films.", "Tell me about your favourite films."),
        ("   ", ""),
    ],
)
def test_parse_question(text, question):
    assert parsing.parse_question(text) == question


@pytest.mark.parametrize(
    "text, parsed",
    [
        ('{"answer": "I like comedy.", "tags": ["genre"]}', ("I like comedy.", ["Genre"])),
        ('Sure:\n```json\n{"answer": "Comedy", "tags": "Genre, Theme"}\n```', ("Comedy", ["Genre", "Themes"])),
        ('{"answer": "I like comedy", "tags": ["Genre", "Them', ("I like comedy", ["Genre"])),
        ("Answer: comedy\nTags: Genre, Unknown", ("comedy", ["Genre"])),
        ('{"Answer": "x", "Tags": [{"tag": "Disliked Genre"}]}', ("x", ["Disliked Genres"])),
        ('{"answer": "Crime", "tags": ["Genre: crime films"]}', ("Crime", ["Genre"])),
        ("I like comedy.", ("No preference", [])),
        ('{"answer": "No preference.", "tags": ["Genre"]}', ("No preference", [])),
        ('{"answer": "I don\'t know", "tags": []}', ("No preference", [])),
        ('```\nnot json\n``` {"answer": "a", "tags": ["Genre"]}', ("a", ["Genre"])),
    ],
)
def test_parse_simulator(text, parsed):
    assert parsing.parse_simulator(text, PROFILE) == parsed


MOVIE_PROFILE = [
    {"tag": "Genre", "content": "The user enjoys comedy, romance, biography, drama and crime films."},
    {"tag": "Disliked Genres", "content": "The user avoids horror, fantasy, musicals and war films."},
    {"tag": "Tone", "content": "The user prefers heartfelt, reflective films with subtle humor."},
    {"tag": "Era", "content": "The user likes classic films from the 1950s and 1970s."},
]


@pytest.mark.parametrize(
    "text, parsed",
    [
        # Prose that repeats one tag's content reveals that tag.
        ("I mostly enjoy comedy, romance and crime dramas.", ("I mostly enjoy comedy, romance and crime dramas.", ["Genre"])),
        # JSON whose tag names are unusable falls back to the same evidence.
        ('{"answer": "Horror and musicals, never.", "tags": ["Dislikes"]}', ("Horror and musicals, never.", ["Disliked Genres"])),
        # Words every tag shares ("films", "the user") are no evidence.
        ("The user likes films.", ("No preference", [])),
        # A dump of the whole profile reveals nothing: it would, whatever the question.
        (" ".join(t["content"] for t in MOVIE_PROFILE), ("No preference", [])),
    ],
)
def test_parse_simulator_infers_tags_from_prose(text, parsed):
    assert parsing.parse_simulator(text, MOVIE_PROFILE) == parsed


def test_infer_tags_orders_by_evidence():
    # Era: classic, 1950s, 1970s (3 of its 4 distinctive words); Genre: crime, comedy, romance (3 of 6).
    answer = "Classic 1970s and 1950s crime comedy and romance."
    assert parsing.infer_tags(answer, MOVIE_PROFILE) == ["Era", "Genre"]



# ---- the --no-repeat guard ----

def test_repeats_are_near_duplicates_in_any_script():
    from funnelqa.repeats import is_repeat, repeated_turns

    assert is_repeat("What kind of characters do you like?", ["What kind of characters do you like ?"])
    assert is_repeat("what KIND of characters do you like", ["Who?", "What kind of characters do you like?"])
    assert not is_repeat("What kinds of movies do you usually avoid?", ["What kinds of movies do you usually enjoy?"])
    assert is_repeat("Какие фильмы вы любите?", ["Какие фильмы вы любите"])
    assert not is_repeat("", ["?"])
    assert repeated_turns(["A b c?", "D e f?", "a b c", "d e f!", "g?"]) == 2


def looping_questioner(fresh: bool) -> FakeBackend:
    """Greedy: always the same question. Sampled (the guard's candidates): a new one per seed, or
    the same one again when ``fresh`` is False."""

    def respond(request):
        if request.temperature == 0 or not fresh:
            return "What kinds of movies do you usually enjoy?"
        return f"Which director number {request.seed} do you like?"

    return FakeBackend(respond, name="fake:loop")


@pytest.mark.parametrize("fresh", [True, False])
def test_no_repeat_replaces_a_repeated_question_and_says_so(fresh):
    records = [make_record("ann", [("Genre", "Crime."), ("Director", "Billy Wilder.")])]
    guarded = LLMQuestioner(looping_questioner(fresh), "qa", no_repeat=True)
    sessions = interview(records, guarded, record_simulator(records), max_questions=3)
    turns = sessions[0]["turns"]
    assert turns[0]["question"] == "What kinds of movies do you usually enjoy?" and "guard" not in turns[0]
    if fresh:
        assert [t["question"] for t in turns[1:]] == ["Which director number 1000 do you like?",
                                                       "Which director number 2000 do you like?"]
        assert turns[1]["guard"] == {"repeat": "What kinds of movies do you usually enjoy?", "replaced": True}
    else:  # nothing better came up: the model's own question stays, and the session says so
        assert {t["question"] for t in turns} == {"What kinds of movies do you usually enjoy?"}
        assert all(t["guard"]["replaced"] is False for t in turns[1:])
    unguarded = interview(records, LLMQuestioner(looping_questioner(fresh), "qa"), record_simulator(records), max_questions=3)
    assert all("guard" not in t for t in unguarded[0]["turns"])


def test_no_repeat_is_recorded_and_refused_for_the_oracles(tmp_path):
    forward = write_jsonl(tmp_path / "forward.jsonl", RECORDS)
    script = tmp_path / "q.json"
    script.write_text(json.dumps([{"contains": "Ask the next question", "response": "What do you like?"}]
                                 + simulator_script(RECORDS)))
    result = run_cli("simulate", forward, "-q", f"fake:{script}", "-s", f"fake:{script}", "-T", "2", "--no-repeat",
                     "--no-cache")
    assert result.returncode == 0, result.stderr
    sessions = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(s["no_repeat"] is True for s in sessions)
    assert all(s["turns"][1]["guard"]["replaced"] is False for s in sessions)  # the script has nothing else to say
    refused = run_cli("simulate", forward, "-q", "oracle", "-s", f"fake:{script}", "--no-repeat", "--no-cache")
    assert refused.returncode == 2 and "--no-repeat guards a model questioner" in refused.stderr


def test_a_call_that_fails_for_good_ends_only_its_own_interview():
    from funnelqa.backends import Answer

    failed = Answer("", finish="failed", detail="HTTP 500 after 6 attempts")

    def user_of(request):
        return next(u for u in ("ann", "bob", "cid") if f"{u} content" in request.messages[0]["content"])

    # bob's simulated user fails for good at once; cid's questioner fails once cid has answered.
    simulator = FakeBackend(lambda r: failed if user_of(r) == "bob" else
                            json.dumps({"answer": f"I am {user_of(r)}", "tags": ["Genre"]}), name="fake:s")
    questioner = FakeBackend(lambda r: failed if any("I am cid" in m["content"] for m in r.messages)
                             else "What about genre?", name="fake:q")
    sessions = interview(RECORDS, LLMQuestioner(questioner, "qa"), simulator, max_questions=2)
    by_id = {s["id"]: s for s in sessions}
    assert [s["id"] for s in sessions] == ["ann", "bob", "cid"]
    assert by_id["bob"]["stop"] == "error" and by_id["bob"]["turns"] == []
    assert by_id["bob"]["error"] == {"stage": "simulate", "message": "simulator: HTTP 500 after 6 attempts"}
    assert by_id["cid"]["stop"] == "error" and len(by_id["cid"]["turns"]) == 1
    assert by_id["cid"]["error"]["message"] == "questioner: HTTP 500 after 6 attempts"
    assert by_id["ann"]["stop"] == "limit" and "error" not in by_id["ann"] and len(by_id["ann"]["turns"]) == 2
