"""Held-out split by a stable hash of the normalised prompt, with near-duplicate prompts kept together.

A row's side depends only on its prompt (and the seed), never on which other rows exist, except that
near-duplicate prompts share the side of their cluster; sides recorded by an earlier split are kept,
so adding rows never moves an existing row between train and eval.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ftpipe.core.dedup import clusters, near_duplicate_pairs, prompt_key
from ftpipe.core.records import read_examples, write_examples
from ftpipe.core.storage import atomic_dir

TRAIN, EVAL = "train", "eval"


def hash_side(prompt: str, eval_fraction: float, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}\x1f{prompt}".encode("utf-8", "surrogatepass")).digest()
    return EVAL if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else TRAIN


def assign_sides(
    rows: list[dict[str, Any]],
    *,
    eval_fraction: float,
    seed: int,
    previous: dict[str, str] | None = None,
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle_words: int = 3,
) -> dict[str, str]:
    """Map each row id to "train" or "eval".

    Near-duplicate prompts form clusters; a cluster takes the side recorded for any of its rows in
    `previous` (an earlier split with the same fraction and seed), else the hash side of its smallest prompt.
    """
    previous = previous or {}
    prompts = [prompt_key(row["messages"]) for row in rows]
    pairs = near_duplicate_pairs(prompts, threshold=threshold, num_perm=num_perm, shingle_words=shingle_words)
    roots = clusters(len(rows), pairs)
    members: dict[int, list[int]] = {}
    for index, root in enumerate(roots):
        members.setdefault(root, []).append(index)
    sides: dict[str, str] = {}
    for group in members.values():
        pinned = sorted(previous[rows[i]["id"]] for i in group if rows[i]["id"] in previous)
        side = pinned[0] if pinned else hash_side(min(prompts[i] for i in group), eval_fraction, seed)
        for i in group:
            sides[rows[i]["id"]] = previous.get(rows[i]["id"], side)
    return sides


def find_leaks(
    train: list[dict[str, Any]], evaluation: list[dict[str, Any]], *, threshold: float = 0.8,
    num_perm: int = 128, shingle_words: int = 3,
) -> list[dict[str, Any]]:
    """Eval rows whose prompt is an exact or near duplicate of a train prompt."""
    prompts = [prompt_key(r["messages"]) for r in train] + [prompt_key(r["messages"]) for r in evaluation]
    n_train = len(train)
    leaks = {}
    exact = {p: i for i, p in enumerate(prompts[:n_train])}
    for j, prompt in enumerate(prompts[n_train:]):
        if prompt in exact:
            leaks[j] = {"eval_id": evaluation[j]["id"], "train_id": train[exact[prompt]]["id"], "similarity": 1.0}
    for a, b, similarity in near_duplicate_pairs(prompts, threshold=threshold, num_perm=num_perm, shingle_words=shingle_words):
        if a < n_train <= b and (b - n_train) not in leaks:
            leaks[b - n_train] = {"eval_id": evaluation[b - n_train]["id"], "train_id": train[a]["id"], "similarity": similarity}
    return [leaks[j] for j in sorted(leaks)]


def _previous_sides(path: Path, eval_fraction: float, seed: int) -> dict[str, str]:
    """Sides recorded by an earlier split with the same fraction and seed (else none)."""
    if not path.exists():
        return {}
    recorded = json.loads(path.read_text(encoding="utf-8"))
    same = recorded.get("eval_fraction") == eval_fraction and recorded.get("seed") == seed
    return recorded["sides"] if same else {}


def build_split(examples_path: Path, out_dir: Path, *, eval_fraction: float, seed: int, **near: Any) -> dict[str, Any]:
    """Write `train.parquet`, `eval.parquet` and `split.json` (every id's side) into `out_dir`."""
    rows = sorted(read_examples(examples_path), key=lambda r: (r["id"], r["source"]))
    previous = _previous_sides(out_dir / "split.json", eval_fraction, seed)
    sides = assign_sides(rows, eval_fraction=eval_fraction, seed=seed, previous=previous, **near)
    train = [row for row in rows if sides[row["id"]] == TRAIN]
    evaluation = [row for row in rows if sides[row["id"]] == EVAL]
    record = {"eval_fraction": eval_fraction, "seed": seed, "sides": {row["id"]: sides[row["id"]] for row in rows}}
    with atomic_dir(out_dir) as tmp:
        write_examples(train, tmp / "train.parquet")
        write_examples(evaluation, tmp / "eval.parquet")
        (tmp / "split.json").write_text(json.dumps(record, indent=0, sort_keys=True), encoding="utf-8")
    return {"train_rows": len(train), "eval_rows": len(evaluation)}
