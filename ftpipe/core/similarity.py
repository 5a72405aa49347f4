"""What makes two rows similar: the word shingles of what varies between rows, compared by Jaccard similarity.

Text shared by (nearly) every row of a task, such as a long system prompt or a repeated instruction preamble,
would make every pair of short messages look alike; its shingles are found by how many rows hold them and left
out. Candidate pairs come from MinHash signatures (computed by `rensa`) and LSH banding, and every candidate is
verified on the exact Jaccard similarity of its shingle sets, so a reported pair is truly above the threshold.
Cleaning, the held-out split and the leakage check all use this one definition.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import pandas as pd

from ftpipe.config import DedupConfig
from ftpipe.core.text import loose_words

_PAD = "\x00"
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BAND_WEIGHTS = np.random.default_rng(0).integers(1, 2**63, size=1024, dtype=np.uint64) | np.uint64(1)
FULL_PAIRS_GROUP = 64
CHUNK_ROWS = 20_000
FALSE_POSITIVE_WEIGHT = 0.1  # candidates are verified, so a missed pair costs more than an extra one
SHARED_SHARE = 0.5  # a shingle held by more than this share of the rows is shared text...
MIN_SHARED_ROWS = 8  # ...when at least this many rows hold it (a handful of near-duplicates is not shared text)
MINHASH_SEED = 1


@dataclass(frozen=True)
class Settings:
    """How similar is similar: the Jaccard threshold, MinHash permutations and words per shingle."""

    threshold: float = 0.8
    num_perm: int = 128
    shingle_words: int = 2

    @classmethod
    def of(cls, dedup: DedupConfig) -> Settings:
        """The settings of a task's `dedup` section."""
        return cls(dedup.near_threshold, dedup.num_perm, dedup.shingle_words)


@dataclass
class Shingles:
    """Every row's shingle hashes, flat (`hashes[offsets[i]:offsets[i + 1]]` are row i's)."""

    hashes: np.ndarray
    offsets: np.ndarray
    _sets: dict[int, frozenset] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, index: int) -> np.ndarray:
        return self.hashes[self.offsets[index] : self.offsets[index + 1]]

    def set_of(self, index: int) -> frozenset:
        """Row `index`'s shingles as a set (cached: verification looks at the same rows again and again)."""
        found = self._sets.get(index)
        if found is None:
            found = self._sets[index] = frozenset(self.row(index).tolist())
        return found

    def jaccard(self, a: int, b: int) -> float:
        left, right = self.set_of(a), self.set_of(b)
        return len(left & right) / len(left | right)

    def chunk(self, start: int, stop: int) -> Shingles:
        begin, end = self.offsets[start], self.offsets[stop]
        return Shingles(self.hashes[begin:end], self.offsets[start : stop + 1] - begin)

    def subset(self, indices: list[int] | np.ndarray) -> Shingles:
        """The rows at `indices`, in that order."""
        picked = [self.row(i) for i in indices]
        offsets = np.concatenate(([0], np.cumsum([len(row) for row in picked], dtype=np.int64)))
        return Shingles(np.concatenate(picked) if picked else self.hashes[:0], offsets)


def _word_shingles(texts: list[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint64 hashes of the k-word shingles of every text's words (short texts padded), and each count."""
    words = [w if len(w) >= k else w + [_PAD] * (k - len(w)) for w in texts]
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    flat = np.fromiter(chain.from_iterable(words), dtype=object, count=int(lengths.sum()))
    word_hash = pd.util.hash_array(flat)
    ends = np.repeat(np.cumsum(lengths), lengths)
    starts = np.flatnonzero(np.arange(len(word_hash)) + k <= ends)
    shingle = word_hash[starts]
    for j in range(1, k):
        shingle = shingle * _MIX + word_hash[starts + j]
    return shingle, lengths - k + 1


def shingles(rows: list[list[tuple[str, str]]], k: int) -> Shingles:
    """The shingles of rows given as (role, text) parts: each part's words loosely normalised and shingled on
    their own (no shingle spans two messages), salted by role so a user's words differ from an assistant's."""
    parts = [part for row in rows for part in row]
    hashes, counts = _word_shingles([loose_words(text) for _, text in parts], k)
    salts = np.array([zlib.crc32(role.encode()) for role, _ in parts], dtype=np.uint64)
    hashes ^= np.repeat(salts * _MIX, counts)
    per_row = np.add.reduceat(counts, np.cumsum([0] + [len(row) for row in rows[:-1]])) if rows else counts
    return Shingles(hashes, np.concatenate(([0], np.cumsum(per_row))).astype(np.int64))


def shared_shingles(rows: Shingles, share: float = SHARED_SHARE, min_rows: int = MIN_SHARED_ROWS) -> np.ndarray:
    """The sorted shingles held by more than `share` of the rows and by at least `min_rows` rows (every row, when
    there are fewer): shared text."""
    floor = max(share * len(rows), min(min_rows, len(rows)) - 1)
    counts = pd.Series(rows.hashes).value_counts(sort=False)
    frequent = np.sort(counts.index[counts.to_numpy() > floor].to_numpy(dtype=np.uint64))
    if not len(frequent):
        return frequent
    held = _member(rows.hashes, frequent)
    row_of = np.repeat(np.arange(len(rows)), np.diff(rows.offsets))[held]
    pairs = np.unique(row_of * len(frequent) + np.searchsorted(frequent, rows.hashes[held]))
    rows_holding = np.bincount(pairs % len(frequent), minlength=len(frequent))
    return frequent[rows_holding > floor]


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Mask of `values` found in the sorted array `sorted_set`."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def without(rows: Shingles, shared: np.ndarray) -> Shingles:
    """`rows` with the shared shingles left out; a row made only of shared text keeps all of its shingles."""
    if not len(rows) or not len(shared):
        return rows
    keep = ~_member(rows.hashes, shared)
    keep |= np.repeat(np.add.reduceat(keep.astype(np.int64), rows.offsets[:-1]) == 0, np.diff(rows.offsets))
    counts = np.add.reduceat(keep.astype(np.int64), rows.offsets[:-1])
    return Shingles(rows.hashes[keep], np.concatenate(([0], np.cumsum(counts))).astype(np.int64))


def encode_shared(shared: np.ndarray) -> str:
    return json.dumps([int(h) for h in shared])


def decode_shared(text: str | None) -> np.ndarray:
    return np.sort(np.array(json.loads(text) if text else [], dtype=np.uint64))


# ---------------------------------------------------------------- candidate pairs


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


def _signatures(rows: Shingles, num_perm: int):
    import rensa

    return rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        rows.hashes, rows.offsets.astype(np.uint64), num_perm, MINHASH_SEED
    )


def _flag_candidates(rows: Shingles, bands: int, settings: Settings) -> np.ndarray:
    """Indices of rows sharing an LSH band with another row, indexed chunk by chunk to bound memory."""
    import rensa

    index = rensa.RMinHashLSH(settings.threshold, settings.num_perm, bands)
    matrices = []
    for start in range(0, len(rows), CHUNK_ROWS):
        matrices.append(_signatures(rows.chunk(start, min(start + CHUNK_ROWS, len(rows))), settings.num_perm))
        index.insert_matrix(matrices[-1], start_key=start)
    flags = [np.asarray(index.query_duplicate_flags_matrix(matrix), dtype=bool) for matrix in matrices]
    return np.flatnonzero(np.concatenate(flags))


def _signature_array(rows: Shingles, indices: np.ndarray, num_perm: int) -> np.ndarray:
    """Signatures of the rows at `indices` as a uint32 array, converted chunk by chunk."""
    chunks = []
    for start in range(0, len(indices), CHUNK_ROWS):
        picked = indices[start : start + CHUNK_ROWS]
        chunks.append(np.asarray(_signatures(rows.subset(picked), num_perm).to_rows(), dtype=np.uint32))
    return np.concatenate(chunks)


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
    width = signatures.shape[1] // bands
    found = [np.zeros((0, 2), dtype=np.int64)]
    for band in range(bands):
        block = signatures[:, band * width : (band + 1) * width].astype(np.uint64)
        keys = (block * _BAND_WEIGHTS[:width]).sum(axis=1, dtype=np.uint64)
        order = np.lexsort((np.arange(len(keys)), keys))
        starts = np.flatnonzero(np.concatenate(([True], keys[order][1:] != keys[order][:-1])))
        sizes = np.diff(np.concatenate((starts, [len(keys)])))
        found.append(_group_pairs(order, starts, sizes))
    return np.unique(np.sort(np.concatenate(found), axis=1), axis=0)


def similar_pairs(rows: Shingles, settings: Settings = Settings()) -> list[tuple[int, int, float]]:
    """(i, j, Jaccard) for every pair of rows whose shingle sets are at least `settings.threshold` alike, i < j."""
    if len(rows) < 2:
        return []
    bands = lsh_bands(settings.threshold, settings.num_perm)
    flagged = _flag_candidates(rows, bands, settings)
    if len(flagged) < 2:
        return []
    candidates = flagged[_band_pairs(_signature_array(rows, flagged, settings.num_perm), bands)]
    found = []
    for a, b in candidates.tolist():
        score = rows.jaccard(a, b)
        if score >= settings.threshold:
            found.append((a, b, score))
    return sorted(found)


def neighbours(count: int, pairs: list[tuple[int, int, float]]) -> list[dict[int, float]]:
    """For each row, the rows it is similar to and how similar."""
    found: list[dict[int, float]] = [{} for _ in range(count)]
    for a, b, score in pairs:
        found[a][b] = found[b][a] = score
    return found


def components(count: int, pairs: list[tuple[int, int, float]]) -> list[int]:
    """Union-find over the pairs: for each index, the smallest index of its connected group."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [root(i) for i in range(count)]


# ---------------------------------------------------------------- rows of the canonical schema


def prompt_parts(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages[:-1]]


def answer_parts(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(messages[-1]["role"], messages[-1]["content"])]


def prompt_shingles(rows: list[dict], k: int, shared: np.ndarray | None = None) -> tuple[Shingles, np.ndarray]:
    """(the shingles of what varies between the rows' prompts, the shared shingles left out).

    `shared` given: leave out exactly those (so a later stage compares as an earlier one did); else find them.
    """
    full = shingles([prompt_parts(row["messages"]) for row in rows], k)
    shared = shared_shingles(full) if shared is None else shared
    return without(full, shared), shared


def answer_shingles(rows: list[dict], k: int) -> Shingles:
    return shingles([answer_parts(row["messages"]) for row in rows], k)
