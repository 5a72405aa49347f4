"""Models built from the tiny model for evaluation and merging tests (and the eval benchmark): a base that knows
the fruit colors, a noisy base with varied outputs, LoRA adapters and a full fine-tune; plus a probe file and
prompts of varied lengths."""

from __future__ import annotations

import json
from pathlib import Path

from ftpipe.core.evaluation.generation import answer_tokens, load_model, scoring_batch
from ftpipe_tests.tiny_model import COLORS, toy_rows


def fit(model, tokenizer, rows: list[dict], *, steps: int, lr: float) -> None:
    """AdamW steps on the loss of the assistant answers of `rows` (one full batch), in place."""
    import torch

    ids, mask, labels = scoring_batch([answer_tokens(tokenizer, row["messages"]) for row in rows],
                                      tokenizer.pad_token_id)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def lora_adapter(base_dir: Path, out: Path, *, random_weights: bool, train_rows: list[dict] | None = None,
                 seed: int = 0) -> Path:
    """A LoRA adapter on `base_dir`: identity (B = 0), random A and B (from `seed`), or trained on `train_rows`."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model(base_dir)
    torch.manual_seed(seed)  # the adapter's initial weights: the same whichever tests ran before
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=not random_weights,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if train_rows:
        fit(peft_model, tokenizer, train_rows, steps=80, lr=2e-2)
    peft_model.save_pretrained(out)
    return out


def full_finetune(base_dir: Path, out: Path, train_rows: list[dict], *, steps: int = 80) -> Path:
    """Every weight of `base_dir` trained on `train_rows`, saved like a full fine-tune (weights and tokenizer)."""
    model, tokenizer = load_model(base_dir)
    fit(model, tokenizer, train_rows, steps=steps, lr=2e-2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def competent_base(tiny_dir: Path, out: Path) -> Path:
    """The tiny model fully trained to name the fruit colors (a base model worth regressing from)."""
    return full_finetune(tiny_dir, out, toy_rows(32, seed=1))


def noisy_base(tiny_dir: Path, out: Path) -> Path:
    """The tiny random model with weights shaken up: varied text instead of one repeated token, and activations
    large enough for a LoRA adapter on its linear layers to learn the colors."""
    import torch

    model, tokenizer = load_model(tiny_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_probe(path: Path) -> Path:
    """A general-skills probe of one row per fruit color."""
    rows = [{"id": f"p{i}", "skill": "colors", "reference": color,
             "messages": [{"role": "system", "content": "Answer with one word."},
                          {"role": "user", "content": f"What color is the {fruit}? ({90 + i})"}]}
            for i, (fruit, color) in enumerate(sorted(COLORS.items()))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def varied_prompts(count: int) -> list[list[dict]]:
    """Toy prompts whose system messages differ in length (so batching needs padding)."""
    rows = toy_rows(count, seed=3)
    for i, row in enumerate(rows):
        row["messages"][0]["content"] = "Answer with one word. " * (i % 6 + 1)
    return [row["messages"][:-1] for row in rows]
