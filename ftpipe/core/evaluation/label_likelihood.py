"""Label log-likelihood for classification: rank the task's labels by the model's log-likelihood of each as the start
of its answer (lm-evaluation-harness's multiple-choice `acc`), so a model that does not follow the answer format
still gets a meaningful score; and constrained decoding: answer with the label set's likeliest complete answer, so
no made-up label is ever returned."""

from __future__ import annotations

from ftpipe.core.evaluation.generation import continuation_logprobs, encode, prompt_ids, stop_token_ids
from ftpipe.core.evaluation.metrics import LabelChoices

SENTINEL = "<<ftpipe-answer>>"


def likeliest(model, tokenizer, prompt: list[dict], continuations: list[list[int]]) -> int:
    """The index of the continuation (token ids) with the highest summed log-probability after the chat `prompt`."""
    logprobs = continuation_logprobs(model, prompt_ids(tokenizer, prompt), continuations)
    return max(range(len(logprobs)), key=logprobs.__getitem__)


def ranked_labels(model, tokenizer, prompts: list[list[dict]], choices: LabelChoices) -> list[str]:
    """Each row's label whose candidate answer has the highest summed log-probability given the row's prompt."""
    return [choices.names[likeliest(model, tokenizer, prompt, [encode(tokenizer, text) for text in candidates])]
            for prompt, candidates in zip(prompts, choices.candidates)]


def label_likelihood_correct(model, tokenizer, prompts: list[list[dict]], choices: LabelChoices) -> list[float]:
    """Per row, 1.0 when the top-ranked label is the expected one."""
    ranked = ranked_labels(model, tokenizer, prompts, choices)
    return [float(label == expected) for label, expected in zip(ranked, choices.expected)]


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
