"""Generation: free text. ROUGE-L F1 (primary), SQuAD-style token F1 and exact match, on loose words; when the
task names its final answer (`answer_pattern` or `answer_field`), exact match of the final answers is primary, and a
lenient match beside it reads an answer's last number where it gives no final answer (the base model's, mostly)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.metrics.base import Scores, TaskMetrics, missing_field
from ftpipe.core.evaluation.metrics.final_answer import (
    extract_answer, last_number, same_answer, spaced_freely, uncomputed_final_answer,
)
from ftpipe.core.text import loose

ANSWER_MATCH = "answer_exact_match"
LENIENT_MATCH = "lenient_answer_match"  # the final answer, or an answer's last number where it gives none
FREE_TEXT_NOTE = (
    "ROUGE-L and token F1 count the words an answer shares with its reference: a right answer in other words scores "
    "low, and one that copies words from the message scores high (the copy of the input shows how high). Exact match "
    "of free text stays near 0 for any model. For a verdict on what the answers say, read the blind review page of "
    "`human_review` (its verdicts count with `evaluation.require_human_review`) or set an LLM judge "
    "(`evaluation.judge`).")


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 over loose words."""
    got, want = loose(answer).split(), loose(reference).split()
    if not got or not want:
        return float(got == want)
    overlap = sum((Counter(got) & Counter(want)).values())
    return 0.0 if overlap == 0 else 2 * overlap / (len(got) + len(want))


class _WordTokenizer:
    """Unicode-aware words for rouge_score (its default drops every non-ASCII character)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return loose(text).split()


class Generation(TaskMetrics):
    name = "generation"
    primary = "rouge_l"

    def __init__(self, config: EvaluationConfig):
        super().__init__(config)
        self.checks_answers = bool(config.answer_pattern or config.answer_field)
        if self.checks_answers:
            self.primary = ANSWER_MATCH
        self.compares_to_copy = not self.checks_answers

    def final_answer(self, text: str) -> str | None:
        if not self.checks_answers:
            return None
        return extract_answer(text, self.config.answer_pattern, self.config.answer_field)

    def uncomputed_final_answers(self, references: list[str]) -> list[tuple[int, str, str]]:
        if not self.config.answer_pattern:
            return []
        return [(index, *found) for index, reference in enumerate(references)
                if (found := uncomputed_final_answer(reference, self.config.answer_pattern))]

    def valid_outputs(self, answers: list[str], references: list[str]) -> list[bool]:
        """Where the task names its final answer, whether an answer gives one; else whether it says anything."""
        if not self.checks_answers:
            return super().valid_outputs(answers, references)
        return [self.final_answer(answer) is not None for answer in answers]

    def scores(self, answers: list[str], references: list[str]) -> Scores:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
        pairs = list(zip(answers, references))
        rows = {
            "rouge_l": [scorer.score(r, a)["rougeL"].fmeasure for a, r in pairs],
            "token_f1": [token_f1(a, r) for a, r in pairs],
            "exact_match": [float(loose(a) == loose(r)) for a, r in pairs],
        }
        if not self.checks_answers:
            return Scores(rows=rows)
        finals = [self.final_answer(a) for a in answers]
        wanted = [self.final_answer(r) or "" for r in references]
        lenient = [last_number(a) if f is None else f for f, a in zip(finals, answers)]
        return Scores(rows={ANSWER_MATCH: [float(same_answer(f, w)) for f, w in zip(finals, wanted)],
                            LENIENT_MATCH: [float(same_answer(f, w)) for f, w in zip(lenient, wanted)], **rows},
                      final_answers=finals)

    def report_sections(self, records: list[dict[str, Any]], sides: dict[str, str]) -> list[tuple[str, str]]:
        """Free text: what word-overlap scores cannot say, and where a verdict on the answers comes from."""
        return [] if self.checks_answers else [("Reading free-text scores", FREE_TEXT_NOTE)]

    def reference_problem(self, reference: str) -> str | None:
        if not self.checks_answers or self.final_answer(reference) is not None:
            return None
        if self.config.answer_pattern:
            return self._pattern_problem(reference)
        return missing_field(reference, self.config.answer_field, "evaluation.answer_field")

    def _pattern_problem(self, reference: str) -> str:
        """Why answer_pattern finds no final answer in `reference`, naming the pattern that would where only the
        spacing differs (`####24` for `#### (\\S+)`)."""
        pattern, spaced = self.config.answer_pattern, spaced_freely(self.config.answer_pattern)
        if spaced != pattern and re.search(spaced, reference):
            return f"misses answer_pattern `{pattern}` only by its spacing: answer_pattern `{spaced}` reads it"
        return f"has no final answer matching answer_pattern `{pattern}`"
