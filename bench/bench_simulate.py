"""Simulate throughput: lockstep batching vs one interview at a time, same model, same run.

A real small model (the embedded ``local`` SmolLM2-135M unless --model says otherwise) plays both
questioner and simulator; the LLM cache is off so every answer is generated. Prints a table on
stderr and one JSON line on stdout. Runs on CPU or, where torch sees one, on a GPU.

    python bench/bench_simulate.py [--users 8] [--max-questions 3] [--model local] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from funnelqa.backends import BackendOptions, open_backend  # noqa: E402
from funnelqa.console import stderr  # noqa: E402
from funnelqa.questioners import LLMQuestioner  # noqa: E402
from funnelqa.records import check_questions, load_records  # noqa: E402
from funnelqa.simulate import UserSimulator, run_interviews  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "movielens-100k" / "forward.jsonl"
EXAMPLES = REPO / "examples" / "forward.jsonl"


def timed(records, questioner, simulator, max_questions: int) -> tuple[float, float, list[dict]]:
    """(wall seconds, CPU seconds of this process, sessions). On a shared machine the CPU time is
    the steadier of the two: other jobs slow the wall clock, not the work done."""
    wall, cpu = time.perf_counter(), time.process_time()
    sessions = list(run_interviews(records, questioner, simulator, max_questions=max_questions))
    return time.perf_counter() - wall, time.process_time() - cpu, sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--max-questions", type=int, default=3)
    parser.add_argument("--model", default="local")
    parser.add_argument("--repeats", type=int, default=1, help="Rounds of both modes, alternating.")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    parser.add_argument("--forward", type=Path, default=SHARED if SHARED.exists() else EXAMPLES)
    args = parser.parse_args()

    records = load_records(args.forward, check_questions)[: args.users]
    options = BackendOptions(batch_size=len(records), device=args.device)
    stderr.print(f"loading {args.model} ...")
    backend = open_backend(args.model, options, use_cache=False)
    questioner = LLMQuestioner(backend, "qa")
    simulator = UserSimulator(backend)
    # Warm-up: the first generate call pays one-off costs (kernels, allocator) that neither mode should carry.
    timed(records[:1], questioner, simulator, 1)

    # The modes alternate, so a slow spell of a shared machine does not land on one mode only.
    totals = {"batched": [0.0, 0.0], "single": [0.0, 0.0]}
    batched: list[dict] = []
    single: list[dict] = []
    for _ in range(args.repeats):
        wall, cpu, batched = timed(records, questioner, simulator, args.max_questions)
        totals["batched"][0] += wall
        totals["batched"][1] += cpu
        single = []
        for record in records:
            wall, cpu, sessions = timed([record], questioner, simulator, args.max_questions)
            totals["single"][0] += wall
            totals["single"][1] += cpu
            single += sessions

    def turns(sessions):
        return sum(len(s["turns"]) for s in sessions)

    sessions = len(records) * args.repeats
    (batched_wall, batched_cpu), (single_wall, single_cpu) = totals["batched"], totals["single"]
    result = {
        "bench": "simulate",
        "model": args.model,
        "device": getattr(backend, "device", None),
        "users": len(records),
        "max_questions": args.max_questions,
        "repeats": args.repeats,
        "batched_seconds": round(batched_wall, 2),
        "single_seconds": round(single_wall, 2),
        "batched_sessions_per_minute": round(60 * sessions / batched_wall, 2),
        "single_sessions_per_minute": round(60 * sessions / single_wall, 2),
        "speedup": round(single_wall / batched_wall, 2),
        "batched_cpu_seconds": round(batched_cpu, 2),
        "single_cpu_seconds": round(single_cpu, 2),
        "speedup_cpu_time": round(single_cpu / batched_cpu, 2),
        # Greedy decoding may differ slightly with padding; the turn counts show the work was alike.
        "batched_turns": turns(batched),
        "single_turns": turns(single),
    }
    stderr.print(
        f"{result['users']} users x {args.max_questions} questions x {args.repeats} on {result['device']}: "
        f"batched {result['batched_sessions_per_minute']} sessions/min, "
        f"one at a time {result['single_sessions_per_minute']} sessions/min: "
        f"[bold]{result['speedup']}x[/] wall clock, {result['speedup_cpu_time']}x CPU time"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
