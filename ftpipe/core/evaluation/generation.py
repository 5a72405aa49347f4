"""Model I/O shared by evaluation, merging and chat: loading a base model and a fine-tuned one (LoRA adapter or
full fine-tune) for inference, batched greedy decoding, and the log-likelihood of given answers."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftpipe.core.evaluation.metrics.base import AnswerEnd
from ftpipe.core.modeling import load_model_and_tokenizer

IGNORE = -100  # label of a token that is not scored
ADAPTER_CONFIG = "adapter_config.json"
SCORING_TOKENS = 8192  # KV cache tokens of one batch of continuations (about 0.4 GB for SmolLM2-135M)
LOGITS_COST = 8  # KV cache tokens a continuation token counts as: its log-probabilities over the whole vocabulary
ROUND_TOKENS = 4  # decoding steps between dropping the rows whose answers ended

Progress = Callable[[int, int], None]
Scored = tuple[list[int], int]  # (token ids of prompt + answer, how many leading ids are prompt)


# ---------------------------------------------------------------- loading


def load_model(path: Path | str, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) in full precision (fp32 on CPU, bf16 on GPU; never 4-bit, so a QLoRA
    adapter is judged and merged on the weights it will be served with)."""
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=trust_remote_code)
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return model.eval(), tokenizer


def _contiguous_input(module, args):
    """The output head's input made contiguous. The logits of a batch's last positions (`logits_to_keep`) come from a
    slice of the hidden states, and on such a slice a frozen head (under an adapter) makes torch's matmul run it once
    per row against a broadcast weight: on a CPU, 0.71 s for the last tokens of 136 prompts with a 49k vocabulary,
    against 0.07 s."""
    return (args[0].contiguous(), *args[1:])


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


def load_merged(finetuned_dir: Path | str, base: Callable[[], tuple], trust_remote_code: bool = False):
    """`load_finetuned` with an adapter folded into the base weights: the model `merged_model` ships, and on a CPU
    faster to evaluate than running each adapted projection's LoRA path beside it (8–19 % less time on the demo,
    the same greedy answers, log-probabilities within 1e-4)."""
    model, tokenizer = load_finetuned(finetuned_dir, base, trust_remote_code)
    return (model.merge_and_unload().eval() if is_adapter(finetuned_dir) else model), tokenizer


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


def shared_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all `sequences` have in common."""
    return next((i for i, column in enumerate(zip(*sequences)) if len(set(column)) > 1), min(map(len, sequences)))


def shared_start_length(sequences: list[list[int]]) -> int:
    """How many leading tokens two or more `sequences` share, but the last of each (whose logits their own pass must
    give); 0 for one sequence."""
    return min(shared_length(sequences), min(map(len, sequences)) - 1) if len(sequences) > 1 else 0


@dataclass(frozen=True)
class SharedPrefix:
    """The token ids many prompts start with, and the model's KV cache after them (never changed: copied per use)."""

    ids: list[int]
    cache: Any

    def cache_for(self, rows: int):
        """A copy of the cache for a batch of `rows` prompts."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


def shared_prefix(model, prompts: list[list[int]]) -> SharedPrefix | None:
    """The KV cache of the tokens all `prompts` start with (`shared_start_length`); None when there are none."""
    length = shared_start_length(prompts)
    return read_prefix(model, prompts[0][:length]) if length else None


def read_prefix(model, ids: list[int], below: SharedPrefix | None = None, **inputs) -> SharedPrefix | None:
    """`ids` and the model's KV cache after them, reading only what follows the prefix `below` (a copy of its cache)
    when given; `inputs` go to the model's pass. None when the model's cache cannot be continued after padding (a
    recurrent or sliding-window layer)."""
    import torch

    if below:
        inputs["cache"] = copy.deepcopy(below.cache)
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([ids[len(below.ids) if below else 0:]], device=model.device),
                      use_cache=True, logits_to_keep=1, **inputs).cache
    if any(cache.is_linear) or any(cache.is_sliding):
        return None
    return SharedPrefix(ids, cache)


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the model's generation config and of the tokenizer."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def _cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


def rows_can_leave(model) -> bool:
    """Whether decoding can drop rows between rounds: the model generates with a dynamic KV cache (a static one keeps
    its shape) of attention layers only (a recurrent layer's state would not follow its rows)."""
    from transformers import DynamicCache

    if model.generation_config.cache_implementation not in (None, "dynamic"):
        return False
    return not any(DynamicCache(config=model.config).is_linear)


def _decode(model, ids, mask, cache, *, max_new_tokens: int, stops: list[int], pad_id: int, output_logits: bool,
            complete: Callable[[list[int]], bool]) -> tuple[list[list[int]], list[Any]]:
    """(new token ids, per-step logits or None) of each row of a batch, decoded greedily from `cache` in rounds of
    ROUND_TOKENS steps: a row that met a stop token or whose answer is `complete` leaves the batch at the end of its
    round, so the rows still answering do not carry the finished ones (in one `generate` call every row runs as long
    as the longest). One round when the cache cannot drop rows (`rows_can_leave`)."""
    import torch

    round_tokens = ROUND_TOKENS if rows_can_leave(model) else max_new_tokens
    rows = list(range(len(ids)))
    new: list[list[int]] = [[] for _ in rows]
    logits: list[list] = [[] for _ in rows]
    sequences, mask = ids.to(model.device), mask.to(model.device)
    while rows and (left := max_new_tokens - len(new[rows[0]])) > 0:
        with torch.inference_mode():
            out = model.generate(
                input_ids=sequences, attention_mask=mask, max_new_tokens=min(left, round_tokens), do_sample=False,
                num_beams=1, repetition_penalty=1.0, use_cache=True, eos_token_id=stops, pad_token_id=pad_id,
                return_dict_in_generate=True, output_logits=output_logits, cache=cache)
        fresh = out.sequences[:, sequences.shape[1]:]
        steps = torch.stack(out.logits, dim=1).float().cpu() if output_logits else None
        for position, row in enumerate(rows):
            new[row] += fresh[position].tolist()
            if output_logits:
                logits[row].append(steps[position])
        going = [position for position, row in enumerate(rows)
                 if not set(new[row]) & set(stops) and not complete(new[row])]
        cache = out.cache
        cache.batch_select_indices(torch.tensor(going, dtype=torch.long, device=model.device))
        sequences = out.sequences[going]
        mask = torch.cat([mask, torch.ones_like(fresh)], dim=1)[going]
        rows = [rows[position] for position in going]
    return new, [torch.cat(steps) if output_logits else None for steps in logits]


@dataclass(frozen=True)
class Batch:
    """One batch of prompts: their indices, greedy answers (empty without decoding), each row's per-step logits (when
    asked for: `_decode`), each prompt's continuations' summed log-probabilities, and the seconds the answers took
    (scoring aside)."""

    indices: list[int]
    answers: list[str]
    logits: list[Any]
    logprobs: list[list[float]]
    answer_seconds: float


def decoded_answer(tokenizer, ids: list[int]) -> str:
    """The text of answer token `ids`, without the bytes of a character the token budget cut short (which decode to
    U+FFFD): the served answer, and the evaluated one."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def answer_text(tokenizer, ids: list[int], stops: list[int], answer_end: AnswerEnd | None) -> str:
    """The answer that generated token `ids` give (`decoded_answer`): up to the first stop token, cut where
    `answer_end` finds it complete."""
    text = decoded_answer(tokenizer, _cut_at_stop(ids, stops)).strip()
    return answer_end.cut(text) if answer_end else text


def prompt_batches(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_tokens: int,
                   continuations: list[list[list[int]]] | None = None, output_logits: bool = False,
                   answer_end: AnswerEnd | None = None) -> Iterator[Batch]:
    """Greedy answers to `prompts` (token ids) and the log-likelihood of `continuations` (token ids scored right
    after each prompt), with one pass over each prompt for both.

    Rows are batched longest first (little padding), as many as `batch_tokens` holds (each counted as its prompt
    plus `max_new_tokens`: `token_chunks`), left-padded; the tokens all prompts start with run once (`shared_prefix`),
    and each batch continues from a copy of their cache. A batch with continuations runs its prompts first, scores
    every continuation after a copy of that KV cache (`continuation_logprobs`), then decodes from the same cache;
    without, decoding runs the prompts itself. Decoding drops the rows whose answers ended as it goes (`_decode`):
    at a stop token, or where `answer_end` (of the text so far) finds the answer complete, and cut there.
    `max_new_tokens` 0 only scores.
    """
    stops = stop_token_ids(model, tokenizer)
    pad_id = pad_id_of(tokenizer, stops[0])

    def complete(ids: list[int]) -> bool:
        return answer_end is not None and answer_end(answer_text(tokenizer, ids, stops, None)) is not None

    prefix = shared_prefix(model, prompts)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    for indices in token_chunks(order, [len(ids) + max_new_tokens for ids in prompts], batch_tokens):
        started = time.perf_counter()
        ids, mask = prompt_batch([prompts[i] for i in indices], pad_id, prefix)
        wanted = [continuations[i] for i in indices] if continuations else []
        if any(wanted):
            cache, logprobs, scoring = _prompts_then_continuations(model, ids, mask, prefix, wanted)
        else:
            cache, logprobs, scoring = prefix.cache_for(len(indices)) if prefix else None, [[]] * len(indices), 0.0
        answers, logits = [""] * len(indices), [None] * len(indices)
        if max_new_tokens:
            new_tokens, logits = _decode(model, ids, mask, cache, max_new_tokens=max_new_tokens, stops=stops,
                                         pad_id=pad_id, output_logits=output_logits, complete=complete)
            answers = [answer_text(tokenizer, seq, stops, answer_end) for seq in new_tokens]
        yield Batch(indices, answers, logits, logprobs, time.perf_counter() - started - scoring)


def _prompts_then_continuations(model, ids, mask, prefix: SharedPrefix | None, continuations: list[list[list[int]]]):
    """(the KV cache of every prompt but its last token, ready for decoding; each prompt's continuations' summed
    log-probabilities; the seconds scoring them took). Positions are given explicitly, so padding changes nothing."""
    import torch

    skip = len(prefix.ids) if prefix else 0
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=ids[:, skip:].to(model.device), attention_mask=mask.to(model.device),
                    position_ids=positions[:, skip:].to(model.device), use_cache=True, logits_to_keep=1,
                    cache=prefix.cache_for(len(ids)) if prefix else None)
    started = time.perf_counter()
    first = out.logits[:, -1].float().log_softmax(-1)
    logprobs = continuation_logprobs(model, out.cache, mask, first, continuations)
    scoring = time.perf_counter() - started
    if not out.cache.is_croppable:  # decoding runs the prompts again
        return (prefix.cache_for(len(ids)) if prefix else None), logprobs, scoring
    out.cache.crop(-1)  # decoding starts by running the last prompt token
    return out.cache, logprobs, scoring


def _rows_of(cache, index):
    """A cache holding the rows `index` of `cache`, which stays as it is."""
    picked = copy.copy(cache)
    picked.layers = [copy.copy(layer) for layer in cache.layers]
    picked.batch_select_indices(index)
    return picked


def continuation_logprobs(model, cache, attention, first, continuations: list[list[list[int]]]) -> list[list[float]]:
    """For each prompt of a batch (its KV `cache`, `attention` mask and the log-probabilities `first` of the token
    after it), the summed log-probability of each of its continuations: its `option_tree` in one sequence after a
    copy of its cache (`_options_in_one_row`), so a start several continuations share (`{"category": "` before every
    label, `card_` before some) runs once. The prompts go in batches of about SCORING_TOKENS of memory: their copied
    KV cache, and LOGITS_COST per token run (its log-probabilities over the whole vocabulary), so many labels after
    long prompts stay within it."""
    import torch

    trees = [option_tree(options) for options in continuations]
    cost = [attention.shape[1] + LOGITS_COST * len(tree.nodes) for tree in trees]
    values: list[list[float]] = [[] for _ in continuations]
    for chunk in token_chunks(sorted(range(len(trees)), key=lambda i: -cost[i]), cost, SCORING_TOKENS):
        index = torch.tensor(chunk, dtype=torch.long)
        steps = first[index.to(first.device)].unsqueeze(1)
        if any(trees[i].nodes for i in chunk):
            later = _options_in_one_row(model, _rows_of(cache, index.to(model.device)), attention[index],
                                        [trees[i] for i in chunk])
            steps = torch.cat([steps, later.to(first.device)], dim=1)
        for row, i in enumerate(chunk):
            values[i] = _summed(steps[row], continuations[i], trees[i])
    return values


@dataclass(frozen=True)
class OptionTree:
    """A prompt's continuations as a tree of the tokens they run (each but its last): `nodes` (depth, token, parent
    node or -1), parents first, each start the options share once (`card_` before `card_arrival` and `card_linking`);
    `paths`, the nodes each option runs through in order."""

    nodes: list[tuple[int, int, int]]
    paths: list[list[int]]


def option_tree(options: list[list[int]]) -> OptionTree:
    """The `OptionTree` of `options`."""
    nodes: list[tuple[int, int, int]] = []
    found: dict[tuple[int, int], int] = {}  # (parent, token) -> node: a long reference costs its length, not its square
    paths = []
    for option in options:
        path: list[int] = []
        for depth, token in enumerate(option[:-1]):
            parent = path[-1] if path else -1
            if (parent, token) not in found:
                found[parent, token] = len(nodes)
                nodes.append((depth, token, parent))
            path.append(found[parent, token])
        paths.append(path)
    return OptionTree(nodes, paths)


def _sees(tree: OptionTree, size: int):
    """Which nodes each node of `tree` sees (itself and its ancestors), a size × size matrix (padding sees nothing)."""
    import numpy as np

    seen = np.zeros((size, size), dtype=bool)
    for number, (_, _, parent) in enumerate(tree.nodes):
        if parent >= 0:
            seen[number] = seen[parent]
        seen[number, number] = True
    return seen


def _options_in_one_row(model, cache, attention, trees: list[OptionTree]):
    """The next token's log-probabilities after each node of each prompt's `OptionTree`, all of a prompt's nodes in
    one sequence after its `cache`: a 4D mask lets each node see the prompt and its own ancestors only, and its
    position is its depth after the prompt."""
    import numpy as np
    import torch

    ids, _ = pad([[token for _, token, _ in tree.nodes] or [0] for tree in trees], 0, left=False)
    depths, _ = pad([[depth for depth, _, _ in tree.nodes] or [0] for tree in trees], 0, left=False)
    own = torch.from_numpy(np.stack([_sees(tree, ids.shape[1]) for tree in trees]))
    seen = torch.cat([attention.bool().unsqueeze(1).expand(-1, ids.shape[1], -1), own], dim=2)
    blocked = torch.zeros(seen.shape, dtype=model.dtype).masked_fill_(~seen, torch.finfo(model.dtype).min)
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device), attention_mask=blocked.unsqueeze(1).to(model.device),
                       position_ids=(attention.sum(dim=1).view(-1, 1) + depths).to(model.device),
                       cache=cache).logits
    return logits.float().log_softmax(-1)


def _summed(steps, options: list[list[int]], tree: OptionTree) -> list[float]:
    """Each option's summed log-probability, from `steps`: the first token's distribution, then one after each node
    of `tree`."""
    import torch

    positions = [at for path in tree.paths for at in (0, *(node + 1 for node in path))]
    owners = [number for number, option in enumerate(options) for _ in option]
    picked = steps[torch.tensor(positions), torch.tensor([token for option in options for token in option])]
    return torch.zeros(len(options)).index_add_(0, torch.tensor(owners), picked.float()).tolist()


def greedy_batches(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_tokens: int,
                   output_logits: bool = False) -> Iterator[Batch]:
    """`prompt_batches` of greedy answers to chat `prompts`."""
    yield from prompt_batches(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompts],
                              max_new_tokens=max_new_tokens, batch_tokens=batch_tokens, output_logits=output_logits)


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_tokens: int,
             progress: Progress | None = None, each_batch: Callable[[Batch], None] | None = None) -> list[str]:
    """Greedy answers to chat `prompts` (in order), batched by `batch_tokens` with left padding (`greedy_batches`);
    `each_batch(batch)`, then `progress(done, total)`, per batch."""
    return answers_and_logprobs(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_tokens=batch_tokens,
                                progress=progress, each_batch=each_batch).answers


@dataclass(frozen=True)
class Answered:
    """`answers_and_logprobs`'s results, in prompt order."""

    answers: list[str]
    logprobs: list[list[float]]
    answer_seconds: float


def answers_and_logprobs(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_tokens: int,
                         continuations: list[list[list[int]]] | None = None, answer_end: AnswerEnd | None = None,
                         progress: Progress | None = None,
                         each_batch: Callable[[Batch], None] | None = None) -> Answered:
    """Greedy answers to chat `prompts` (each ending where `answer_end` finds it complete, if given) and the summed
    log-probability of each prompt's `continuations` (token ids right after its prompt), one pass over each prompt for
    both (`prompt_batches`); `each_batch(batch)`, then `progress(done, total)`, per batch."""
    answers: list[str] = [""] * len(prompts)
    logprobs: list[list[float]] = [[] for _ in prompts]
    done, seconds = 0, 0.0
    for batch in prompt_batches(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompts],
                                max_new_tokens=max_new_tokens, batch_tokens=batch_tokens, continuations=continuations,
                                answer_end=answer_end):
        for position, index in enumerate(batch.indices):
            answers[index], logprobs[index] = batch.answers[position], batch.logprobs[position]
        done, seconds = done + len(batch.indices), seconds + batch.answer_seconds
        if each_batch:
            each_batch(batch)
        if progress:
            progress(done, len(prompts))
    return Answered(answers, logprobs, seconds)


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
