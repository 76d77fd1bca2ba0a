"""Simulate throughput: lockstep batching vs one interview at a time, same model, same run.

A real small model (the embedded ``local`` SmolLM2-135M unless --model says otherwise) plays both
questioner and simulator; the LLM cache is off so every answer is generated. Three ways, timed in
turns so a slow spell of a shared machine does not land on one of them only:

- batched: `funnelqa simulate` as shipped, every live interview in one call per turn;
- single: the same backend, one interview at a time (the target: batched >= 3x on CPU);
- plain: every live interview in one call per turn, but through transformers' own ``generate``
  with left padding and no prefix states kept (how the backend worked before; the GPU target is
  >= 10x this at equal batch).

Kept prefix states are dropped before each timed run, so no way profits from another's work.
Prints a line on stderr and one JSON line on stdout. Runs on CPU or, where torch sees one, a GPU.

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

from funnelqa.backends import Backend, BackendOptions, ModelSpec, Request, open_backend  # noqa: E402
from funnelqa.console import stderr  # noqa: E402
from funnelqa.questioners import LLMQuestioner  # noqa: E402
from funnelqa.records import check_questions, load_records  # noqa: E402
from funnelqa.simulate import UserSimulator, run_interviews  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "movielens-100k" / "forward.jsonl"
EXAMPLES = REPO / "examples" / "forward.jsonl"


class PlainGenerate(Backend):
    """The backend's model through ``model.generate``: greedy, left padded, one call per batch."""

    def __init__(self, backend):
        self.inner = backend
        self.spec = f"plain-generate:{backend.spec}"
        self.batch_size = backend.batch_size

    def generate(self, requests: list[Request]) -> list[str]:
        import torch

        inner = self.inner
        batch = inner.tokenizer.pad({"input_ids": [inner.encode(r) for r in requests]}, return_tensors="pt").to(inner.device)
        with torch.inference_mode():
            output = inner.model.generate(
                **batch,
                max_new_tokens=max(r.max_tokens for r in requests),
                do_sample=False,
                eos_token_id=inner.stop_ids,
                pad_token_id=inner.tokenizer.pad_token_id,
            )
        return [inner.tokenizer.decode(row, skip_special_tokens=True).strip() for row in output[:, batch["input_ids"].shape[1] :]]


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
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the backend's choice)")
    parser.add_argument("--forward", type=Path, default=SHARED if SHARED.exists() else EXAMPLES)
    args = parser.parse_args()

    records = load_records(args.forward, check_questions)[: args.users]
    options = BackendOptions(batch_size=len(records), device=args.device, dtype=args.dtype)
    stderr.print(f"loading {args.model} ...")
    backend = open_backend(ModelSpec.parse(args.model), options, use_cache=False)
    plain = PlainGenerate(backend)
    roles = {
        "batched": (LLMQuestioner(backend, "qa"), UserSimulator(backend)),
        "single": (LLMQuestioner(backend, "qa"), UserSimulator(backend)),
        "plain": (LLMQuestioner(plain, "qa"), UserSimulator(plain)),
    }
    # Warm-up: the first calls pay one-off costs (kernels, allocator) that no way should carry.
    for questioner, simulator in roles.values():
        timed(records[:1], questioner, simulator, 1)

    totals = {mode: [0.0, 0.0] for mode in roles}
    turns = {mode: 0 for mode in roles}
    for _ in range(args.repeats):
        for mode, (questioner, simulator) in roles.items():
            groups = [[record] for record in records] if mode == "single" else [records]
            if backend.prefix_cache is not None:
                backend.prefix_cache.clear()
            for group in groups:
                wall, cpu, sessions = timed(group, questioner, simulator, args.max_questions)
                totals[mode][0] += wall
                totals[mode][1] += cpu
                turns[mode] += sum(len(session["turns"]) for session in sessions)

    sessions = len(records) * args.repeats
    result = {
        "bench": "simulate",
        "model": args.model,
        "device": getattr(backend, "device", None),
        "dtype": backend.dtype,
        "users": len(records),
        "max_questions": args.max_questions,
        "repeats": args.repeats,
    }
    for mode, (wall, cpu) in totals.items():
        result[f"{mode}_seconds"] = round(wall, 2)
        result[f"{mode}_cpu_seconds"] = round(cpu, 2)
        result[f"{mode}_sessions_per_minute"] = round(60 * sessions / wall, 2)
        # Greedy decoding may differ slightly with padding; the turn counts show the work was alike.
        result[f"{mode}_turns"] = turns[mode]
    result["speedup_vs_single"] = round(totals["single"][0] / totals["batched"][0], 2)
    result["speedup_vs_single_cpu_time"] = round(totals["single"][1] / totals["batched"][1], 2)
    result["speedup_vs_plain_generate"] = round(totals["plain"][0] / totals["batched"][0], 2)
    stderr.print(
        f"{result['users']} users x {args.max_questions} questions x {args.repeats} on {result['device']}, "
        f"sessions/min: batched {result['batched_sessions_per_minute']}, "
        f"one at a time {result['single_sessions_per_minute']}, "
        f"plain generate batched {result['plain_sessions_per_minute']}: "
        f"[bold]{result['speedup_vs_single']}x[/] vs one at a time "
        f"({result['speedup_vs_single_cpu_time']}x in CPU time), "
        f"[bold]{result['speedup_vs_plain_generate']}x[/] vs plain generate"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
