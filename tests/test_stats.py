"""Issue 13: bootstrap intervals and paired differences, simulator fidelity from oracle sessions,
questioner behaviour, and Fig. 7 side by side; known values on constructed sessions."""

import json

import pytest

from funnelqa import uncertainty
from funnelqa.backends.fake import FakeBackend
from funnelqa.fidelity import OracleMap, content_words, is_question, session_counts
from funnelqa.questioners import OracleQuestioner
from funnelqa.repeats import exact_repeated_turns, is_repeat, repeated_turns
from funnelqa.score import SYSTEM_RATIOS, SessionScorer, score_file, score_sessions
from funnelqa.simulate import UserSimulator, run_interviews
from tests.conftest import run_cli
from tests.sessions import TARGET, make_session


def session(user, tags_per_turn, questions=None, **meta):
    questions = questions or [f"Question {i}?" for i in range(len(tags_per_turn))]
    meta = {"questioner": "local", "max_questions": len(tags_per_turn), **meta}
    return make_session(user, tags_per_turn, questions=questions, **meta)


def write(path, sessions):
    path.write_text("".join(json.dumps(s) + "\n" for s in sessions), encoding="utf-8")
    return path


# ---- the repeat detector on known pairs ----

@pytest.mark.parametrize("question, earlier, expected", [
    ("What kinds of movies do you usually enjoy?", "What kinds of movies do you usually avoid?", False),  # 7/9 = 0.78
    ("What kinds of movies do you usually enjoy?", "what kinds of movies do you usually enjoy", True),  # case, "?"
    ("Which actors do you like best in a film these days?", "Which actors do you like best in a film these days now?", True),  # 10/11
    ("What era of film do you prefer?", "What tone do you like?", False),
    ("", "", False),
])
def test_near_duplicates_on_known_pairs(question, earlier, expected):
    assert is_repeat(question, [earlier]) is expected


def test_exact_repeats_count_copies_up_to_case_and_spacing():
    asked = ["What tone?", "what  TONE?", "What tone do you like?", "What tone?", "What tones?"]
    assert exact_repeated_turns(asked) == 2
    assert repeated_turns(asked) >= exact_repeated_turns(asked)
    assert is_question("Why?") and is_question("なぜ？") and not is_question("I'm ready to help.") and not is_question("  ")


# ---- intervals and paired differences on constructed tables ----

def table(values, ids=None):
    t = uncertainty.UserTable(("x", "n"), with_bleu=False)
    for i, value in enumerate(values):
        t.add((ids or [f"u{k}" for k in range(len(values))])[i], {"x": value, "n": 1})
    return t


def test_all_equal_users_give_zero_width_intervals_and_no_difference():
    same = table([0.4] * 30)
    ci = uncertainty.intervals(same, {"mean": ("x", "n")}, resamples=200, seed=1)
    assert ci["mean"] == [pytest.approx(0.4), pytest.approx(0.4)]
    comparison = uncertainty.paired(same, table([0.4] * 30), {"mean": ("x", "n")}, resamples=200, seed=1)
    diff = comparison["diff"]["mean"]
    assert comparison["users"] == 30
    assert diff["value"] == 0.0 and diff["ci95"] == [0.0, 0.0] and diff["p"] == 1.0 and not diff["significant"]


def test_a_shifted_copy_differs_significantly_and_the_seed_fixes_the_numbers():
    import random

    rng = random.Random(0)
    base = [rng.random() for _ in range(25)]
    shifted = table([v + 0.1 for v in base])
    comparison = uncertainty.paired(shifted, table(base), {"mean": ("x", "n")}, resamples=500, seed=3)
    diff = comparison["diff"]["mean"]
    assert diff["value"] == pytest.approx(0.1)
    assert diff["ci95"] == [pytest.approx(0.1), pytest.approx(0.1)]  # paired: every resample shifts by 0.1
    assert diff["p"] == pytest.approx(1 / 501) and diff["significant"]
    # Unpaired spread is wide; the same seed gives the same interval, another seed another one.
    first = uncertainty.intervals(table(base), {"mean": ("x", "n")}, resamples=500, seed=3)["mean"]
    assert first == uncertainty.intervals(table(base), {"mean": ("x", "n")}, resamples=500, seed=3)["mean"]
    assert first != uncertainty.intervals(table(base), {"mean": ("x", "n")}, resamples=500, seed=4)["mean"]
    assert first[0] < sum(base) / len(base) < first[1]


def test_pairing_is_by_user_id_and_only_on_shared_users():
    a = table([1.0, 0.0, 1.0], ids=["u1", "u2", "u3"])
    b = table([0.0, 1.0], ids=["u3", "u9"])
    comparison = uncertainty.paired(a, b, {"mean": ("x", "n")}, resamples=50)
    assert comparison["users"] == 1 and comparison["diff"]["mean"]["value"] == 1.0  # u3: 1.0 - 0.0
    assert uncertainty.paired(a, table([1.0], ids=["zz"]), {"mean": ("x", "n")}) is None
    with pytest.raises(Exception, match="bootstrap"):
        uncertainty.intervals(a, {"mean": ("x", "n")}, resamples=0)


def test_system_intervals_and_bleu_from_the_scorer():
    same = [session(f"u{i}", [["Genre"], [], ["Era"]]) for i in range(12)]
    scorer = SessionScorer(resamples=100)
    for s in same:
        scorer.add(s)
    extra = scorer.analysis()
    result = scorer.result()
    for name in [*SYSTEM_RATIOS, "bleu"]:
        low_high = extra["ci95"][name]
        if name in ("answerable_rate", "unanswered_absent_rate", "unanswered_missed_rate"):
            assert low_high is None  # no oracle decided any question
            continue
        assert low_high[0] == pytest.approx(low_high[1]), name
    assert extra["ci95"]["bleu"][0] == pytest.approx(result["bleu"])
    assert extra["ci95"]["tag_recall"][0] == pytest.approx(result["tag_recall"])
    assert extra["bootstrap"] == {"resamples": 100, "seed": 0, "users": 12}
    # The paper's numbers are score_sessions' own, untouched by the analysis.
    assert "ci95" not in score_sessions(same)


def test_score_cli_pairs_files_on_the_same_users(tmp_path):
    weak = write(tmp_path / "weak.jsonl", [session(f"u{i}", [["Genre"], [], [], []]) for i in range(10)])
    strong = write(tmp_path / "strong.jsonl", [session(f"u{i}", [["Genre"], ["Tone"], [], []], questioner="other") for i in range(10)])
    out = tmp_path / "scores.jsonl"
    result = run_cli("score", weak, strong, "--bootstrap", "200", "--seed", "7", "--out", out)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # Beside --out: one record per pair of files on the same users, A (earlier argument) - B.
    (entry,) = [json.loads(line) for line in (tmp_path / "scores.pairs.jsonl").read_text().splitlines()]
    assert (entry["a"], entry["b"], entry["users"]) == (rows[0]["system"], rows[1]["system"], 10)
    assert entry["a_source"] == str(weak)
    recall = entry["diff"]["tag_recall"]
    assert recall["value"] == pytest.approx(-1 / 3) and recall["significant"] and recall["p"] == pytest.approx(1 / 201)
    assert entry["diff"]["questions_asked"] == {"value": 0.0, "ci95": [0.0, 0.0], "p": 1.0, "significant": False}
    assert "paired differences" in result.stderr and "-0.333*" in result.stderr
    assert rows[0]["bootstrap"] == {"resamples": 200, "seed": 7, "users": 10}
    assert rows[0]["ci95"]["tag_recall"] == [pytest.approx(1 / 3), pytest.approx(1 / 3)]
    elsewhere = tmp_path / "pairs.jsonl"
    assert run_cli("score", weak, strong, "--bootstrap", "200", "--seed", "7", "--pairs", elsewhere).returncode == 0
    assert json.loads(elsewhere.read_text()) == entry
    off = run_cli("score", weak, strong, "--bootstrap", "0")
    assert off.returncode == 0 and "ci95" not in json.loads(off.stdout.splitlines()[0])
    assert "paired differences" not in off.stderr


# ---- simulator fidelity on scripted oracle sessions with known errors ----

FORWARD = {
    "id": "u1",
    "tags": TARGET,
    "questions": [
        {"question": "What kinds of films do you enjoy?", "answer": "Crime films.", "tags": ["Genre"]},
        {"question": "What mood do you like?", "answer": "Dark stories.", "tags": ["Tone"]},
        {"question": "Which decade do you like?", "answer": "The 1970s.", "tags": ["Era"]},
        {"question": "Any favourite actors?", "answer": "Not really.", "tags": []},
    ],
}
# The scripted simulator: right on Q0, a false "No preference" on Q1, one invented tag (Genre) on
# Q2, and rightly nothing on Q3 (T_i is empty).
SCRIPT = {
    "What kinds of films do you enjoy?": {"answer": "I love crime films.", "tags": ["Genre"]},
    "What mood do you like?": {"answer": "No preference", "tags": []},
    "Which decade do you like?": {"answer": "Crime in the 1970s, please.", "tags": ["Era", "Genre"]},
    "Any favourite actors?": {"answer": "No preference", "tags": []},
}


def scripted_oracle_sessions(seed=None):
    def respond(request):
        last = request.messages[-1]["content"]
        return json.dumps(next(reply for question, reply in SCRIPT.items() if question in last))

    questioner = OracleQuestioner(seed=seed)
    simulator = UserSimulator(FakeBackend(respond, name="fake:scripted"))
    meta = {"questioner": questioner.spec, "simulator": "fake:scripted", "profile_form": "qa"}
    return list(run_interviews([FORWARD], questioner, simulator, max_questions=4, meta=meta))


def test_oracle_turns_record_the_teachers_tags():
    (s,) = scripted_oracle_sessions()
    assert [turn["expected_tags"] for turn in s["turns"]] == [["Genre"], ["Tone"], ["Era"], []]
    assert [turn["tags"] for turn in s["turns"]] == [["Genre"], [], ["Era", "Genre"], []]


def test_fidelity_on_scripted_oracle_sessions_with_known_errors(tmp_path):
    path = write(tmp_path / "oracle.jsonl", scripted_oracle_sessions())
    fidelity = score_file(str(path), resamples=50)["simulator_fidelity"]
    # Revealed 1 + 0 + 2 tags, expected 1 + 1 + 1 + 0, right 1 + 0 + 1.
    assert fidelity["tag_precision"] == pytest.approx(2 / 3)
    assert fidelity["tag_recall"] == pytest.approx(2 / 3)
    assert fidelity["tag_f1"] == pytest.approx(2 / 3)
    assert fidelity["false_no_preference_rate"] == pytest.approx(1 / 3)  # Q1 of the 3 with T_i
    assert fidelity["invented_rate"] == pytest.approx(1 / 3) and fidelity["invented_turn_rate"] == 0.5
    # "I love crime films": love, crime, film all in Genre's content; "Crime in the 1970s, please":
    # crime and 1970 in Genre + Era, "please" not.
    assert content_words("Crime in the 1970s, please.") == {"crime", "1970", "please"}
    assert fidelity["grounding"] == pytest.approx((1 + 2 / 3) / 2)
    assert fidelity["sessions"] == 1 and fidelity["turns"] == 4
    result = score_file(str(path), resamples=0)
    # Fig. 3b split: Q1 unanswered though the user has Tone (missed), Q3 unanswered with no T_i (absent).
    assert result["unanswered_rate"] == 0.5
    assert result["unanswered_missed_rate"] == 0.25 and result["unanswered_absent_rate"] == 0.25
    assert result["answerable_rate"] == 0.75 and result["mapped_rate"] == 1.0


def test_a_models_questions_are_mapped_through_the_oracle_sessions(tmp_path):
    oracle = OracleMap()
    for s in scripted_oracle_sessions():
        oracle.add(s)
    model = session("u1", [["Genre"], [], [], []], questions=[
        "What kinds of films do you enjoy?",  # the user's own Q0: Genre
        "Any favourite actors?",  # Q3: no T_i -> unanswered because the user has no such preference
        "What mood do you like ?",  # Q1, spaced differently: Tone, which the simulator missed
        "Do you like sports?",  # no oracle question: undecided
    ])
    counts = session_counts(model, oracle)
    assert (counts["mapped"], counts["answerable"]) == (3, 2)
    assert (counts["unanswered_absent"], counts["unanswered_missed"]) == (1, 1)
    assert counts["f_turns"] == 0  # fidelity comes from oracle sessions only
    oracle_file = write(tmp_path / "oracle.jsonl", scripted_oracle_sessions())
    model_file = write(tmp_path / "model.jsonl", [model])
    result = run_cli("score", model_file, oracle_file, "--bootstrap", "20")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["answerable_rate"] == pytest.approx(2 / 3) and rows[0]["simulator_fidelity"] is None
    assert rows[1]["simulator_fidelity"]["tag_f1"] == pytest.approx(2 / 3)
    assert "simulator fidelity" in result.stderr and "questioner behaviour" in result.stderr


def test_side_by_side_weighted_rank_and_error_bars(tmp_path):
    oracle = write(tmp_path / "oracle.jsonl", scripted_oracle_sessions())
    model = write(tmp_path / "model.jsonl", [session("u1", [["Era"], ["Genre"], [], []])])
    plots = tmp_path / "plots"
    result = run_cli("score", model, oracle, "--plots", plots, "--bootstrap", "20")
    assert result.returncode == 0, result.stderr
    assert (plots / "compare" / "weighted_rank_side_by_side.png").stat().st_size > 0
    from funnelqa.plots import error_bars, reference_result

    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert reference_result(rows)["questioner"] == "oracle"
    below, above = error_bars(rows, "bleu")
    assert all(v >= 0 for v in below + above)
    assert error_bars([{"bleu": 0.5}], "bleu") is None
