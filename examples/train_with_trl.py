"""Fine-tune the questioner with trl's SFTTrainer on `funnelqa export` output, instead of train-questioner.

    funnelqa corrupt forward.jsonl > examples.jsonl
    funnelqa export examples.jsonl --role questioner > questioner.jsonl
    python examples/train_with_trl.py questioner.jsonl --base local --out runs/questioner-trl

Needs trl (`pip install trl`; not a funnelqa dependency). LoRA through peft with train-questioner's
defaults (r 16, alpha 32, dropout 0.05, all linear layers, lr 1e-3, cosine, 5 % warmup), on the
base model train-questioner uses (funnelqa resolves `local` to its converted copy of SmolLM2), so
`--questioner hf:BASE+OUT` (`local+OUT` for `--base local`) loads the adapter in `funnelqa simulate`.
Loss falls on the assistant turns whose "weight" is not 0, as in train-questioner. The same works
for the simulator's export (`--role simulator`), whose turns are all weight 1.
"""

from __future__ import annotations

import argparse

# ChatML as SmolLM2's own template writes it, plus trl's {% generation %} markers around the
# assistant turns that carry loss: trl's assistant_only_loss trains exactly the marked tokens (the
# question and its <|im_end|>\n, the span train-questioner puts loss on), and a turn exported with
# "weight": 0 stays context. trl has no per-message switch of its own. For a base model with
# another template, mark its assistant turns the same way; main() checks the text is unchanged.
TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and message.get('weight') != 0 -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def check_template(tokenizer, conversations) -> None:
    """Stop unless TRAINING_TEMPLATE writes every conversation as the model's own template does:
    the adapter is used through that one (funnelqa.chat_template), so training must see the same text."""
    for messages in conversations:
        own = tokenizer.apply_chat_template(messages, tokenize=False)
        ours = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=TRAINING_TEMPLATE)
        if own != ours:
            raise SystemExit("the base model's chat template is not ChatML; write TRAINING_TEMPLATE for it")


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, train, save the adapter to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="funnelqa export output (JSONL of {\"messages\": [...]})")
    parser.add_argument("--base", default="local", help="funnelqa model spec (local, hf:DIR) or a model directory")
    parser.add_argument("--out", required=True, help="directory for the peft adapter")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=1024, help="longer conversations lose their end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (a GPU that has it)")
    args = parser.parse_args(argv)

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from funnelqa.models import resolve_base

    base = resolve_base(args.base if args.base.split(":")[0] in ("local", "hf") else f"hf:{args.base}")
    tokenizer = AutoTokenizer.from_pretrained(base)
    # The top-level fields (id, role, profile_form, layout, step) are dropped by the trainer.
    dataset = load_dataset("json", data_files=args.data, split="train")
    check_template(tokenizer, dataset["messages"])
    tokenizer.chat_template = TRAINING_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    config = SFTConfig(
        output_dir=args.out,
        assistant_only_loss=True,
        max_length=args.max_length,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # below 1: a share of the steps (transformers 5)
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        bf16=args.bf16,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.model.save_pretrained(args.out)  # the adapter alone: funnelqa reads the tokenizer from the base


if __name__ == "__main__":
    main()
