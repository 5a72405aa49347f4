"""Evaluation generation throughput: ftpipe's batched greedy generation (left padding, KV cache) against one
`generate` call per row, side by side on the same prompts; and what answers constrained to a label set cost.

    python bench/eval.py                                   # tiny random model, runs anywhere in about a minute
    python bench/eval.py --model .ftpipe/models/<fingerprint> --rows 32

Prints rows/s of each, the ratio (target >= 4x on CPU), whether the outputs are identical, and rows/s of answers
constrained to --labels labels (`evaluation.constrain_to_labels`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ftpipe.core.evaluation.generation import generate, load_model
from ftpipe.core.evaluation.label_likelihood import constrained_answers
from ftpipe.core.storage import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # the test helpers build the tiny model and the prompts
from ftpipe_tests.tiny_model import build_tiny_model  # noqa: E402
from ftpipe_tests.trained_models import noisy_base, varied_prompts  # noqa: E402


def timed(fn) -> tuple[list[str], float]:
    start = time.perf_counter()
    answers = fn()
    return answers, time.perf_counter() - start


def bench(model_dir: Path, rows: int, batch_size: int, max_new_tokens: int, label_count: int) -> None:
    model, tokenizer = load_model(model_dir)
    prompts = varied_prompts(rows)
    generate(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    batched, batched_s = timed(lambda: generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size))
    single, single_s = timed(lambda: [generate(model, tokenizer, [p], max_new_tokens=max_new_tokens, batch_size=1)[0]
                                      for p in prompts])
    same = sum(a == b for a, b in zip(batched, single))
    print(f"eval generation benchmark: {rows} prompts, {max_new_tokens} new tokens max, model {model_dir}")
    print(f"  batched (batch {batch_size:>3}) {rows / batched_s:8.2f} rows/s  {batched_s:7.2f} s")
    print(f"  one row per call     {rows / single_s:8.2f} rows/s  {single_s:7.2f} s")
    print(f"  ratio batched/single: {single_s / batched_s:.1f}x (target >= 4x on CPU)")
    print(f"  identical outputs: {same}/{rows}" + ("" if same == rows else "  <-- MISMATCH"))
    labels = [f"label_{i:02d}" for i in range(label_count)]
    constrained, constrained_s = timed(lambda: constrained_answers(model, tokenizer, prompts, labels))
    print(f"  constrained to {label_count} labels {rows / constrained_s:8.2f} rows/s  {constrained_s:7.2f} s"
          + ("" if set(constrained) <= set(labels) else "  <-- AN ANSWER OUTSIDE THE LABELS"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model dir (safetensors + tokenizer); default: tiny random model")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--labels", type=int, default=12, help="label set size for constrained answers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or noisy_base(build_tiny_model(Path(tmp) / "tiny"), Path(tmp) / "noisy")
        bench(model_dir, args.rows, args.batch_size, args.max_new_tokens, args.labels)


if __name__ == "__main__":
    main()
