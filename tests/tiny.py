"""A tiny random causal LM with a real fast tokenizer and chat template, built offline in process.

Tests that need a transformers model (backends, training, simulate) point ``hf:<dir>`` at it:
it loads through exactly the same code as a real model, in well under a second.
"""

from __future__ import annotations

from pathlib import Path

PAD = "<|pad|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

# ChatML, as SmolLM2 uses, so the tiny model exercises the same template machinery.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Enough text for the BPE trainer to learn merges that look like the prompts the tests send.
_CORPUS = [
    "What kinds of movies do you usually enjoy? I like crime thrillers and dark comedies.",
    "The user enjoys science fiction, old westerns and animated films for children.",
    "Ask the next question. Profile: Genre, Director, Era, Mood. No preference.",
    '{"answer": "Crime, thrillers", "tags": ["Genre"]} {"answer": "No preference", "tags": []}',
    "Which directors or actors do you follow? Do you prefer recent films or classics from the 1970s?",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    # Byte level: any text round-trips, so tests may send arbitrary unicode.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[PAD, TURN_START, TURN_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=TURN_END)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    """Save a tiny random Llama-style causal LM and its tokenizer to ``directory`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        # Far above the usual 0.02, so greedy output varies with the prompt instead of repeating one token.
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
