import json
from pathlib import Path

import pytest

from funnelqa import metrics
from funnelqa.repeats import repeated_turns
from funnelqa.score import (
    elicited_after,
    first_reveals,
    profile_text,
    score_file,
    score_sessions,
    system_name,
    tag_recall,
)
from tests.conftest import run_cli
from tests.sessions import TARGET, make_session


def session(user, tags_per_turn, target=TARGET, **meta):
    meta = {"questioner": "oracle", "max_questions": 4, **meta}
    return make_session(user, tags_per_turn, questions=["Q?"] * len(tags_per_turn), target=target, **meta)


def test_profile_texts_follow_reveal_and_target_order():
    s = session("u", [["Era"], [], ["Genre", "Tone"]])
    assert profile_text(s["elicited"]) == "The user likes the 1970s. The user loves crime films. The user prefers dark stories."
    assert profile_text(s["target"]) == "The user loves crime films. The user prefers dark stories. The user likes the 1970s."
    assert first_reveals(s) == [("Era", 1), ("Genre", 3), ("Tone", 3)]
    assert [t["tag"] for t in elicited_after(s, 2)] == ["Era"]
    assert elicited_after(s, 0) == []


def test_a_perfect_funnel_scores_one_everywhere_at_the_end():
    sessions = [session("a", [["Genre"], ["Tone"], ["Era"]]), session("b", [["Genre"], ["Tone"], ["Era"]])]
    result = score_sessions(sessions)
    assert result["bleu"] == pytest.approx(1.0)
    assert result["rouge1"] == result["rouge2"] == result["rougeL"] == pytest.approx(1.0)
    assert result["tag_recall"] == 1.0 and result["complete_rate"] == 1.0
    assert result["unanswered_rate"] == 0.0 and result["questions_asked"] == 3.0
    curve = result["curve"]
    assert curve["questions"] == [1, 2, 3, 4]  # up to max_questions; finished sessions keep their profile
    assert curve["tag_recall"] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert curve["rougeL"][0] < curve["rougeL"][1] < curve["rougeL"][2] == pytest.approx(1.0)
    assert result["funnel_spearman"] == {"rho": pytest.approx(1.0), "pairs": 6}
    assert [(r["concept"], r["wr"]) for r in result["weighted_rank"]] == [("Genre", 1.0), ("Tone", 2.0), ("Era", 3.0)]


def test_scores_of_a_partial_session_by_hand():
    s = session("a", [[], ["Genre"], [], []])
    result = score_sessions([s])
    assert result["unanswered_rate"] == 0.75
    assert result["tag_recall"] == pytest.approx(1 / 3)
    elicited, target = profile_text(s["elicited"]), profile_text(TARGET)
    assert result["bleu"] == metrics.bleu([elicited], [target])["bleu"]
    # One pair: the bootstrap median is the pair's own F1. "the user loves crime films" (5 tokens)
    # against 15 target tokens, all 5 found: P 1, R 1/3.
    assert result["rouge1"] == pytest.approx(0.5)
    assert result["curve"]["tag_recall"] == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    assert result["curve"]["bleu"][0] == 0.0


def test_weighted_rank_pools_first_reveals_over_sessions():
    sessions = [session("a", [["Genre"], ["Tone"]]), session("b", [["Tone"], ["Genre", "Era"]]), session("c", [["Genre"], ["Genre"]])]
    ranks = {r["concept"]: (r["wr"], r["sessions"]) for r in score_sessions(sessions)["weighted_rank"]}
    # Genre first revealed at 1, 2, 1 (re-asking in c does not count again); Tone at 2, 1; Era at 2.
    assert ranks == {"Genre": (pytest.approx(4 / 3), 3), "Tone": (1.5, 2), "Era": (2.0, 1)}


def test_funnel_correlation_is_negative_for_a_reversed_funnel():
    reversed_funnel = [session("a", [["Era"], ["Tone"], ["Genre"]])]
    assert score_sessions(reversed_funnel)["funnel_spearman"]["rho"] == pytest.approx(-1.0)


def test_system_names(tmp_path):
    assert system_name(session("a", []), "x/sessions.jsonl") == "oracle / fake:s.json / qa"
    spec = "hf:/models/base+/runs/exp/questioner-qa"
    assert system_name(session("a", [], questioner=spec), "x.jsonl") == "hf:base+questioner-qa / fake:s.json / qa"
    mixed = [session("a", []), session("b", [], simulator="local")]
    assert score_file(str(write_sessions(tmp_path / "mixed.jsonl", mixed)))["system"] == "mixed"


def write_sessions(path: Path, sessions) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in sessions), encoding="utf-8")
    return path


def test_score_cli_compares_systems_and_writes_plots(tmp_path):
    good = write_sessions(tmp_path / "good.jsonl", [session("a", [["Genre"], ["Tone"], ["Era"]]), session("b", [["Genre"], ["Tone"]])])
    weak = write_sessions(
        tmp_path / "weak.jsonl",
        [session("a", [[], ["Era"], [], []], questioner="local"), session("b", [["Tone"], [], [], []], questioner="local")],
    )
    plots = tmp_path / "plots"
    result = run_cli("score", good, weak, "--plots", plots)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["system"] for r in rows] == ["oracle / fake:s.json / qa", "local / fake:s.json / qa"]
    assert rows[0]["rougeL"] > rows[1]["rougeL"] and rows[1]["unanswered_rate"] == 0.75
    assert "oracle / fake:s.json / qa" in result.stderr and "R-L" in result.stderr
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert pngs == ["curves.png", "systems.png", "weighted_rank_local_fake_s.json_qa.png", "weighted_rank_oracle_fake_s.json_qa.png"]
    for png in plots.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_score_cli_out_file_and_same_names(tmp_path):
    first = write_sessions(tmp_path / "run1.jsonl", [session("a", [["Genre"]])])
    second = write_sessions(tmp_path / "run2.jsonl", [session("a", [["Tone"]])])
    out = tmp_path / "scores.jsonl"
    result = run_cli("score", first, second, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["system"] for r in rows] == ["oracle / fake:s.json / qa [run1]", "oracle / fake:s.json / qa [run2]"]


def test_score_cli_rejects_files_that_are_not_sessions(tmp_path):
    bad = tmp_path / "forward.jsonl"
    bad.write_text(json.dumps({"id": "a", "tags": TARGET}) + "\n")
    result = run_cli("score", bad)
    assert result.returncode == 2
    assert f"{bad}:1" in result.stderr and "funnelqa simulate" in result.stderr


def text_scores(elicited, targets, *, seed, cache, interval=False):
    predictions = [profile_text(tags) for tags in elicited]
    references = [profile_text(tags) for tags in targets]
    scores = {"bleu": metrics.bleu(predictions, references)["bleu"]}
    scores.update(metrics.rouge(predictions, references, seed=seed, cache=cache, with_interval=interval))
    scores["tag_recall"] = metrics.mean(tag_recall(e, t) for e, t in zip(elicited, targets))
    return scores


def funnel_correlation(sessions):
    positions, generality = [], []
    for session in sessions:
        index = {tag["tag"]: i for i, tag in enumerate(session["target"])}
        span = max(1, len(index) - 1)
        for name, position in first_reveals(session):
            positions.append(position)
            generality.append(index[name] / span)
    return {"rho": metrics.spearman(positions, generality), "pairs": len(positions)}


def concept_ranks(sessions):
    positions = {}
    for session in sessions:
        for name, position in first_reveals(session):
            positions.setdefault(name, []).append(position)
    rows = [{"concept": name, "wr": wr, "sessions": len(positions[name])}
            for name, wr in metrics.weighted_ranks(positions).items()]
    return sorted(rows, key=lambda row: (row["wr"], -row["sessions"], row["concept"]))


def _all_at_once(sessions, seed=0):
    """score_sessions as it was before streaming: every session in memory, corpus metrics over
    lists (text_scores, funnel_correlation and concept_ranks are the library's code of then)."""
    cache = metrics.RougeCache()
    targets = [s["target"] for s in sessions]
    finals = [s["elicited"] for s in sessions]
    turns = [t for s in sessions for t in s["turns"]]
    horizon = max(max(s.get("max_questions") or 0, len(s["turns"])) for s in sessions)
    summary = text_scores(finals, targets, seed=seed, cache=cache, interval=True)
    summary["unanswered_rate"] = sum(not t["answered"] for t in turns) / len(turns) if turns else None
    summary["questions_asked"] = metrics.mean(len(s["turns"]) for s in sessions)
    summary["complete_rate"] = metrics.mean(float(tag_recall(e, t) == 1.0) for e, t in zip(finals, targets))
    asked = [[t["question"] for t in s["turns"] if t["question"].strip()] for s in sessions]
    summary["repeat_rate"] = sum(map(repeated_turns, asked)) / max(1, sum(map(len, asked)))
    summary["rouge_tokenizer"] = "default"
    curve = {"questions": list(range(1, horizon + 1))}
    for q in curve["questions"]:
        for name, value in text_scores([elicited_after(s, q) for s in sessions], targets, seed=seed, cache=cache).items():
            curve.setdefault(name, []).append(value)
    summary["curve"] = curve
    summary["funnel_spearman"] = funnel_correlation(sessions)
    summary["weighted_rank"] = concept_ranks(sessions)
    return summary


def test_streamed_scores_equal_the_all_at_once_numbers_exactly():
    import random

    rng = random.Random(3)
    words = "war crime comedy drama noir western silent epic gritty gentle romantic dark slow".split()
    sessions = []
    for i in range(40):
        target = [{"tag": f"T{k}", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))}
                  for k in range(rng.randint(1, 6))]
        turns, seen, elicited = [], set(), []
        for _ in range(rng.randint(0, 7)):
            answered = rng.random() > 0.3
            names = rng.sample([t["tag"] for t in target], rng.randint(1, len(target))) if answered else []
            turns.append({"question": "q?", "answer": "a", "tags": names, "answered": answered})
            for name in names:
                if name not in seen:
                    seen.add(name)
                    elicited.append(next(t for t in target if t["tag"] == name))
        extra = {"max_questions": rng.choice([3, 9])} if i % 2 else {}
        sessions.append({"id": f"u{i}", "target": target, "turns": turns, "elicited": elicited, **extra})
    for seed in (0, 5):
        assert score_sessions(iter(sessions), seed=seed) == _all_at_once(sessions, seed=seed)
