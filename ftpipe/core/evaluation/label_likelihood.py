"""Label log-likelihood for classification: rank the task's labels by the model's log-likelihood of each as the start
of its answer (lm-evaluation-harness's multiple-choice `acc`), so a model that does not follow the answer format
still gets a meaningful score; and constrained decoding: answer with the label set's likeliest complete answer, so
no made-up label is ever returned."""

from __future__ import annotations

import json

from ftpipe.core.evaluation.generation import continuation_logprobs, encode, prompt_ids, stop_token_ids
from ftpipe.core.evaluation.metrics import LabelChoices

SENTINEL = "<<ftpipe-answer>>"


def likeliest(model, tokenizer, prompt: list[dict], continuations: list[list[int]]) -> int:
    """The index of the continuation (token ids) with the highest summed log-probability after the chat `prompt`."""
    logprobs = continuation_logprobs(model, prompt_ids(tokenizer, prompt), continuations)
    return max(range(len(logprobs)), key=logprobs.__getitem__)


def candidate_logprobs(model, tokenizer, candidates: list[tuple[list[dict], str]]) -> list[float]:
    """The summed log-probability of each (chat prompt, candidate answer) pair's candidate as the start of the
    prompt's answer; the candidates of one prompt share one pass over it."""
    by_prompt: dict[str, list[int]] = {}
    for index, (prompt, _) in enumerate(candidates):
        by_prompt.setdefault(json.dumps(prompt, sort_keys=True), []).append(index)
    logprobs = [0.0] * len(candidates)
    for indices in by_prompt.values():
        prompt = prompt_ids(tokenizer, candidates[indices[0]][0])
        found = continuation_logprobs(model, prompt, [encode(tokenizer, candidates[i][1]) for i in indices])
        for index, logprob in zip(indices, found):
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
    return [labels[likeliest(model, tokenizer, prompt, continuations)] for prompt in prompts]
