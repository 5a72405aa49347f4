"""Answers that stop where the task type finds them complete: held-out prompts whose model writes a JSON answer and
then goes on (a reason), answered with generation stopping at the first object's closing brace
(`TaskMetrics.answer_end`) against stopping only at the end of the turn, side by side, alternating; the scores of
both must be the same.

    python bench/answer_end.py --model .ftpipe/models/<fingerprint> \\
        --split .ftpipe/tasks/ticket_triage/heldout_split

Each prompt is a held-out ticket after three train tickets answered with the demo's JSON and a sentence on why (as
data with a rationale after the answer teaches a model to write). Prints the seconds of each, the ratio, the tokens
generated, and whether the answers' first JSON objects and every metric agree.
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
from ftpipe.core.records import read_examples

SYSTEM = 'Triage the ticket. Reply with JSON: {"category": ..., "priority": ...}, then say why.'
SHOTS = 3


def with_reason(answer: str) -> str:
    """A train row's JSON answer followed by a sentence on why."""
    found = first_json_object(answer)
    return (f"{answer} The customer writes about a {found['category'].replace('_', ' ')} matter, and its priority is "
            f"{found['priority']} given how urgent the ticket sounds.")


def prompts_with_reasons(split: Path, rows: int) -> tuple[list[list[dict]], list[str]]:
    """(prompts, references) of the first `rows` held-out rows, each after SHOTS train rows answered with a reason."""
    shots = [message for row in read_examples(split / "train.parquet")[:SHOTS] for message in
             (row["messages"][-2], {"role": "assistant", "content": with_reason(row["messages"][-1]["content"])})]
    heldout = read_examples(split / "eval.parquet")[:rows]
    return ([[{"role": "system", "content": SYSTEM}, *shots, row["messages"][-2]] for row in heldout],
            [row["messages"][-1]["content"] for row in heldout])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model dir (safetensors + tokenizer)")
    parser.add_argument("--split", type=Path, required=True, help="a heldout_split folder (train and eval rows)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="evaluation.batch_tokens")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    args = parser.parse_args()

    prompts, references = prompts_with_reasons(args.split, args.rows)
    task = task_metrics(EvaluationConfig(task_type="classification", label_field="category"))
    model, tokenizer = load_model(args.model)

    def answer(answer_end):
        started = time.perf_counter()
        done = answers_and_logprobs(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                    batch_tokens=args.batch_tokens, answer_end=answer_end)
        return done.answers, time.perf_counter() - started

    runs: dict[str, list] = {"at the closing brace": [], "at the end of the turn": []}
    for _ in range(args.repeats):
        runs["at the closing brace"].append(answer(task.answer_end()))
        runs["at the end of the turn"].append(answer(None))
    (cut, _), (whole, _) = (done[0] for done in runs.values())
    seconds = {name: statistics.median(s for _, s in done) for name, done in runs.items()}
    tokens = {name: sum(len(encode(tokenizer, a)) for a in done[0][0]) for name, done in runs.items()}
    same_objects = sum(first_json_object(a) == first_json_object(b) for a, b in zip(cut, whole))
    same_scores = task.scores(cut, references).summary == task.scores(whole, references).summary
    print(f"{len(prompts)} held-out prompts after {SHOTS} answers with a reason, {args.max_new_tokens} new tokens max, "
          f"median of {args.repeats}:")
    for name in runs:
        print(f"  stopping {name:<24} {seconds[name]:7.2f} s  {tokens[name]:6d} answer tokens")
    print(f"  ratio: {seconds['at the end of the turn'] / seconds['at the closing brace']:.2f}x; answers with a "
          f"JSON object {sum(first_json_object(a) is not None for a in whole)}/{len(prompts)}; same first object "
          f"{same_objects}/{len(prompts)}; same scores: {same_scores}"
          + ("" if same_objects == len(prompts) and same_scores else "  <-- MISMATCH"))


if __name__ == "__main__":
    main()
