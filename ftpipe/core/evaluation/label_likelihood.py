"""Label log-likelihood for classification: rank the task's labels by the model's log-likelihood of each as the start
of its answer (lm-evaluation-harness's multiple-choice `acc`), so a model that does not follow the answer format
still gets a meaningful score; and constrained decoding: answer with the label set's likeliest complete answer, so
no made-up label is ever returned."""

from __future__ import annotations

import json

from ftpipe.core.evaluation.generation import (
    encode, prompt_ids, rows_logprobs, shared_prefix, stop_token_ids, token_chunks,
)
from ftpipe.core.evaluation.metrics import LabelChoices

SENTINEL = "<<ftpipe-answer>>"
BATCH_TOKENS = 8192  # KV cache tokens of one batch of prompts (about 0.4 GB for SmolLM2-135M)
LOGITS_COST = 8  # KV cache tokens a continuation token counts as: its log-probabilities over the whole vocabulary


def prompts_logprobs(model, prompts: list[list[int]], continuations: list[list[list[int]]]) -> list[list[float]]:
    """For each prompt (token ids), the summed log-probability of each of its continuations (token ids); the tokens
    all prompts start with (a long system prompt, few-shot examples) run once, and the prompts in batches of about
    BATCH_TOKENS tokens of memory: a copy of the prompt's KV cache per continuation, and LOGITS_COST per continuation
    token (many labels after short prompts stay within the budget)."""
    prefix = shared_prefix(model, prompts)
    cached = [len(prompt) * len(options) + LOGITS_COST * sum(map(len, options))
              for prompt, options in zip(prompts, continuations)]
    found: list[list[float]] = [[] for _ in prompts]
    for rows in token_chunks(sorted(range(len(prompts)), key=lambda i: -cached[i]), cached, BATCH_TOKENS):
        for row, values in zip(rows, rows_logprobs(model, [prompts[i] for i in rows],
                                                   [continuations[i] for i in rows], prefix)):
            found[row] = values
    return found


def candidate_logprobs(model, tokenizer, candidates: list[tuple[list[dict], str]]) -> list[float]:
    """The summed log-probability of each (chat prompt, candidate answer) pair's candidate as the start of the
    prompt's answer; the candidates of one prompt share one pass over it."""
    by_prompt: dict[str, list[int]] = {}
    for index, (prompt, _) in enumerate(candidates):
        by_prompt.setdefault(json.dumps(prompt, sort_keys=True), []).append(index)
    groups = list(by_prompt.values())
    found = prompts_logprobs(model, [prompt_ids(tokenizer, candidates[group[0]][0]) for group in groups],
                             [[encode(tokenizer, candidates[i][1]) for i in group] for group in groups])
    logprobs = [0.0] * len(candidates)
    for group, values in zip(groups, found):
        for index, logprob in zip(group, values):
            logprobs[index] = logprob
    return logprobs


def top_label_correct(choices: LabelChoices, logprobs: list[float]) -> list[float]:
    """Per row, 1.0 when its likeliest candidate is its expected label; `logprobs` has one per candidate, row by
    row (the order of `label_candidates`)."""
    scores = iter(logprobs)
    correct = []
    for candidates, expected in zip(choices.candidates, choices.expected):
        row = [next(scores) for _ in candidates]
        correct.append(float(choices.names[row.index(max(row))] == expected))
    return correct


def label_candidates(prompts: list[list[dict]], choices: LabelChoices) -> list[tuple[list[dict], str]]:
    """(prompt, candidate answer) for every candidate of every row, row by row."""
    return [(prompt, text) for prompt, candidates in zip(prompts, choices.candidates) for text in candidates]


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """The token ids the chat template writes right after an assistant message, up to and including the first stop
    token: what makes an answer complete (so a label that starts another label is not favoured)."""
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": SENTINEL}],
                                         tokenize=False)
    ids = encode(tokenizer, turn[turn.rindex(SENTINEL) + len(SENTINEL):])
    stops = stop_token_ids(model, tokenizer)
    return next((ids[: i + 1] for i, token in enumerate(ids) if token in stops), ids)


def constrained_answers(model, tokenizer, prompts: list[list[dict]], labels: list[str]) -> list[str]:
    """Each chat prompt's answer, always one of `labels` (complete answers, e.g. `label_answers` of the task's
    metrics): the one the model gives the highest log-likelihood as its whole answer, end of turn included."""
    if not labels:
        raise ValueError("constrained answers need at least one label")
    ending = end_of_turn_ids(model, tokenizer)
    continuations = [encode(tokenizer, label) + ending for label in labels]
    found = prompts_logprobs(model, [prompt_ids(tokenizer, prompt) for prompt in prompts],
                             [continuations] * len(prompts))
    return [labels[logprobs.index(max(logprobs))] for logprobs in found]
