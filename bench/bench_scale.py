"""corrupt and score at 1k, 5k and 20k users: seconds and peak memory, to show both stay linear and flat.
And, as the stage ``processes``, training on 1 process against 2: tokens per second, same steps.

Inputs are made by replicating the shared MovieLens forward records (../shared/data/movielens-100k)
under new ids, each copy's question texts marked so the negative-question pool grows with the
input as real data would; sessions are made from them with the oracle questioner (every question
in its funnel order), so score sees realistic texts. Each measurement runs the real console
script in a fresh process; peak memory is that process's maximum resident set size.

``processes`` trains the questioner on the embedded SmolLM2 (``--base local``) for a few steps,
once as 1 process with 2 threads accumulating 2 micro-batches per step, once as 2 processes of
1 thread (``accelerate launch`` with configs/accelerate/cpu-2proc.yaml) with 1 micro-batch each:
the same steps on the same examples. Tokens per second are the run card's (training steps only,
loading and evaluation excluded); the ratio is 2 processes over 1.

    python bench/bench_scale.py [--sizes 1000,5000,20000] [--keep DIR]
    python bench/bench_scale.py --stages processes [--train-steps 4] [--train-batch 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_FORWARD = REPO.parent / "shared" / "data" / "movielens-100k" / "forward.jsonl"
CPU_2PROC = REPO / "configs" / "accelerate" / "cpu-2proc.yaml"


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


def console_script() -> str:
    """The funnelqa console script beside this Python, else the one on PATH."""
    exe = Path(sys.executable).parent / "funnelqa"
    return str(exe) if exe.exists() else "funnelqa"


def measure(args: list[str], *, launcher: list[str] | None = None, env: dict | None = None,
            stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Seconds and peak MB (maximum resident set) of one run of the console script, or of ``launcher``
    with ``args``; its output goes to ``stdout`` (a file), else nowhere."""
    command = [*(launcher or [console_script()]), *args]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    # wait4 gives this child's own peak, or its largest process when it is a launcher that waits for
    # its workers; RUSAGE_CHILDREN would give the largest child so far.
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"bench_scale: {' '.join(command)} failed with exit code {process.returncode}")
    return seconds, usage.ru_maxrss / 1024


def train_processes(folder: Path, steps: int, batch_size: int) -> None:
    """Print the table of ``processes``: 1 process x 2 threads against 2 processes x 1 thread, and the ratio."""
    examples = folder / "examples.jsonl"
    with examples.open("w", encoding="utf-8") as handle:
        subprocess.run([console_script(), "corrupt", str(SHARED_FORWARD)], stdout=handle, check=True)
    common = [
        "train-questioner", str(examples), "--base", "local", "--max-steps", str(steps), "--batch-size", str(batch_size),
        "--eval-fraction", "0", "--save-every", "0",
    ]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "-m", "funnelqa"]
    variants = [("1 process x 2 threads", None, "2", 2), ("2 processes x 1 thread", launch, "1", 1)]
    print("| variant | global batch | steps | train tokens | tokens/s | wall s | peak MB (largest process) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    speeds = []
    for name, launcher, threads, grad_accum in variants:
        out = folder / name.replace(" ", "-")
        card_file = folder / f"{out.name}.json"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}
        with card_file.open("w", encoding="utf-8") as handle:
            seconds, peak = measure([*common, "--grad-accum", str(grad_accum), "--out", str(out)],
                                    launcher=launcher, env=env, stdout=handle)
        card = json.loads(card_file.read_text(encoding="utf-8"))
        speeds.append(card["tokens_per_second"])
        print(f"| {name} | {card['effective_batch_size']} | {card['steps']} | {card['train_tokens']} "
              f"| {card['tokens_per_second']:.1f} | {seconds:.0f} | {peak:.0f} |", flush=True)
    print(f"| ratio 2 processes / 1 | | | | {speeds[1] / speeds[0]:.2f} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--keep", type=Path, help="Write the generated inputs here and keep them.")
    parser.add_argument("--stages", default="corrupt,score", help="Which of corrupt, score and processes to measure.")
    parser.add_argument("--train-steps", type=int, default=4, help="Optimizer steps per run of the processes stage.")
    parser.add_argument("--train-batch", type=int, default=1,
                        help="Examples per micro-batch in the processes stage (1: about 3 GB a process).")
    options = parser.parse_args()
    if not SHARED_FORWARD.exists():
        print(f"bench_scale: {SHARED_FORWARD} is absent; nothing to measure", file=sys.stderr)
        return
    base = [json.loads(line) for line in SHARED_FORWARD.read_text(encoding="utf-8").splitlines() if line.strip()]
    base = [r for r in base if "error" not in r and r.get("questions")]
    folder = options.keep or Path(tempfile.mkdtemp(prefix="funnelqa-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    stages = options.stages.split(",")
    if "processes" in stages:
        (folder / "processes").mkdir(exist_ok=True)
        train_processes(folder / "processes", options.train_steps, options.train_batch)
        if not options.keep:
            shutil.rmtree(folder / "processes")
    if not {"corrupt", "score"} & set(stages):
        return
    print("| users | corrupt s | corrupt peak MB | score s | score peak MB |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(size) for size in options.sizes.split(",")):
        forward = folder / f"forward-{n}.jsonl"
        sessions = folder / f"sessions-{n}.jsonl"
        write_jsonl(forward, replicate(base, n))
        write_jsonl(sessions, (oracle_session(r) for r in replicate(base, n)))
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
