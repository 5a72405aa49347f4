"""Model I/O shared by evaluation, merging and chat: loading a base model and a fine-tuned one (LoRA adapter or
full fine-tune) for inference, batched greedy decoding, and the log-likelihood of given answers."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftpipe.core.modeling import load_model_and_tokenizer

IGNORE = -100  # label of a token that is not scored
ADAPTER_CONFIG = "adapter_config.json"

Progress = Callable[[int, int], None]
Scored = tuple[list[int], int]  # (token ids of prompt + answer, how many leading ids are prompt)


# ---------------------------------------------------------------- loading


def load_model(path: Path | str, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) in full precision (fp32 on CPU, bf16 on GPU; never 4-bit, so a QLoRA
    adapter is judged and merged on the weights it will be served with)."""
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def is_adapter(folder: Path | str) -> bool:
    """True when `folder` holds a LoRA/QLoRA adapter; otherwise it holds a full fine-tune."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def load_finetuned(finetuned_dir: Path | str, base: Callable[[], tuple], trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) of a training's output: the adapter in `finetuned_dir` applied to the base
    model `base()` returns (which the adapter changes in place), or the full fine-tune saved there, loaded whole
    without calling `base`."""
    if not is_adapter(finetuned_dir):
        return load_model(finetuned_dir, trust_remote_code)
    from peft import PeftModel

    model, tokenizer = base()
    return PeftModel.from_pretrained(model, str(finetuned_dir)).eval(), tokenizer


def inference_device() -> str:
    """Where `load_model` puts a model: `cuda` when a CUDA GPU is available, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- tokens


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def token_chunks(order: list[int], lengths: list[int], budget: int) -> Iterator[list[int]]:
    """`order` (row indices, longest first) in batches of about `budget` tokens, each row counted as its batch's
    first (longest) one: short rows go in large batches, long ones in small (at least one row each)."""
    start = 0
    while start < len(order):
        size = max(1, budget // max(lengths[order[start]], 1))
        yield order[start : start + size]
        start += size


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of already-templated text (the chat template carries any special tokens itself)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt, ending with the assistant's turn opening."""
    return encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def mean_prompt_tokens(tokenizer, prompts: list[list[dict]]) -> float:
    """Mean prompt length in tokens: what each call costs before the first answer token."""
    return sum(len(prompt_ids(tokenizer, p)) for p in prompts) / max(len(prompts), 1)


def pad(sequences: list[list[int]], pad_id: int, *, left: bool):
    """(input_ids, attention_mask) tensors, padded on the left (generation) or the right (scoring)."""
    import torch

    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def prompt_batch(prompts: list[list[int]], pad_id: int, prefix: SharedPrefix | None):
    """(input_ids, attention_mask) of a generation batch: left-padded, or with a shared `prefix` that every prompt
    starts with, the prefix first and each rest left-padded after it (the padding masked, positions unchanged)."""
    import torch

    if prefix is None:
        return pad(prompts, pad_id, left=True)
    ids, mask = pad([prompt[len(prefix.ids):] for prompt in prompts], pad_id, left=True)
    head = torch.tensor([prefix.ids] * len(prompts), dtype=torch.long)
    return torch.cat([head, ids], dim=1), torch.cat([torch.ones_like(head), mask], dim=1)


def pad_id_of(tokenizer, fallback: int = 0) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


# ---------------------------------------------------------------- greedy decoding


def _shared_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all `sequences` have in common."""
    return next((i for i, column in enumerate(zip(*sequences)) if len(set(column)) > 1), min(map(len, sequences)))


@dataclass(frozen=True)
class SharedPrefix:
    """The token ids many prompts start with, and the model's KV cache after them (never changed: copied per use)."""

    ids: list[int]
    cache: Any

    def covers(self, prompt: list[int]) -> bool:
        """True when `prompt` starts with these ids and has at least one token after them."""
        return len(prompt) > len(self.ids) and prompt[:len(self.ids)] == self.ids

    def cache_for(self, rows: int):
        """A copy of the cache for a batch of `rows` prompts."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


def shared_prefix(model, prompts: list[list[int]]) -> SharedPrefix | None:
    """The KV cache of the tokens all `prompts` (two or more) start with, but the last of each (whose logits the
    prompt's own pass must give); None when there are none."""
    import torch

    length = min(_shared_length(prompts), min(map(len, prompts)) - 1) if len(prompts) > 1 else 0
    if length < 1:
        return None
    ids = prompts[0][:length]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True, logits_to_keep=1)
    if any(out.cache.is_linear) or any(out.cache.is_sliding):
        return None  # a recurrent or sliding-window layer's cache cannot be continued after padding
    return SharedPrefix(ids, out.cache)


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the model's generation config and of the tokenizer."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def _cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


def greedy_batches(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_tokens: int,
                   output_logits: bool = False) -> Iterator[tuple[list[int], list[str], Any]]:
    """Yield (row indices, answers, per-step logits or None) per batch of greedy generation.

    Rows are batched longest first (little padding), as many as `batch_tokens` holds (each counted as its prompt
    plus `max_new_tokens`: `token_chunks`), left-padded, and decoded with the KV cache; the tokens all prompts start
    with run once (`shared_prefix`), and each batch continues from a copy of their cache.
    """
    import torch

    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    stops = stop_token_ids(model, tokenizer)
    pad_id = pad_id_of(tokenizer, stops[0])
    prefix = shared_prefix(model, encoded)
    for indices in token_chunks(order, [len(ids) + max_new_tokens for ids in encoded], batch_tokens):
        ids, mask = prompt_batch([encoded[i] for i in indices], pad_id, prefix)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, repetition_penalty=1.0, use_cache=True, eos_token_id=stops,
                pad_token_id=pad_id, return_dict_in_generate=True, output_logits=output_logits,
                cache=prefix.cache_for(len(indices)) if prefix else None,
            )
        new_tokens = out.sequences[:, ids.shape[1]:].tolist()
        answers = [tokenizer.decode(_cut_at_stop(seq, stops), skip_special_tokens=True).strip() for seq in new_tokens]
        yield indices, answers, torch.stack(out.logits, dim=1).float().cpu() if output_logits else None


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_tokens: int,
             progress: Progress | None = None) -> list[str]:
    """Greedy answers to chat `prompts` (in order), batched by `batch_tokens` with left padding (`greedy_batches`);
    `progress(done, total)` per batch."""
    answers: list[str] = [""] * len(prompts)
    done = 0
    for indices, texts, _ in greedy_batches(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            batch_tokens=batch_tokens):
        for index, text in zip(indices, texts):
            answers[index] = text
        done += len(indices)
        if progress:
            progress(done, len(prompts))
    return answers


# ---------------------------------------------------------------- log-likelihood of given answers


def answer_tokens(tokenizer, conversation: list[dict]) -> Scored:
    """The whole conversation's ids and its prompt length: the rest is the last (assistant) message with the
    template's end-of-turn tokens."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    if full.startswith(prompt):
        ids = encode(tokenizer, prompt)
        return ids + encode(tokenizer, full[len(prompt):]), len(ids)
    ids, full_ids = encode(tokenizer, prompt), encode(tokenizer, full)
    shared = next((i for i, (a, b) in enumerate(zip(ids, full_ids)) if a != b), len(ids))
    return full_ids, shared


def scoring_batch(scored: list[Scored], pad_id: int):
    """(input_ids, attention_mask, labels), right-padded; labels are IGNORE on the prompt and the padding."""
    ids, mask = pad([seq for seq, _ in scored], pad_id, left=False)
    labels = ids.masked_fill(mask == 0, IGNORE)
    for row, (_, prompt_len) in enumerate(scored):
        labels[row, :prompt_len] = IGNORE
    return ids, mask, labels


def _batch_logprobs(model, scored: list[Scored], pad_id: int, prefix: SharedPrefix | None) -> list[tuple[float, int]]:
    import torch

    skip = len(prefix.ids) if prefix else 0  # every sequence starts with the prefix, and its prompt goes beyond it
    ids, mask, labels = scoring_batch([(seq[skip:], prompt_len - skip) for seq, prompt_len in scored], pad_id)
    start = max(min(prompt_len for _, prompt_len in scored) - skip - 1, 0)  # logits only where an answer token follows
    attention = torch.cat([torch.ones(len(scored), skip, dtype=torch.long), mask], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                       cache=prefix.cache_for(len(scored)) if prefix else None,
                       logits_to_keep=ids.shape[1] - start).logits[:, :-1].float()
    targets = labels[:, start + 1:].to(logits.device)
    scored_mask = targets != IGNORE
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums = (picked * scored_mask).sum(dim=1).tolist()
    return list(zip(sums, scored_mask.sum(dim=1).tolist()))


def answer_logprobs(model, tokenizer, scored: list[Scored], batch_size: int) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each sequence's answer part, in the order given; the tokens all
    prompts start with run once (`shared_prefix`)."""
    order = sorted(range(len(scored)), key=lambda i: -len(scored[i][0]))
    prefix = shared_prefix(model, [seq[:prompt_len] for seq, prompt_len in scored])
    results: list[tuple[float, int]] = [(0.0, 0)] * len(scored)
    for indices in chunks(order, batch_size):
        batch = _batch_logprobs(model, [scored[i] for i in indices], pad_id_of(tokenizer), prefix)
        for index, value in zip(indices, batch):
            results[index] = value
    return results


def conversation_logprobs(model, tokenizer, conversations: list[list[dict]],
                          batch_size: int) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each conversation's last (assistant) message given the rest."""
    return answer_logprobs(model, tokenizer, [answer_tokens(tokenizer, c) for c in conversations], batch_size)


def loss_of(sums: list[tuple[float, int]]) -> tuple[float, float]:
    """(mean token loss, perplexity) over answers' (summed log-probability, token count)."""
    mean = -sum(logprob for logprob, _ in sums) / max(sum(count for _, count in sums), 1)
    return mean, math.exp(min(mean, 700.0))


def rows_logprobs(model, prompts: list[list[int]], continuations: list[list[list[int]]],
                  prefix: SharedPrefix | None = None) -> list[list[float]]:
    """For each prompt (token ids), the summed log-probability of each of its continuations (token ids) right after
    it. The prompts (after the `prefix`, when they all start with it), each followed by its continuations' common first
    tokens, run as one left-padded batch; the rest of every continuation runs as a second batch, each on a copy of its
    prompt's KV cache. Positions are given explicitly, so padding changes nothing."""
    import torch

    skip = len(prefix.ids) if prefix and all(prefix.covers(p) for p in prompts) else 0
    shared = [_shared_length(options) for options in continuations]
    heads = [prompt[skip:] + options[0][:common] for prompt, options, common in zip(prompts, continuations, shared)]
    ids, mask = pad(heads, 0, left=True)
    attention = torch.cat([torch.ones(len(heads), skip, dtype=torch.long), mask], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    keep = max(shared) + 1  # rows predict their shared tokens, then the first of the rest
    with torch.inference_mode():
        out = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                    position_ids=positions[:, skip:].to(model.device), use_cache=True, logits_to_keep=keep,
                    cache=prefix.cache_for(len(heads)) if skip else None)
        logprobs = out.logits.float().log_softmax(-1)
        head_logprobs = [logprobs[row, keep - 1 - common:-1].gather(
            -1, torch.tensor(options[0][:common], dtype=torch.long, device=logprobs.device).view(-1, 1)).sum().item()
            for row, (options, common) in enumerate(zip(continuations, shared))]
        owners = [row for row, options in enumerate(continuations) for _ in options]
        rests = [option[common:] for options, common in zip(continuations, shared) for option in options]
        if not any(rests):
            return [[head_logprobs[row]] * len(options) for row, options in enumerate(continuations)]
        rest_ids, rest_mask = pad(rests, 0, left=False)
        index = torch.tensor(owners, dtype=torch.long)
        out.cache.batch_select_indices(index.to(model.device))
        lengths = attention.sum(dim=1)[index]
        later = model(input_ids=rest_ids.to(model.device),
                      attention_mask=torch.cat([attention[index], rest_mask], dim=1).to(model.device),
                      position_ids=(lengths.view(-1, 1) + torch.arange(rest_ids.shape[1])).to(model.device),
                      cache=out.cache).logits.float().log_softmax(-1)
    steps = torch.cat([logprobs[index.to(logprobs.device), -1].unsqueeze(1), later[:, :-1]], dim=1)
    picked = steps.gather(-1, rest_ids.to(steps.device).unsqueeze(-1)).squeeze(-1) * rest_mask.to(steps.device)
    values = iter(picked.sum(dim=1).tolist())
    return [[head_logprobs[row] + next(values) for _ in options] for row, options in enumerate(continuations)]
