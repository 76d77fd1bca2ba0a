"""corrupt and score at 1k, 5k and 20k users: seconds and peak memory, to show both stay linear and flat.

Inputs are made by replicating the shared MovieLens forward records (../shared/data/movielens-100k)
under new ids, each copy's question texts marked so the negative-question pool grows with the
input as real data would; sessions are made from them with the oracle questioner (every question
in its funnel order), so score sees realistic texts. Each measurement runs the real console
script in a fresh process; peak memory is that process's maximum resident set size.

    python bench/bench_scale.py [--sizes 1000,5000,20000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_FORWARD = REPO.parent / "shared" / "data" / "movielens-100k" / "forward.jsonl"


def replicate(records: list[dict], n: int) -> Iterator[dict]:
    """``n`` forward records: copy k of record r gets id ``{id}-c{k}``, its questions and tag contents marked ``(k)``.

    The marks keep every text distinct, so no stage can profit from repeated inputs that real data lacks.
    A generator: the bench process stays small, and a child's peak memory includes its parent's at
    the fork (Linux carries the high-water mark across exec).
    """
    for i in range(n):
        copy, record = divmod(i, len(records))
        record = records[record]
        if copy:
            record = {
                **record,
                "id": f"{record['id']}-c{copy}",
                "tags": [{**t, "content": f"{t['content']} ({copy})"} for t in record["tags"]],
                "questions": [{**q, "question": f"{q['question']} ({copy})"} for q in record["questions"]],
            }
        yield record


def oracle_session(record: dict) -> dict:
    """A session in which the questioner asks the record's own questions in order."""
    turns, seen, elicited = [], set(), []
    by_name = {t["tag"]: t for t in record["tags"]}
    for q in record["questions"]:
        turns.append({"question": q["question"], "answer": q["answer"], "tags": list(q["tags"]), "answered": True})
        for name in q["tags"]:
            if name not in seen:
                seen.add(name)
                elicited.append(by_name[name])
    return {"id": record["id"], "target": record["tags"], "turns": turns, "elicited": elicited,
            "max_questions": len(record["questions"]), "questioner": "oracle", "simulator": "oracle",
            "profile_form": "known"}


def write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def measure(args: list[str]) -> tuple[float, float]:
    """Seconds and peak MB (maximum resident set) of one run of the console script; output discarded."""
    exe = Path(sys.executable).parent / "funnelqa"
    command = [str(exe) if exe.exists() else "funnelqa", *args]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait4 gives this child's own peak; RUSAGE_CHILDREN would give the largest child so far.
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"bench_scale: {' '.join(command)} failed with exit code {process.returncode}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--keep", type=Path, help="Write the generated inputs here and keep them.")
    parser.add_argument("--stages", default="corrupt,score", help="Which of corrupt and score to measure.")
    options = parser.parse_args()
    if not SHARED_FORWARD.exists():
        print(f"bench_scale: {SHARED_FORWARD} is absent; nothing to measure", file=sys.stderr)
        return
    base = [json.loads(line) for line in SHARED_FORWARD.read_text(encoding="utf-8").splitlines() if line.strip()]
    base = [r for r in base if "error" not in r and r.get("questions")]
    folder = options.keep or Path(tempfile.mkdtemp(prefix="funnelqa-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print("| users | corrupt s | corrupt peak MB | score s | score peak MB |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(size) for size in options.sizes.split(",")):
        forward = folder / f"forward-{n}.jsonl"
        sessions = folder / f"sessions-{n}.jsonl"
        write_jsonl(forward, replicate(base, n))
        write_jsonl(sessions, (oracle_session(r) for r in replicate(base, n)))
        stages = options.stages.split(",")
        corrupt_s, corrupt_mb = measure(["corrupt", str(forward)]) if "corrupt" in stages else (None, None)
        score_s, score_mb = measure(["score", str(sessions)]) if "score" in stages else (None, None)
        cells = ["-" if value is None else f"{value:.1f}" if i % 2 == 0 else f"{value:.0f}"
                 for i, value in enumerate((corrupt_s, corrupt_mb, score_s, score_mb))]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
        if not options.keep:
            forward.unlink()
            sessions.unlink()


if __name__ == "__main__":
    main()
