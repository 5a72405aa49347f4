"""Dedup throughput: ftpipe's dedup against a datasketch MinHash + MinHashLSH baseline, side by side.

    python bench/dedup.py            # 100k rows
    python bench/dedup.py --rows 1000000 --skip-baseline

Generated instruction rows with planted exact and near duplicates; prints rows/s of each, the
ratio, peak memory and precision/recall of near-duplicate detection against the planted truth, on
the rows as they are and with a long system prompt shared by every row. Then precision and recall on a
short-message intent task (a shared system prompt, 12 labels, planted near-duplicates and contradictions), and on
support emails wrapped in long greetings and signatures, beside cleaning that does not tell such wrappers apart. Last,
the held-out split of short messages with copies that have one word misspelt: how many copies share their original's
side, and the split's time with and without pairing such copies, side by side.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from contextlib import nullcontext
from multiprocessing import get_context
from unittest.mock import patch

import numpy as np

from ftpipe.core import dedup, similarity, split
from ftpipe.core.storage import REPO_ROOT
from ftpipe.core.text import canonical

sys.path.insert(0, str(REPO_ROOT))  # the tests' generator writes the intent task
from ftpipe_tests.emails import wrapped_emails  # noqa: E402
from ftpipe_tests.intents import SYSTEM_PROMPT, IntentTask, intent_task, misspelt_copies  # noqa: E402

VOCAB = [f"{a}{b}" for a in ("pro", "con", "re", "de", "in", "ex", "sub", "trans") for b in (
    "duct", "cess", "tain", "form", "port", "ject", "vert", "mit", "sist", "tend", "pose", "spect",
    "struct", "cline", "scribe", "fer", "press", "quire", "sume", "voke", "gress", "cede", "pel", "rupt")]
TOPICS = ["billing", "shipping", "account", "refund", "login", "upgrade", "invoice", "password"]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(40, 60)))


def _row(key: str, prompt: str, answer: str) -> dict:
    return {"id": key, "source": key, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def _edit(rng: random.Random, text: str) -> str:
    words = text.split()
    words[rng.randrange(len(words))] = rng.choice(VOCAB)
    return " ".join(words)


def make_rows(n: int, seed: int = 7, system: str | None = None) -> tuple[list[dict], dict[str, int]]:
    """n rows: 80% unique, 10% exact copies (case/space changes), 10% one-word edits of a unique row; each
    row starts with the `system` message when one is given.

    Returns the rows and each row's planted group (a unique row, its copies and its edits).
    """
    rng = random.Random(seed)
    rows, group = [], {}
    unique = int(n * 0.8)
    for i in range(unique):
        rows.append(_row(f"u{i}", f"{rng.choice(TOPICS)}: {_sentence(rng)}", rng.choice(TOPICS)))
        group[f"u{i}"] = i
    for i in range(n - unique):
        source = rng.randrange(unique)
        prompt, answer = (m["content"] for m in rows[source]["messages"])
        key = f"e{i}" if i % 2 else f"n{i}"
        rows.append(_row(key, "  " + prompt.upper() if i % 2 else _edit(rng, prompt), answer))
        group[key] = source
    for row in rows if system else []:
        row["messages"].insert(0, {"role": "system", "content": system})
    return rows, group


def conversation(row: dict) -> str:
    """The row's normalised conversation (what makes two rows exact duplicates)."""
    return "\n".join(f"{m['role']}: {canonical(m['content'])}" for m in row["messages"])


def datasketch_baseline(rows: list[dict], threshold: float, num_perm: int, k: int) -> dict[str, str]:
    """Exact dedup by normalised text, then MinHash per row + MinHashLSH; returns near-duplicate id -> kept id."""
    from datasketch import MinHash, MinHashLSH

    seen, removed, lsh = {}, {}, MinHashLSH(threshold=threshold, num_perm=num_perm)
    for row in rows:
        text = conversation(row)
        if text in seen:
            continue
        seen[text] = row["id"]
        words = text.split()
        minhash = MinHash(num_perm=num_perm)
        minhash.update_batch([" ".join(words[i : i + k]).encode() for i in range(max(1, len(words) - k + 1))])
        match = lsh.query(minhash)
        if match:
            removed[row["id"]] = min(match)
        else:
            lsh.insert(row["id"], minhash)
    return removed


def ftpipe_dedup(rows: list[dict], threshold: float, num_perm: int, k: int) -> dict[str, str]:
    result = dedup.deduplicate(rows, similarity.Settings(threshold, num_perm, k))
    return {r["id"]: r["duplicate_of"] for r in result.removed if r["reason"] == "near_duplicate"}


def expected_removals(rows: list[dict], group: dict[str, int], threshold: float, k: int) -> int:
    """How many near-duplicates comparing every pair within each planted group removes: in id order, a row goes
    when its prompt's exact Jaccard with a kept row of its group reaches `threshold` (exact copies gone first).
    Two edits of one row at different places may be less alike than that, so both of them stay."""
    members: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        members.setdefault(group[row["id"]], []).append(row)
    total = 0
    for found in members.values():
        seen: set[str] = set()
        unique = [r for r in found if not _seen(seen, conversation(r))]
        prompts, _ = similarity.prompt_shingles(unique, k, shared=np.zeros(0, dtype=np.uint64))
        kept: list[int] = []
        for index in range(len(unique)):
            if any(prompts.jaccard(index, other) >= threshold for other in kept):
                total += 1
            else:
                kept.append(index)
    return total


def _seen(seen: set[str], key: str) -> bool:
    """Whether `key` was seen before (and remember it)."""
    if key in seen:
        return True
    seen.add(key)
    return False


def _quality(removed: dict[str, str], group: dict[str, int], expected: int) -> tuple[float, float]:
    """Precision (removals within a planted group) and recall (against `expected_removals`)."""
    correct = sum(group[a] == group[b] for a, b in removed.items())
    return correct / max(1, len(removed)), correct / max(1, expected)


def _measure(name: str, n: int, threshold: float, num_perm: int, k: int, system: str | None, queue) -> None:
    rows, group = make_rows(n, system=system)
    fn = {"ftpipe": ftpipe_dedup, "datasketch": datasketch_baseline}[name]
    start = time.perf_counter()
    removed = fn(rows, threshold, num_perm, k)
    seconds = time.perf_counter() - start
    precision, recall = _quality(removed, group, expected_removals(rows, group, threshold, k))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"name": name, "rows_per_s": n / seconds, "seconds": seconds, "peak_mb": peak_mb,
               "precision": precision, "recall": recall})


def run(name: str, *args) -> dict:
    """Measure in a fresh process so peak memory is that implementation's own."""
    ctx = get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_measure, args=(name, *args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def quality(task: IntentTask, settings: similarity.Settings) -> tuple[float, float, int]:
    """(precision, recall, rows removed) of near-duplicate and contradiction removals against the task's planted
    truth: a removal is right when it names the row its planted copy or contradiction was made from."""
    planted = {frozenset(pair) for pair in [*task.near_duplicates.items(), *task.contradictions.items()]}
    result = dedup.deduplicate(task.rows, settings)
    found = {frozenset((r["id"], r["duplicate_of"])) for r in result.removed}
    return len(found & planted) / max(1, len(found)), len(found & planted) / max(1, len(planted)), len(result.removed)


def wrappers_not_judged():
    """Cleaning as before prompts alike only through a greeting and signature were told apart: every similar pair."""
    return patch.object(similarity, "prompt_pairs",
                        lambda prompts, words, settings, answers=None: similarity.similar_pairs(prompts, settings))


def misspelt_not_paired():
    """The split as before copies of short prompts with one word misspelt were paired."""
    return patch.object(split, "_misspelt_copies", lambda rows, settings: [])


def split_with_misspelt_copies(count: int, settings: similarity.Settings) -> None:
    """Prints how many one-typo copies of short messages share their original's side, and the split's time for
    `count` short messages (4 to 18 words) with and without pairing such copies."""
    rng = random.Random(3)
    task = intent_task(600, near=0, contradictions=0)
    copies = misspelt_copies(task.rows)
    short = [_row(f"s{i}", " ".join(rng.choice(VOCAB) for _ in range(rng.randint(4, 18))), "a") for i in range(count)]
    print(f" held-out split of {len(task.rows)} short intent messages and a copy of each with one word misspelt, and "
          f"of {count} generated short messages:")
    for label, context in (("ftpipe", nullcontext), ("ftpipe, misspelt copies not paired", misspelt_not_paired)):
        with context():
            sides = split.assign_sides(task.rows + copies, eval_fraction=0.2, seed=0, settings=settings)
            started = time.perf_counter()
            split.assign_sides(short, eval_fraction=0.2, seed=0, settings=settings)
            seconds = time.perf_counter() - started
        together = sum(sides[row["id"]] == sides[copy["id"]] for row, copy in zip(task.rows, copies))
        print(f"  {label:<36} {together:>3} of {len(copies)} copies beside their original  {seconds:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--shingle-words", type=int, default=similarity.Settings().shingle_words)
    parser.add_argument("--skip-baseline", action="store_true", help="only ftpipe (for the 1M-row memory run)")
    args = parser.parse_args()
    params = (args.rows, args.threshold, args.num_perm, args.shingle_words)
    names = ["ftpipe"] if args.skip_baseline else ["ftpipe", "datasketch"]
    print(f"dedup benchmark: {args.rows} rows, threshold {args.threshold}, {args.num_perm} permutations")
    for label, system in (("rows as generated", None), ("with a shared system prompt", SYSTEM_PROMPT)):
        results = {name: run(name, *params, system) for name in names}
        print(f" {label}:")
        for r in results.values():
            print(f"  {r['name']:<10} {r['rows_per_s']:>10.0f} rows/s  {r['seconds']:7.2f} s  peak {r['peak_mb']:7.0f} MB"
                  f"  near-dup precision {r['precision']:.3f} recall {r['recall']:.3f}")
        if "datasketch" in results:
            ratio = results["ftpipe"]["rows_per_s"] / results["datasketch"]["rows_per_s"]
            print(f"  ratio ftpipe/datasketch: {ratio:.1f}x (target >= 10x)")
    settings = similarity.Settings(args.threshold, args.num_perm, args.shingle_words)
    intents = intent_task()
    precision, recall, _ = quality(intents, settings)
    print(f" short-message intent task ({len(intents.rows)} rows, shared system prompt, 12 labels): near-duplicate "
          f"and contradiction precision {precision:.3f} recall {recall:.3f}")
    emails = wrapped_emails()
    print(f" support emails ({len(emails.rows)} rows, 8 labels, two in three between one of two greetings and "
          f"signatures; {len(emails.near_duplicates)} misspelt copies, {len(emails.contradictions)} contradictions):")
    for label, context in (("ftpipe", nullcontext), ("ftpipe, wrappers not told apart", wrappers_not_judged)):
        with context():
            precision, recall, removed = quality(emails, settings)
        print(f"  {label:<32} {removed:>3} rows removed  precision {precision:.3f} recall {recall:.3f}")
    split_with_misspelt_copies(args.rows, settings)


if __name__ == "__main__":
    main()
