"""Training speed: layouts, precisions and a plain transformers + peft loop, same data, same run.

Each variant runs in its own process (so its peak resident memory is its own) on the same
examples, for the same number of steps of the same batch size:
- ``plain``: what one writes first: one sequence per step example, random batches padded on the
  right, the model's own loss (logits for every position), fp32;
- ``steps``: funnelqa's trainer on one sequence per corrupt example (length-grouped batches,
  logits only where a target is predicted);
- ``conversation``: funnelqa's trainer on one chat per user (loss on every assistant turn), in fp32
  and in bf16 autocast (on CPUs with bf16 arithmetic).
Reported per variant: tokens per epoch (counted, exact), tokens per second over the timed steps,
seconds per epoch (tokens per epoch / tokens per second: an extrapolation, stated as such), peak
RSS, and the ratios of each to ``steps`` fp32. Target tokens per epoch are the same in every layout.

    python bench/bench_train.py                       # embedded SmolLM2, questioner, on this machine
    python bench/bench_train.py --role simulator --steps 12
    python bench/bench_train.py --variants conversation,conversation-bf16 --threads 2

Prints one JSON line on stdout; a summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED_FORWARD = REPO.parent / "shared" / "data" / "movielens-100k" / "forward.jsonl"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="local", help="model spec to train (default: the embedded SmolLM2)")
    parser.add_argument("--role", default="questioner", choices=["questioner", "simulator"])
    parser.add_argument("--forward", type=Path, default=SHARED_FORWARD, help="forward records to corrupt into examples")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="examples per step (default: 4 on a CPU, where the plain loop's full logits take ~10 GB at 4, else 16)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=2048)
    # bf16 is left out by default: on a CPU without AMX it is several times slower (docs/training.md).
    parser.add_argument("--variants", default="plain,steps,conversation", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--examples", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def synthetic_forward(users: int, seed: int) -> list[dict]:
    """Forward records of varied length, for machines without the shared MovieLens data."""
    rng = random.Random(seed)
    words = "crime comedy western noir animation thriller romance drama heist musical satire war".split()
    records = []
    for u in range(users):
        tags = [{"tag": f"Tag {k}", "content": " ".join(rng.choices(words, k=rng.randint(5, 60)))} for k in range(rng.randint(3, 9))]
        questions = [
            {"question": f"What about {t['tag'].lower()}?", "answer": t["content"][:200], "tags": [t["tag"]]} for t in tags
        ]
        records.append({"id": f"u{u}", "tags": tags, "questions": questions})
    return records


def write_examples(path: Path, forward: Path, seed: int) -> str:
    from funnelqa.corrupt import corrupt
    from funnelqa.records import load_records

    if forward.exists():
        records, origin = load_records(forward), str(forward)
    else:
        records, origin = synthetic_forward(150, seed), "synthetic"
    with open(path, "w", encoding="utf-8") as handle:
        for example in corrupt(records, seed=seed):
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    return origin


def plain_loop(args, examples: Path, precision: str, lora_options: dict) -> dict:
    """The baseline: random batches, right padding to the batch's longest, the model's own loss."""
    import torch
    from peft import LoraConfig, get_peft_model

    from funnelqa.models import load_causal_lm
    from funnelqa.training.examples import IGNORE_INDEX, encode_steps, read_examples

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(args.base, device=device, dtype=dtype, trainable_adapter=True)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_options))
    model.train()
    data = read_examples(examples, args.role)
    encoded, _ = encode_steps(tokenizer, data.examples, args.role, "qa", 1024)
    order = list(range(len(encoded)))
    random.Random(args.seed).shuffle(order)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tokens, seconds = 0, 0.0
    for step in range(args.steps):
        start = (step * args.batch_size) % len(order)
        items = [encoded[i] for i in order[start : start + args.batch_size]]
        width = max(len(e) for e in items)
        input_ids = torch.full((len(items), width), tokenizer.pad_token_id)
        labels = torch.full((len(items), width), IGNORE_INDEX)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, : len(item)] = torch.tensor(item.input_ids)
            labels[row, : len(item)] = torch.tensor(item.labels())
            mask[row, : len(item)] = 1
        tick = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - tick
        tokens += int(mask.sum())
    tokens_per_epoch = sum(len(e) for e in encoded)
    return {"tokens_per_second": round(tokens / seconds, 1), "train_tokens": tokens, "train_seconds": round(seconds, 2),
            "tokens_per_epoch": tokens_per_epoch, "target_tokens_per_epoch": sum(e.target_length for e in encoded)}


def ours(args, examples: Path, layout: str, precision: str, out: Path) -> dict:
    """funnelqa's trainer; eval split off so every user trains, as the epoch count assumes."""
    from funnelqa.training import TrainConfig, train

    config = TrainConfig(
        role=args.role, out=out, base=args.base, batch_size=args.batch_size, max_steps=args.steps,
        eval_fraction=0.0, save_every=0, lr=1e-3, seed=args.seed, lora_r=16, lora_alpha=32, lora_dropout=0.05,
        layout=layout, precision=precision, max_length=args.max_length,
    )
    card = train(config, examples, show_progress=False)
    return {
        "tokens_per_second": card["tokens_per_second"], "train_tokens": card["train_tokens"],
        "train_seconds": card["train_seconds"], "tokens_per_epoch": card["examples"]["tokens_per_epoch"],
        "target_tokens_per_epoch": card["examples"]["target_tokens"], "loss_first": card["train_loss_first"],
        "loss_final": card["train_loss_final"],
    }


VARIANTS = {
    "plain": ("steps", "fp32"),
    "steps": ("steps", "fp32"),
    "conversation": ("conversation", "fp32"),
    "conversation-bf16": ("conversation", "bf16"),
}


def run_variant(args, name: str, examples: Path, scratch: Path) -> dict:
    """One variant, in this process: its numbers plus this process's peak RSS."""
    import resource

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    layout, precision = VARIANTS[name]
    if torch.cuda.is_available():
        precision = "bf16"  # on a GPU every variant runs in bf16: the ratios then measure layout and batching
    lora_options = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
    if name == "plain":
        result = plain_loop(args, examples, precision, lora_options)
    else:
        result = ours(args, examples, layout, precision, scratch / name)
    result["seconds_per_epoch"] = round(result["tokens_per_epoch"] / result["tokens_per_second"], 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["precision"] = precision
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def main() -> None:
    args = parse_args()
    import subprocess

    import torch

    from funnelqa.console import stderr

    if args.batch_size is None:
        args.batch_size = 16 if torch.cuda.is_available() else 4
    if args.variant:  # a child: one variant, one JSON line
        print(json.dumps(run_variant(args, args.variant, args.examples, args.examples.parent)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="funnelqa-bench-train-") as scratch:
        scratch = Path(scratch)
        examples = scratch / "examples.jsonl"
        origin = write_examples(examples, args.forward, args.seed)
        stderr.print(f"bench_train: {args.role} examples from {origin}; {args.steps} steps of {args.batch_size} on {args.base}")
        results = {}
        for name in args.variants.split(","):
            child = [sys.executable, __file__, "--variant", name, "--examples", str(examples), "--role", args.role,
                     "--base", args.base, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                     "--seed", str(args.seed), "--max-length", str(args.max_length)]
            if args.threads:
                child += ["--threads", str(args.threads)]
            done = subprocess.run(child, stdout=subprocess.PIPE, text=True, check=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[name]
            stderr.print(
                f"  {name:18s} {r['tokens_per_epoch']:>9,} tokens/epoch  {r['tokens_per_second']:>7,.0f} tok/s  "
                f"{r['seconds_per_epoch']:>8,.0f} s/epoch  peak {r['peak_rss_mb']:>6,} MB RSS"
            )
    reference = results.get("steps")
    if reference:
        for r in results.values():
            r["vs_steps"] = {
                "tokens_per_epoch": round(r["tokens_per_epoch"] / reference["tokens_per_epoch"], 3),
                "tokens_per_second": round(r["tokens_per_second"] / reference["tokens_per_second"], 2),
                "seconds_per_epoch": round(r["seconds_per_epoch"] / reference["seconds_per_epoch"], 3),
                "peak_rss": round(r["peak_rss_mb"] / reference["peak_rss_mb"], 2),
            }
        if "plain" in results:
            stderr.print(f"  steps vs plain transformers+peft: {reference['tokens_per_second'] / results['plain']['tokens_per_second']:.2f}x tokens/s")
        if "conversation" in results:
            c = results["conversation"]["vs_steps"]
            stderr.print(f"  conversation vs steps: {1 / c['seconds_per_epoch']:.1f}x less time per epoch "
                         f"({1 / c['tokens_per_epoch']:.1f}x fewer tokens), {c['peak_rss']:.2f}x peak memory")
    result = {
        "bench": "train",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": args.threads or torch.get_num_threads(),
        "base": args.base,
        "role": args.role,
        "data": origin,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "variants": results,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
