"""How many tokens a generated answer may take. An answer cut off before its end scores as wrong whatever the model
knows, so by default the budget fits the longest held-out reference answer; a budget set shorter is warned about."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_ANSWER_TOKENS = 48
MOST_ANSWER_TOKENS = 4096  # EvaluationConfig.max_new_tokens's upper bound
MIN_HEADROOM = 16  # tokens beyond the longest reference a model may phrase its answer in (or a quarter more)


@dataclass(frozen=True)
class AnswerBudget:
    """The answers' token limit and the held-out reference answers' lengths it was measured against."""

    tokens: int
    reference_tokens: list[int]

    @classmethod
    def of(cls, configured: int | None, references: list[str], tokenizer) -> AnswerBudget:
        """`configured` (evaluation.max_new_tokens) when set; else DEFAULT_ANSWER_TOKENS, or the longest reference
        answer (in `tokenizer`'s tokens) with room to spare when that is longer."""
        lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references]
        if configured is not None:
            return cls(configured, lengths)
        longest = max(lengths, default=0)
        fitted = longest + max(MIN_HEADROOM, longest // 4)
        return cls(min(max(DEFAULT_ANSWER_TOKENS, fitted), MOST_ANSWER_TOKENS), lengths)

    @property
    def cut_off(self) -> int:
        """How many reference answers do not fit."""
        return sum(length > self.tokens for length in self.reference_tokens)

    def metrics(self) -> dict[str, Any]:
        return {"answer_token_limit": self.tokens, "references_over_limit": self.cut_off,
                "longest_reference_tokens": max(self.reference_tokens, default=0)}


def cut_off_warning(metrics: dict[str, Any]) -> str | None:
    """The sentence about reference answers longer than the answers' limit, from an evaluation's metrics; None when
    every one fits (or the evaluation predates the count)."""
    over = metrics.get("references_over_limit")
    if not over:
        return None
    return (f"{over} of {metrics['rows']} reference answers {'is' if over == 1 else 'are'} longer than the answers' "
            f"limit of {metrics['answer_token_limit']} tokens (the longest is {metrics['longest_reference_tokens']}): "
            "every model's answers are cut off there and score as wrong; raise evaluation.max_new_tokens, or leave it "
            "unset to fit the references")
