"""The copy baseline of free-text tasks: each held-out row's user message cut to the length of a typical answer.

ROUGE and token F1 reward words shared with the reference, and a summary or rewrite shares many with its input: the
input's opening can outscore a fine-tuned model while saying nothing new. The report scores that copy beside the
models, so a gain over the base that does not beat copying is seen as such."""

from __future__ import annotations

from statistics import median

from ftpipe.core.evaluation.outputs import ModelOutputs
from ftpipe.core.records import user_message
from ftpipe.core.text import loose_words

MIN_WORDS = 5  # shorter typical answers (a word, a name) are no text a copy could stand in for


def answer_words(texts: list[str]) -> float:
    """The mean number of words of `texts` (`loose_words`: a character of Chinese or Japanese is a word)."""
    return sum(len(loose_words(text)) for text in texts) / len(texts) if texts else 0.0


def typical_answer_words(train_rows: list[dict], heldout_rows: list[dict]) -> int:
    """The median word count of the train rows' answers (of the held-out references when there are no train rows)."""
    rows = train_rows or heldout_rows
    return max(1, round(median(len(loose_words(row["messages"][-1]["content"])) for row in rows)))


def opening(text: str, words: int) -> str:
    """The longest start of `text` with at most `words` words, as written."""
    fits, too_long = 0, len(text) + 1
    while too_long - fits > 1:  # bisection: a longer start never has fewer words
        middle = (fits + too_long) // 2
        fits, too_long = (middle, too_long) if len(loose_words(text[:middle])) <= words else (fits, middle)
    return text[:fits].strip()


def copy_outputs(heldout_rows: list[dict], train_rows: list[dict]) -> ModelOutputs | None:
    """The first `typical_answer_words` words of each held-out row's (last) user message, as a model's answers; None
    when a typical answer has fewer than MIN_WORDS words."""
    words = typical_answer_words(train_rows, heldout_rows)
    if words < MIN_WORDS:
        return None
    answers = [opening(user_message(row["messages"]), words) for row in heldout_rows]
    return ModelOutputs(ids=[row["id"] for row in heldout_rows], answers=answers, prompt_tokens=0.0)
