import json
from collections import defaultdict

import pytest

from funnelqa import records
from funnelqa.corrupt import corrupt, corrupt_file, partial_profile
from funnelqa.errors import UsageError
from tests.conftest import run_cli

RECORD = {
    "id": "u1",
    "tags": [{"tag": "Genre", "content": "g"}, {"tag": "Era", "content": "e"}, {"tag": "Directors", "content": "d"}],
    "questions": [
        {"question": "What do you watch?", "answer": "g", "tags": ["Genre"]},
        {"question": "Old or new?", "answer": "e", "tags": ["Era", "Genre"]},
        {"question": "Any directors?", "answer": "d", "tags": ["Directors"]},
    ],
}


def test_eq7_by_hand():
    # JP_t = JP minus the tags revealed by Q_t..Q_{n-1}; Genre is revealed again by Q_1,
    # so it stays hidden until then (Eq. 7 taken literally).
    assert partial_profile(RECORD, 3) == RECORD["tags"]
    assert [t["tag"] for t in partial_profile(RECORD, 2)] == ["Genre", "Era"]
    assert partial_profile(RECORD, 1) == []
    assert partial_profile(RECORD, 0) == []


def test_examples_for_one_user():
    examples = list(corrupt([RECORD], negatives=0))
    questioner = [e for e in examples if e["role"] == "questioner"]
    assert [e["step"] for e in questioner] == [2, 1, 0]
    assert [e["target"] for e in questioner] == ["Any directors?", "Old or new?", "What do you watch?"]
    assert questioner[0]["history"] == [{"question": q["question"], "answer": q["answer"]} for q in RECORD["questions"][:2]]
    simulator = [e for e in examples if e["role"] == "simulator"]
    assert [(e["question"], e["answer"], e["tags"]) for e in simulator] == [
        (q["question"], q["answer"], q["tags"]) for q in RECORD["questions"]
    ]


def test_negatives_come_from_other_users_about_missing_concepts_and_are_seeded():
    other = {
        "id": "u2",
        "tags": [{"tag": "Horror", "content": "h"}, {"tag": "Genre", "content": "g2"}],
        "questions": [
            {"question": "Scary films?", "answer": "h", "tags": ["Horror"]},
            {"question": "Genres?", "answer": "g2", "tags": ["Genre"]},
        ],
    }
    negatives = [e for e in corrupt([RECORD, other], negatives=3, seed=1) if e.get("negative")]
    mine = [e for e in negatives if e["id"] == "u1"]
    assert [e["question"] for e in mine] == ["Scary films?"]  # the only concept u1 lacks
    assert mine[0]["answer"] == "No preference" and mine[0]["tags"] == []
    again = [e for e in corrupt([other, RECORD], negatives=3, seed=1) if e.get("negative")]
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, negatives))


def test_properties_on_real_forward_records(shared_forward):
    loaded = records.load_records(shared_forward, records.check_questions)
    examples = list(corrupt(loaded, seed=0))
    by_user = defaultdict(list)
    for example in examples:
        if example["role"] == "questioner":
            by_user[example["id"]].append(example)
    for record in loaded:
        steps = sorted(by_user[record["id"]], key=lambda e: e["step"])
        assert len(steps) == len(record["questions"])
        assert steps[0]["step"] == 0 and steps[0]["known"] == []  # JP_0 is empty
        for before, after in zip(steps, steps[1:]):  # JP_t grows monotonically with t
            assert {t["tag"] for t in before["known"]} <= {t["tag"] for t in after["known"]}
        revealed = {name for q in record["questions"] for name in q["tags"]}
        assert revealed == {t["tag"] for t in record["tags"]}  # the union of T_i is the whole profile
    assert list(corrupt(loaded, seed=0)) == examples  # deterministic for a seed


def test_corrupt_file_counts_what_it_writes(tmp_path):
    failed = {"id": "u0", "error": {"stage": "rank", "message": "m"}}
    path, out = tmp_path / "f.jsonl", tmp_path / "examples.jsonl"
    path.write_text(json.dumps(failed) + "\n" + json.dumps(RECORD) + "\n")
    summary = corrupt_file(path, out, negatives=0)
    assert (summary.users, summary.questioner, summary.simulator, summary.negative, summary.errors) == (1, 3, 3, 0, 1)
    assert len(records.load_records(out, allow_duplicate_ids=True)) == 6
    with pytest.raises(UsageError, match="unknown role"):
        corrupt_file(path, out, roles=("both",))


def test_cli_yields_one_questioner_example_per_question(shared_forward):
    result = run_cli("corrupt", shared_forward, "--role", "questioner")
    assert result.returncode == 0, result.stderr
    counts = defaultdict(int)
    for line in result.stdout.splitlines():
        counts[json.loads(line)["id"]] += 1
    expected = {r["id"]: len(r["questions"]) for r in records.load_records(shared_forward)}
    assert counts == expected


def test_cli_rejects_uncovered_tags(tmp_path):
    broken = dict(RECORD, questions=RECORD["questions"][:1])
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(broken) + "\n")
    result = run_cli("corrupt", path)
    assert result.returncode == 2
    assert f"{path}:1: tags never revealed by any question" in result.stderr
    assert result.stdout == ""
    # Skipping the only line leaves nothing to do: that is a failure, not an empty success.
    skipped = run_cli("corrupt", path, "--skip-invalid")
    assert skipped.returncode == 2 and "skipped" in skipped.stderr and "every line was invalid" in skipped.stderr


# sha256 of `funnelqa corrupt forward.jsonl` (and with --seed 7 --negatives 5) on the shared
# MovieLens forward records, as the implementation that scanned the whole pool per user wrote it.
REFERENCE_SHA256 = {
    (): "bc721a782cdeb30592584589921b07ebdaafcba8b9a1909cbef70038e15e758f",
    ("--seed", "7", "--negatives", "5"): "983d93c8f2899102e17968a957a83359eb2265a047ec080986a1ea6ecbc1c801",
}


@pytest.mark.parametrize("options", list(REFERENCE_SHA256))
def test_cli_output_is_byte_identical_to_the_full_scan(shared_forward, options):
    import hashlib

    result = run_cli("corrupt", shared_forward, *options)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout.encode("utf-8")).hexdigest() == REFERENCE_SHA256[options]
    piped = run_cli("corrupt", "-", *options, input=shared_forward.read_text(encoding="utf-8"))
    assert piped.stdout == result.stdout  # stdin is spooled and read twice like a file


def _full_scan_negatives(loaded, seed, count):
    import random

    from funnelqa.corrupt import negative_examples

    pool = [(str(r["id"]), q) for r in loaded for q in r["questions"]]
    return [e for r in loaded for e in negative_examples(r, pool, count, random.Random(f"{seed}:{r['id']}"))]


def test_indexed_pool_draws_what_the_full_scan_draws(shared_forward):
    base = records.load_records(shared_forward, records.check_questions)[:60]
    # Copies under new ids, some with their questions' texts kept: the same text asked of
    # several users with different tags, which the index must merge like the scan does.
    loaded = list(base)
    for copy in (1, 2):
        for r in base:
            keep = copy == 2 and len(loaded) % 3 == 0
            loaded.append({**r, "id": f"{r['id']}-c{copy}", "questions": [
                {**q, "question": q["question"] if keep else f"{q['question']} ({copy})"} for q in r["questions"]]})
    loaded[5] = {**loaded[5], "tags": loaded[5]["tags"][:1] + [{"tag": "Zzz only here", "content": "z"}] + loaded[5]["tags"][1:]}
    for seed, count in ((0, 2), (3, 30), (5, 0)):
        indexed = [e for e in corrupt(loaded, seed=seed, negatives=count, roles=("simulator",)) if e.get("negative")]
        assert indexed == _full_scan_negatives(loaded, seed, count)
