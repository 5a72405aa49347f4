"""Answers that stop where the task type finds them complete (`TaskMetrics.answer_end`) against answers that stop
only at the end of the turn, side by side, alternating, on the demo's held-out tickets; the scores of both must be
the same. Two shapes:

- JSON and then a reason: each ticket after three train tickets answered with the demo's JSON and a sentence on why
  (as data with a rationale after the answer teaches a model to write); generation stops at the closing brace.
- A bare label: the ticket's category as the whole answer, asked zero-shot of the base model, which talks instead;
  generation stops once the answer can no longer become one of the labels.

    python bench/answer_end.py --model .ftpipe/models/<fingerprint> \\
        --split .ftpipe/tasks/ticket_triage/heldout_split

Prints the seconds of each way, the ratio, the tokens generated, and whether every metric agrees.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.generation import answers_and_logprobs, encode, load_model
from ftpipe.core.evaluation.metrics import task_metrics
from ftpipe.core.evaluation.metrics.base import first_json_object
from ftpipe.core.evaluation.metrics.classification import STOPPED
from ftpipe.core.records import read_examples

SHOTS = 3
JSON_AND_REASON = 'Triage the ticket. Reply with JSON: {"category": ..., "priority": ...}, then say why.'
BARE_LABEL = "Reply with the ticket's category only: billing, technical, account, shipping or feature_request."


def with_reason(answer: str) -> str:
    """A train row's JSON answer followed by a sentence on why."""
    found = first_json_object(answer)
    return (f"{answer} The customer writes about a {found['category'].replace('_', ' ')} matter, and its priority is "
            f"{found['priority']} given how urgent the ticket sounds.")


def json_and_reason(split: Path, rows: int) -> tuple[list[list[dict]], list[str]]:
    """(prompts, references) of the first `rows` held-out rows, each after SHOTS train rows answered with a reason."""
    shots = [message for row in read_examples(split / "train.parquet")[:SHOTS] for message in
             (row["messages"][-2], {"role": "assistant", "content": with_reason(row["messages"][-1]["content"])})]
    heldout = read_examples(split / "eval.parquet")[:rows]
    return ([[{"role": "system", "content": JSON_AND_REASON}, *shots, row["messages"][-2]] for row in heldout],
            [row["messages"][-1]["content"] for row in heldout])


def bare_label(split: Path, rows: int) -> tuple[list[list[dict]], list[str]]:
    """(prompts, references) of the first `rows` held-out rows with the category alone as the answer."""
    heldout = read_examples(split / "eval.parquet")[:rows]
    return ([[{"role": "system", "content": BARE_LABEL}, row["messages"][-2]] for row in heldout],
            [first_json_object(row["messages"][-1]["content"])["category"] for row in heldout])


def side_by_side(model, tokenizer, shape: str, prompts: list[list[dict]], references: list[str],
                 config: EvaluationConfig, args: argparse.Namespace) -> None:
    task = task_metrics(config)

    def answer(answer_end):
        started = time.perf_counter()
        done = answers_and_logprobs(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                    batch_tokens=args.batch_tokens, answer_end=answer_end)
        return done.answers, time.perf_counter() - started

    runs: dict[str, list] = {"where complete": [], "at the end of the turn": []}
    for _ in range(args.repeats):
        runs["where complete"].append(answer(task.answer_end(references)))
        runs["at the end of the turn"].append(answer(None))
    (stopped, _), (whole, _) = (done[0] for done in runs.values())
    seconds = {name: statistics.median(s for _, s in done) for name, done in runs.items()}
    tokens = {name: sum(len(encode(tokenizer, a)) for a in done[0][0]) for name, done in runs.items()}
    same = task.scores(stopped, references).summary == task.scores(whole, references).summary
    prefixes = sum(full.startswith(cut.removesuffix(STOPPED)) for cut, full in zip(stopped, whole))
    print(f"{shape}: {len(prompts)} held-out prompts, {args.max_new_tokens} new tokens max, median of {args.repeats}")
    for name in runs:
        print(f"  stopping {name:<24} {seconds[name]:7.2f} s  {tokens[name]:6d} answer tokens")
    print(f"  ratio: {seconds['at the end of the turn'] / seconds['where complete']:.2f}x; answers cut short "
          f"{sum(cut != full for cut, full in zip(stopped, whole))}/{len(prompts)}, each the start of the whole one "
          f"{prefixes}/{len(prompts)}; same scores: {same}"
          + ("" if same and prefixes == len(prompts) else "  <-- MISMATCH"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model dir (safetensors + tokenizer)")
    parser.add_argument("--split", type=Path, required=True, help="a heldout_split folder (train and eval rows)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="evaluation.batch_tokens")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    side_by_side(model, tokenizer, f"JSON and then a reason ({SHOTS} such answers before)",
                 *json_and_reason(args.split, args.rows),
                 EvaluationConfig(task_type="classification", label_field="category"), args)
    side_by_side(model, tokenizer, "a bare label, zero-shot", *bare_label(args.split, args.rows),
                 EvaluationConfig(task_type="classification"), args)


if __name__ == "__main__":
    main()
