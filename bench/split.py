"""The held-out split stratified by answer against hash sides of the same groups, side by side.

    python bench/split.py

For each dataset and seed: the eval share (configured 0.15), the labels with no held-out row, and the largest gap
between a label's held-out rows and its share of them, for the split as `assign_sides` makes it and for each group
on the side of its prompt's hash (the split before stratification). Then the time of both on 20k generated rows.
Datasets: the 12 skewed intent labels of the tests (short messages, planted near-duplicates), 24 labels whose
customers ask one of two questions each in random wrapping (groups of up to 40 rows), and 40 labels of 2 to 300
distinct rows.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter

from ftpipe.core import split
from ftpipe.core.storage import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # the tests' generators write the datasets
from ftpipe_tests.intents import intent_task, wrapped_messages  # noqa: E402
from ftpipe_tests.rows import row, sentence  # noqa: E402

FRACTION = 0.15


def skewed(sizes: list[int]) -> list[dict]:
    rng = random.Random(0)
    return [row(sentence(rng, 12), f"label{k}", f"s{k}.{i}") for k, size in enumerate(sizes) for i in range(size)]


def hash_sides(rows: list[dict], seed: int) -> dict[str, str]:
    groups = split.question_groups(rows)
    return {rows[i]["id"]: split.EVAL if position < FRACTION else split.TRAIN
            for group, position in zip(groups, split.group_positions(rows, groups, seed)) for i in group}


def summary(rows: list[dict], sides: dict[str, str]) -> str:
    labels = Counter(r["messages"][-1]["content"] for r in rows)
    held = Counter(r["messages"][-1]["content"] for r in rows if sides[r["id"]] == split.EVAL)
    gap = max(abs(held[label] - FRACTION * count) for label, count in labels.items())
    return (f"share {sum(held.values()) / len(rows):.3f}, {sum(not held[label] for label in labels):>2} of "
            f"{len(labels)} labels without a held-out row, largest gap {gap:4.1f} rows")


def main() -> None:
    datasets = {"12 intent labels": intent_task(1200).rows,
                "24 labels, 2 questions each": [row(m, label, f"w:{i}") for i, (m, label) in
                                                enumerate(wrapped_messages(900))],
                "40 labels of 2 to 300 rows": skewed([max(2, 300 // (k + 1)) for k in range(40)])}
    for name, rows in datasets.items():
        print(f"{name} ({len(rows)} rows):")
        for seed in range(3):
            stratified = split.assign_sides(rows, eval_fraction=FRACTION, seed=seed)
            print(f"  seed {seed}  stratified: {summary(rows, stratified)}")
            print(f"          hash sides: {summary(rows, hash_sides(rows, seed))}")
    rows = skewed([200] * 100)
    for name, assign in (("stratified", lambda: split.assign_sides(rows, eval_fraction=FRACTION, seed=0)),
                         ("hash sides", lambda: hash_sides(rows, 0))):
        started = time.perf_counter()
        assign()
        print(f"{name}: {len(rows):,} rows of 100 labels in {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
