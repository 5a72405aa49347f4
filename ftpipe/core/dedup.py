"""Exact, near-duplicate and contradiction removal, every removed row kept with its reason.

Near-duplicates use MinHash signatures over word shingles (computed by `rensa`) and LSH banding;
candidate pairs are verified on their signatures before they are merged into clusters.
"""

from __future__ import annotations

import gc
import hashlib
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ftpipe.core.records import read_examples, write_examples, write_jsonl
from ftpipe.core.storage import atomic_dir

_PAD = "\x00"
FULL_PAIRS_GROUP = 64
_BAND_WEIGHTS = np.random.default_rng(0).integers(1, 2**63, size=1024, dtype=np.uint64) | np.uint64(1)
_MIX = np.uint64(0x9E3779B97F4A7C15)
CHUNK_ROWS = 20_000
FALSE_POSITIVE_WEIGHT = 0.1  # candidates are verified, so a missed pair costs more than an extra one


def normalize(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed (ASCII text is already NFKC, and casefold is lower)."""
    folded = text.lower() if text.isascii() else unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.split())


def _render(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {normalize(m['content'])}" for m in messages)


def prompt_key(messages: list[dict[str, str]]) -> str:
    """The normalised conversation up to (not including) the final assistant answer."""
    return _render(messages[:-1])


@dataclass(frozen=True)
class Keys:
    """The normalised conversation, computed once; prompt and answer are views of it."""

    conversation: str
    prompt_end: int

    @classmethod
    def of(cls, messages: list[dict[str, str]]) -> "Keys":
        prompt = prompt_key(messages)
        return cls(f"{prompt}\nassistant: {normalize(messages[-1]['content'])}", len(prompt))

    @property
    def prompt(self) -> str:
        return self.conversation[: self.prompt_end]

    @property
    def answer(self) -> str:
        return self.conversation[self.prompt_end + len("\nassistant: ") :]


def lsh_bands(threshold: float, num_perm: int) -> int:
    """Number of LSH bands minimising false positives + false negatives around `threshold`."""
    xs = np.linspace(0.0, 1.0, 201)
    best, best_error = 1, float("inf")
    for bands in (b for b in range(1, num_perm + 1) if num_perm % b == 0):
        rows = num_perm // bands
        hit = 1.0 - (1.0 - xs**rows) ** bands
        error = np.trapezoid(np.where(xs < threshold, FALSE_POSITIVE_WEIGHT * hit, 1.0 - hit), xs)
        if error < best_error:
            best, best_error = bands, error
    return best


def _shingle_hashes(texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint64 hashes of the k-word shingles of every text, and the row offsets into them."""
    words = [w if len(w) >= k else w + [_PAD] * (k - len(w)) for w in (t.split() for t in texts)]
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    flat = np.fromiter(chain.from_iterable(words), dtype=object, count=int(lengths.sum()))
    word_hash = pd.util.hash_array(flat)
    ends = np.repeat(np.cumsum(lengths), lengths)
    starts = np.flatnonzero(np.arange(len(word_hash)) + k <= ends)
    shingle = word_hash[starts]
    for j in range(1, k):
        shingle = shingle * _MIX + word_hash[starts + j]
    return shingle, np.concatenate(([0], np.cumsum(lengths - k + 1))).astype(np.uint64)


def _signatures(texts: list[str], k: int, num_perm: int, seed: int):
    """rensa MinHash digest matrix of the texts' k-word shingles."""
    import rensa

    hashes, offsets = _shingle_hashes(texts, k)
    return rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, num_perm, seed)


def _signature_array(texts: list[str], k: int, num_perm: int, seed: int) -> np.ndarray:
    """Signatures as a uint32 array, converted chunk by chunk (rensa hands rows back as Python lists)."""
    chunks = [
        np.asarray(_signatures(texts[start : start + CHUNK_ROWS], k, num_perm, seed).to_rows(), dtype=np.uint32)
        for start in range(0, len(texts), CHUNK_ROWS)
    ]
    return np.concatenate(chunks)


def _flag_candidates(texts: list[str], bands: int, threshold: float, k: int, num_perm: int, seed: int) -> np.ndarray:
    """Indices of texts sharing an LSH band with another text, indexed chunk by chunk to bound memory."""
    import rensa

    index = rensa.RMinHashLSH(threshold, num_perm, bands)
    matrices = []
    for start in range(0, len(texts), CHUNK_ROWS):
        matrices.append(_signatures(texts[start : start + CHUNK_ROWS], k, num_perm, seed))
        index.insert_matrix(matrices[-1], start_key=start)
    flags = [np.asarray(index.query_duplicate_flags_matrix(matrix), dtype=bool) for matrix in matrices]
    return np.flatnonzero(np.concatenate(flags))


def _group_pairs(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Pairs within runs of `order`: every pair for runs up to FULL_PAIRS_GROUP rows, else each row with the first."""
    pairs = [np.stack((order[starts[sizes == 2]], order[starts[sizes == 2] + 1]), axis=1)]
    for start, size in zip(starts[sizes > 2], sizes[sizes > 2]):
        members = order[start : start + size]
        if size <= FULL_PAIRS_GROUP:
            first, second = np.triu_indices(size, k=1)
            pairs.append(np.stack((members[first], members[second]), axis=1))
        else:
            pairs.append(np.stack((np.full(size - 1, members[0]), members[1:]), axis=1))
    return np.concatenate(pairs)


def _band_pairs(signatures: np.ndarray, bands: int) -> np.ndarray:
    """Unique candidate pairs (i < j) of rows sharing at least one LSH band."""
    rows = signatures.shape[1] // bands
    found = [np.zeros((0, 2), dtype=np.int64)]
    for band in range(bands):
        block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
        keys = (block * _BAND_WEIGHTS[:rows]).sum(axis=1, dtype=np.uint64)
        order = np.lexsort((np.arange(len(keys)), keys))
        starts = np.flatnonzero(np.concatenate(([True], keys[order][1:] != keys[order][:-1])))
        sizes = np.diff(np.concatenate((starts, [len(keys)])))
        found.append(_group_pairs(order, starts, sizes))
    pairs = np.concatenate(found)
    return np.unique(np.sort(pairs, axis=1), axis=0)


def near_duplicate_pairs(
    texts: list[str], *, threshold: float = 0.8, num_perm: int = 128, shingle_words: int = 3, seed: int = 1
) -> list[tuple[int, int, float]]:
    """(i, j, estimated Jaccard) for every pair of texts at or above `threshold`, i < j, sorted."""
    if len(texts) < 2:
        return []
    bands = lsh_bands(threshold, num_perm)
    flagged = _flag_candidates(texts, bands, threshold, shingle_words, num_perm, seed)
    if len(flagged) < 2:
        return []
    signatures = _signature_array([texts[i] for i in flagged], shingle_words, num_perm, seed)
    pairs = _band_pairs(signatures, bands)
    similarity = (signatures[pairs[:, 0]] == signatures[pairs[:, 1]]).mean(axis=1)
    keep = similarity >= threshold
    return [(int(flagged[a]), int(flagged[b]), float(s)) for (a, b), s in zip(pairs[keep], similarity[keep])]


def clusters(n: int, pairs: list[tuple[int, int, float]]) -> list[int]:
    """Union-find over the pairs: for each index, the smallest index of its cluster."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [root(i) for i in range(n)]


@dataclass
class DedupResult:
    kept: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)

    def count(self, reason: str) -> int:
        return sum(1 for row in self.removed if row["reason"] == reason)


def _removal(row: dict[str, Any], reason: str, of: dict[str, Any], detail: str) -> dict[str, Any]:
    return {**row, "reason": reason, "duplicate_of": of["id"], "duplicate_of_source": of["source"], "detail": detail}


def _contradiction(row: dict[str, Any], answer: str, group: list[tuple[dict[str, Any], str]], votes: Counter):
    """The removal record for `row` if its answer loses in its prompt group, else None."""
    (winner, top), = votes.most_common(1)
    if top * 2 > len(group):
        if answer == winner:
            return None
        other = next(r for r, a in group if a == winner)
        return _removal(row, "contradiction", other, f"answer differs from the majority ({top} of {len(group)} rows)")
    other = next(r for r, a in group if a != answer)
    detail = f"{len(votes)} different answers to the same prompt, none with a strict majority"
    return _removal(row, "contradiction", other, detail)


def _prompt_digest(keys: Keys) -> bytes:
    """A 128-bit digest of the normalised prompt: groups rows without keeping a copy of every prompt."""
    return hashlib.blake2b(keys.prompt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _resolve_contradictions(rows: list[tuple[dict[str, Any], Keys]], removed: list[dict[str, Any]]):
    """Same prompt, different answers: keep the strict-majority answer's rows, else drop the group."""
    groups: dict[bytes, list[int]] = defaultdict(list)
    for index, (_, keys) in enumerate(rows):
        groups[_prompt_digest(keys)].append(index)
    dropped = set()
    for members in (m for m in groups.values() if len(m) > 1):
        group = [(rows[i][0], rows[i][1].answer) for i in members]
        votes = Counter(answer for _, answer in group)
        if len(votes) < 2:
            continue
        for row, answer in group:
            removal = _contradiction(row, answer, group, votes)
            if removal:
                removed.append(removal)
                dropped.add(id(row))
    return [(row, keys) for row, keys in rows if id(row) not in dropped]


def _remove_exact(rows: list[tuple[dict[str, Any], Keys]], removed: list[dict[str, Any]]):
    first: dict[str, dict[str, Any]] = {}
    kept = []
    for row, keys in rows:
        original = first.setdefault(keys.conversation, row)
        if original is row:
            kept.append((row, keys))
        else:
            removed.append(_removal(row, "exact_duplicate", original, "same conversation after normalisation"))
    return kept


def _remove_near(rows: list[tuple[dict[str, Any], Keys]], removed: list[dict[str, Any]], **lsh: Any):
    pairs = near_duplicate_pairs([keys.conversation for _, keys in rows], **lsh)
    similarity = {(a, b): s for a, b, s in pairs}
    kept = []
    for index, rep in enumerate(clusters(len(rows), pairs)):
        row = rows[index][0]
        if rep == index:
            kept.append(row)
            continue
        score = similarity.get((rep, index))
        detail = f"estimated Jaccard {score:.2f}" if score is not None else "in the same near-duplicate cluster"
        removed.append(_removal(row, "near_duplicate", rows[rep][0], detail))
    return kept


def deduplicate(
    rows: list[dict[str, Any]], *, threshold: float = 0.8, num_perm: int = 128, shingle_words: int = 3
) -> DedupResult:
    """Remove contradictions, then exact duplicates, then near-duplicates.

    Rows are processed in (id, source) order and the first row of each cluster is kept, so the
    result does not depend on the order of the input.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived strings; the collector alone costs a third of the time
    try:
        return _deduplicate(rows, threshold, num_perm, shingle_words)
    finally:
        if gc_was_enabled:
            gc.enable()


def _deduplicate(rows: list[dict[str, Any]], threshold: float, num_perm: int, shingle_words: int) -> DedupResult:
    ordered = [(row, Keys.of(row["messages"])) for row in sorted(rows, key=lambda r: (r["id"], r["source"]))]
    result = DedupResult()
    remaining = _resolve_contradictions(ordered, result.removed)
    remaining = _remove_exact(remaining, result.removed)
    result.kept = _remove_near(remaining, result.removed, threshold=threshold, num_perm=num_perm, shingle_words=shingle_words)
    return result


def build_deduplicated(examples_path: Path, out_dir: Path, *, threshold: float, num_perm: int, shingle_words: int) -> dict[str, Any]:
    """Deduplicate `examples_path` into `out_dir/examples.parquet` + `out_dir/removed.jsonl`; return the counts."""
    rows = read_examples(examples_path)
    result = deduplicate(rows, threshold=threshold, num_perm=num_perm, shingle_words=shingle_words)
    with atomic_dir(out_dir) as tmp:
        write_examples(result.kept, tmp / "examples.parquet")
        write_jsonl(result.removed, tmp / "removed.jsonl")
    return {
        "rows_in": len(rows),
        "rows_out": len(result.kept),
        "exact_duplicates": result.count("exact_duplicate"),
        "near_duplicates": result.count("near_duplicate"),
        "contradictions": result.count("contradiction"),
        "removed": result.removed,
    }
