"""LLM-as-judge: a chat model behind any OpenAI-compatible endpoint compares the base model's and the fine-tuned
model's answers to the same held-out request, blind (as answers A and B, no model named) and in both orders. A pair
is a win or a loss only when both orders agree, so a judge that favours a position yields ties, not wins."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ftpipe.config import JudgeConfig
from ftpipe.core.evaluation.review import BASELINE, CANDIDATE, review_rows
from ftpipe.core.evaluation.statistics import pairwise_summary

SEED = 0  # the rows a human review sample with the default seed takes, so both can be compared
WORKERS = 8  # requests in flight
TIMEOUT_S = 120.0
INSTRUCTIONS = (
    "You compare two answers to the same request and decide which one answers it better: correct, complete and "
    "following the request's instructions. The reference answer shows what a good answer contains. Reply with "
    "exactly one word: A, B, or tie."
)
CHOICES = {"a": "A", "b": "B", "tie": "tie"}


def judge_messages(record: dict[str, Any], first: str, second: str) -> list[dict[str, str]]:
    """The judge's chat request on one order of a pair: the whole prompt, the reference, answers A and B."""
    request = (f"Request:\n{record['prompt']}\n\nReference answer:\n{record['reference']}\n\n"
               f"Answer A:\n{first}\n\nAnswer B:\n{second}\n\nWhich answer is better: A, B, or tie?")
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": request}]


def parse_choice(reply: str) -> str | None:
    """`A`, `B` or `tie`: the reply's first word, case and punctuation aside; None for any other reply."""
    words = reply.split()
    return CHOICES.get(words[0].strip("*_.,:;!\"'()[]").lower()) if words else None


def combine(new_as_b: str | None, new_as_a: str | None) -> str:
    """The new model's outcome from both orders (first it is answer B, then answer A): a win or a loss only when
    both orders agree, else a tie."""
    return {("B", "A"): "win", ("A", "B"): "loss"}.get((new_as_b, new_as_a), "tie")


def missing_key(judge: JudgeConfig | None) -> str | None:
    """Why `judge` cannot be asked from this process (the variable naming its key is not set); None when it can."""
    if judge is not None and judge.api_key_env and not os.environ.get(judge.api_key_env):
        return f"evaluation.judge.api_key_env: environment variable {judge.api_key_env} is not set"
    return None


def judge_client(judge: JudgeConfig):
    """An `openai.OpenAI` client on the judge's endpoint, with the key from the environment variable it names."""
    from openai import OpenAI

    if problem := missing_key(judge):
        raise ValueError(problem)
    api_key = os.environ[judge.api_key_env] if judge.api_key_env else "none"  # keyless local servers need a value
    return OpenAI(base_url=judge.base_url, api_key=api_key, timeout=TIMEOUT_S)


def ask(client, judge: JudgeConfig, messages: list[dict[str, str]]) -> str:
    """The judge's reply text to one request (temperature 0); an API error names the endpoint and model."""
    from openai import OpenAIError

    try:
        response = client.chat.completions.create(model=judge.model, messages=messages, temperature=0)
    except OpenAIError as exc:
        raise RuntimeError(f"judge {judge.model} at {judge.base_url}: {exc}") from exc
    return response.choices[0].message.content or ""


def judge_outcomes(records: list[dict[str, Any]], judge: JudgeConfig,
                   log: Callable[[str], None]) -> tuple[dict[str, str], int]:
    """({row id: the fine-tuned model's win, tie or loss against the base}, replies that were not A, B or tie) on
    the first `max_pairs` rows of the review order. Each pair is asked in both orders (an unclear reply counts as no
    preference); identical answers are a tie without asking."""
    rows = review_rows(records, judge.max_pairs, SEED)
    asked = [r for r in rows if r[f"{BASELINE}_answer"] != r[f"{CANDIDATE}_answer"]]
    requests = ([judge_messages(r, r[f"{BASELINE}_answer"], r[f"{CANDIDATE}_answer"]) for r in asked]
                + [judge_messages(r, r[f"{CANDIDATE}_answer"], r[f"{BASELINE}_answer"]) for r in asked])
    client = judge_client(judge)
    with ThreadPoolExecutor(WORKERS) as pool:
        choices = [parse_choice(reply) for reply in pool.map(lambda messages: ask(client, judge, messages), requests)]
    log(f"judge {judge.model}: {len(requests)} requests on {len(asked)} of {len(rows)} pairs (the rest identical)")
    outcomes = dict.fromkeys((r["id"] for r in rows), "tie")
    outcomes.update({r["id"]: combine(first, second)
                     for r, first, second in zip(asked, choices[: len(asked)], choices[len(asked):])})
    return outcomes, choices.count(None)


def judge_metrics(records: list[dict[str, Any]], judge: JudgeConfig | None,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """`judge_pairs`, `judge_unclear_replies`, `judge_wins`, `judge_ties`, `judge_losses` and `judge_win_rate` (a
    tie counting half) with its 95% score interval; no pairs (win rate None) without a judge. Each record gets
    its `judge_outcome` (None where not judged)."""
    outcomes, unclear = judge_outcomes(records, judge, log) if judge else ({}, 0)
    if judge:
        for record in records:
            record["judge_outcome"] = outcomes.get(record["id"])
    return {"judge_pairs": len(outcomes), "judge_unclear_replies": unclear,
            **pairwise_summary("judge", list(outcomes.values()))}
