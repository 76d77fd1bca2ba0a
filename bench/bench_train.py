"""Training throughput: funnelqa's trainer against a plain transformers + peft loop, same data, same run.

The plain loop is what one writes first: random batches padded on the right to the longest
example, the model's own loss (logits for every position), fp32 on a CPU. funnelqa's trainer
groups examples of similar length and computes logits only where a target token is predicted.
Both train the same LoRA on the same examples for the same number of steps and batch size;
throughput counts real (non-padding) tokens per second of training steps. On a GPU both run in
bf16, so the ratio measures the trainer's batching and loss, not the precision.

    python bench/bench_train.py                       # embedded SmolLM2 on this machine
    python bench/bench_train.py --steps 40 --role simulator --base hf:/path/to/model

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
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="examples per step (default: 4 on a CPU, where the plain loop's full logits take ~10 GB at 4, else 16)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
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
    from funnelqa.training.examples import IGNORE_INDEX, encode_examples, read_examples

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(args.base, device=device, dtype=dtype, trainable_adapter=True)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_options))
    model.train()
    data = read_examples(examples, args.role)
    encoded, _ = encode_examples(tokenizer, data.examples, args.role, "qa", 1024)
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
    return {"tokens_per_second": round(tokens / seconds, 1), "train_tokens": tokens, "train_seconds": round(seconds, 2)}


def main() -> None:
    args = parse_args()
    import torch

    from funnelqa.console import stderr
    from funnelqa.training import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = 16 if torch.cuda.is_available() else 4
    precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    lora_options = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
    with tempfile.TemporaryDirectory(prefix="funnelqa-bench-train-") as scratch:
        scratch = Path(scratch)
        examples = scratch / "examples.jsonl"
        origin = write_examples(examples, args.forward, args.seed)
        stderr.print(f"bench_train: {args.role} examples from {origin}; {args.steps} steps of {args.batch_size} on {args.base}")
        plain = plain_loop(args, examples, precision, lora_options)
        config = TrainConfig(
            role=args.role, out=scratch / "ours", base=args.base, batch_size=args.batch_size, max_steps=args.steps,
            eval_fraction=0.0, save_every=0, lr=1e-3, seed=args.seed, lora_r=16, lora_alpha=32, lora_dropout=0.05,
        )
        card = train(config, examples, show_progress=False)
    result = {
        "bench": "train",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "precision": precision,
        "base": args.base,
        "role": args.role,
        "data": origin,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "funnelqa_tokens_per_second": card["tokens_per_second"],
        "plain_tokens_per_second": plain["tokens_per_second"],
        "speedup": round(card["tokens_per_second"] / plain["tokens_per_second"], 2),
        "funnelqa_train_seconds": card["train_seconds"],
        "plain_train_seconds": plain["train_seconds"],
    }
    stderr.print(
        f"tokens/s: funnelqa {result['funnelqa_tokens_per_second']:,.0f}, plain transformers+peft "
        f"{result['plain_tokens_per_second']:,.0f} -> {result['speedup']}x"
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
