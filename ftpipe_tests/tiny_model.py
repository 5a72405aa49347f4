"""A tiny random Llama model with a locally trained tokenizer, and toy chat datasets, for fast CPU tests."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
COLORS = {"apple": "red", "banana": "yellow", "grape": "purple", "lime": "green", "plum": "violet", "kiwi": "brown"}
CORPUS = [
    "system user assistant You are a helpful assistant.",
    "What color is the fruit? Answer with one word.",
    *(f"The {fruit} is {color}." for fruit, color in COLORS.items()),
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}-_/",
]


def build_tokenizer(*, chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer (vocab ~400) trained here, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_model(path: Path, *, chat_template: str | None = CHATML_TEMPLATE, seed: int = 0) -> Path:
    """Save a random 2-layer LlamaForCausalLM (hidden 32, 4 heads) and its tokenizer to `path` (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def toy_rows(count: int, *, seed: int = 0, source: str = "toy.jsonl") -> list[dict]:
    """Learnable chat rows in the canonical schema: the assistant names the fruit's color."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        fruit = rng.choice(sorted(COLORS))
        messages = [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": f"What color is the {fruit}? ({index})"},
            {"role": "assistant", "content": COLORS[fruit]},
        ]
        row_id = hashlib.sha256(repr(messages).encode()).hexdigest()[:16]
        rows.append({"id": row_id, "messages": messages, "source": f"{source}:{index + 1}"})
    return rows


def long_system_prompt(sentences: int, topic: str = "color") -> str:
    """A task's long instructions, as real tasks have: `sentences` rules about naming the fruit's `topic` (about 37
    tokens each for the tiny tokenizer, 18 for SmolLM2's)."""
    return " ".join(f"Rule {i}: name the {topic} of the fruit in one word, in lower case." for i in range(sentences))


def with_system(messages: list[dict], system: str) -> list[dict]:
    """`messages` with `system` as their only system message, first."""
    return [{"role": "system", "content": system}, *[m for m in messages if m["role"] != "system"]]


def write_chat_parquet(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["id", "messages", "source"]).to_parquet(path, index=False)
    return path
