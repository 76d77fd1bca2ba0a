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
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_FORWARD = REPO.parent / "shared" / "data" / "movielens-100k" / "forward.jsonl"


def replicate(records: list[dict], n: int) -> list[dict]:
    """``n`` forward records: copy k of record r gets id ``{id}-c{k}``, its questions and tag contents marked ``(k)``.

    The marks keep every text distinct, so no stage can profit from repeated inputs that real data lacks.
    """
    out = []
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
        out.append(record)
    return out


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
    """Seconds and peak MB of one run of the console script; its output is discarded."""
    exe = Path(sys.executable).parent / "funnelqa"
    command = [str(exe) if exe.exists() else "funnelqa", *args]
    start = time.perf_counter()
    # A fresh interpreter per measurement: RUSAGE_CHILDREN reports the largest child so far, and
    # sizes run smallest first, so each reading is this run's own peak.
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--keep", type=Path, help="Write the generated inputs here and keep them.")
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
        records = replicate(base, n)
        write_jsonl(forward, records)
        write_jsonl(sessions, (oracle_session(r) for r in records))
        del records
        corrupt_s, corrupt_mb = measure(["corrupt", str(forward)])
        score_s, score_mb = measure(["score", str(sessions)])
        print(f"| {n} | {corrupt_s:.1f} | {corrupt_mb:.0f} | {score_s:.1f} | {score_mb:.0f} |", flush=True)
        if not options.keep:
            forward.unlink()
            sessions.unlink()


if __name__ == "__main__":
    main()
