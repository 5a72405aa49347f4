"""The training's evaluation pass on rows that share a long system prompt (a task's instructions): ftpipe's trainer
runs the shared start once an evaluation, against TRL's own evaluation step over every whole row, on the same trainer,
adapter and rows, the two sides alternating. Prints each side's median seconds and eval loss, and the ratio.

    python bench/eval_loss.py                                  # the tiny random model: runs anywhere in a minute
    python bench/eval_loss.py --model <resolved base folder>   # e.g. the demo's SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ftpipe.core.evaluation.generation import encode
from ftpipe.core.storage import REPO_ROOT
from ftpipe.core.training import shared_start

sys.path.insert(0, str(REPO_ROOT))  # the test helpers build the workspace and the trainer
from ftpipe_tests.tiny_model import build_tiny_model, long_system_prompt, toy_rows, with_system  # noqa: E402
from ftpipe_tests.training_program import evaluating_trainer, toy_workspace  # noqa: E402

RULES = 24  # sentences of the system prompt: about 450 SmolLM2 tokens (8 for the tiny model's 512-token context)
SHARED_TOKENS = shared_start.MIN_SHARED_TOKENS


def rows_with_system_prompt(count: int, rules: int) -> list[dict]:
    system = long_system_prompt(rules)
    return [{**row, "messages": with_system(row["messages"], system)} for row in toy_rows(count, seed=9)]


def timed(trainer, whole_rows: bool) -> tuple[float, float]:
    """(seconds, eval loss) of one evaluation, the shared start run once or (`whole_rows`) every row by TRL."""
    shared_start.MIN_SHARED_TOKENS = 10**9 if whole_rows else SHARED_TOKENS
    started = time.perf_counter()
    loss = trainer.evaluate()["eval_loss"]
    return time.perf_counter() - started, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a base model dir (safetensors + tokenizer); default: tiny model")
    parser.add_argument("--rows", type=int, default=64, help="eval rows")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = args.model or build_tiny_model(root / "tiny")
        rows = rows_with_system_prompt(args.rows, RULES if args.model else 8)
        trainer = evaluating_trainer(toy_workspace(root / "workspace", base), "bench", rows, max_length=1024)
        tokenizer = trainer.processing_class
        tokens = encode(tokenizer, tokenizer.apply_chat_template(rows[0]["messages"][:1], tokenize=False))
        print(f"evaluation of {args.rows} rows whose system prompt is {len(tokens)} tokens, base "
              f"{args.model or 'tiny random model'}, eval batches of {trainer.args.per_device_eval_batch_size}")
        sides = {"shared start once": [], "every row whole (TRL)": []}
        for _ in range(args.repeats):
            for name, whole in zip(sides, (False, True)):
                sides[name].append(timed(trainer, whole))
    medians = {name: statistics.median(seconds for seconds, _ in runs) for name, runs in sides.items()}
    for name, runs in sides.items():
        print(f"  {name:<22} {medians[name]:7.2f} s, eval loss {runs[0][1]:.6f}")
    shared, whole = medians.values()
    print(f"  the shared start once: {whole / shared:.2f}x faster")


if __name__ == "__main__":
    main()
