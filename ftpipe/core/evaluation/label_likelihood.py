"""Label log-likelihood for classification: rank the task's labels by the model's log-likelihood of each as the start
of its answer (lm-evaluation-harness's multiple-choice `acc`), so a model that does not follow the answer format
still gets a meaningful score; and constrained decoding: answer with the label set's likeliest complete answer, so
no made-up label is ever returned."""

from __future__ import annotations

from ftpipe.core.evaluation.generation import answers_and_logprobs, encode, stop_token_ids
from ftpipe.core.evaluation.metrics import LabelChoices

SENTINEL = "<<ftpipe-answer>>"
BATCH_TOKENS = 8192  # prompt tokens of one batch (its continuations run in batches of their own)


def prompts_logprobs(model, tokenizer, prompts: list[list[dict]],
                     continuations: list[list[list[int]]]) -> list[list[float]]:
    """For each chat prompt, the summed log-probability of each of its continuations (token ids), all of a
    prompt's continuations after one pass over it; the tokens all prompts start with (a long system prompt, few-shot
    examples) run once (`prompt_batches`)."""
    return answers_and_logprobs(model, tokenizer, prompts, max_new_tokens=0, batch_tokens=BATCH_TOKENS,
                                continuations=continuations).logprobs


def top_label_correct(choices: LabelChoices, logprobs: list[float]) -> list[float]:
    """Per row, 1.0 when its likeliest candidate is its expected label; `logprobs` has one per candidate, row by
    row."""
    scores = iter(logprobs)
    correct = []
    for candidates, expected in zip(choices.candidates, choices.expected):
        row = [next(scores) for _ in candidates]
        correct.append(float(choices.names[row.index(max(row))] == expected))
    return correct


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """The token ids the chat template writes right after an assistant message, up to and including the first stop
    token: what makes an answer complete (so a label that starts another label is not favoured)."""
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": SENTINEL}],
                                         tokenize=False)
    ids = encode(tokenizer, turn[turn.rindex(SENTINEL) + len(SENTINEL):])
    stops = stop_token_ids(model, tokenizer)
    return next((ids[: i + 1] for i, token in enumerate(ids) if token in stops), ids)


def whole_answers(model, tokenizer, labels: list[str]) -> list[list[int]]:
    """The token ids of each of `labels` as a whole answer, end of turn included."""
    if not labels:
        raise ValueError("constrained answers need at least one label")
    ending = end_of_turn_ids(model, tokenizer)
    return [encode(tokenizer, label) + ending for label in labels]


def likeliest(labels: list[str], logprobs: list[float]) -> str:
    """The label of the highest log-probability (the first of equals)."""
    return labels[logprobs.index(max(logprobs))]


def constrained_answers(model, tokenizer, prompts: list[list[dict]], labels: list[str]) -> list[str]:
    """Each chat prompt's answer, always one of `labels` (complete answers, e.g. `label_answers` of the task's
    metrics): the one the model gives the highest log-likelihood as its whole answer, end of turn included."""
    options = whole_answers(model, tokenizer, labels)
    return [likeliest(labels, found) for found in prompts_logprobs(model, tokenizer, prompts, [options] * len(prompts))]
