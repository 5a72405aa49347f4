"""Few-shot baseline: the base model prompted with k solved train examples, the cheapest alternative to
fine-tuning, scored on the same held-out rows."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ftpipe.core.evaluation.statistics import seeded_rank

SEED = 0


def choose_examples(train_rows: list[dict], k: int, exclude_ids: set[str],
                    group: Callable[[dict], str]) -> list[dict]:
    """`k` train rows, the same ones whenever the split is the same: in a fixed pseudo-random order (a hash of the
    id), taking each group's next row in turn so the examples cover as many groups (labels) as they can. A row
    whose id is in `exclude_ids` (the held-out rows) is never taken."""
    groups: dict[str, deque] = {}
    for row in sorted((r for r in train_rows if r["id"] not in exclude_ids), key=lambda r: seeded_rank(r["id"], SEED)):
        groups.setdefault(group(row), deque()).append(row)
    picked: list[dict] = []
    while len(picked) < k and any(groups.values()):
        picked += [queue.popleft() for queue in groups.values() if queue][: k - len(picked)]
    return picked


def fewshot_prompt(prompt: list[dict], examples: list[dict]) -> list[dict]:
    """`prompt` (a held-out row's turns before its answer) with every example's user/assistant turns inserted
    after its system message."""
    system = [m for m in prompt if m["role"] == "system"]
    shots = [m for example in examples for m in example["messages"] if m["role"] != "system"]
    return system + shots + [m for m in prompt if m["role"] != "system"]
