"""Evaluation of a fine-tuned model against its base, split by concern:

- `generation`: model loading (base, adapter or full fine-tune), batched greedy decoding, answer log-likelihoods
  (shared with merging and chat);
- `metrics`: one entry per task type (classification, extraction, generation), with checkable final answers;
- `fewshot`, `label_likelihood`: the few-shot baseline, label ranking by log-likelihood and answers constrained to
  the label set (also for serving);
- `statistics`, `forgetting`, `gate`: bootstrap intervals, forgetting on the general-skills probe, the gate;
- `preference`: preference accuracy on held-out preference pairs (base, SFT and final model);
- `review`, `review_page`, `judge`: the blind human review and its verdicts, and the LLM judge;
- `outputs`, `measurements`, `report`, `chart`, `card`, `run`: each model's outputs (base cached), metrics.json,
  report.md and its chart of gains and forgetting, the model card's evaluation section, and the entry points below.
"""

from ftpipe.core.evaluation.gate import GATE_FIELDS, decide_gate, waiting_for_reviews
from ftpipe.core.evaluation.label_likelihood import constrained_answers
from ftpipe.core.evaluation.review import Verdicts, read_verdicts, write_review_sample
from ftpipe.core.evaluation.run import (
    evaluation_key, finetuned_row_scores, read_evaluation, run_evaluation, select_rows,
)

__all__ = ["GATE_FIELDS", "Verdicts", "constrained_answers", "decide_gate", "evaluation_key", "finetuned_row_scores",
           "read_evaluation", "read_verdicts", "run_evaluation", "select_rows", "waiting_for_reviews",
           "write_review_sample"]
