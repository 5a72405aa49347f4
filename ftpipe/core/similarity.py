"""What makes two rows similar: the word shingles of what varies between rows, compared by Jaccard similarity.

Text shared by (nearly) every row of a task, such as a long system prompt or a repeated instruction preamble,
would make every pair of short messages look alike; its shingles are found by how many rows hold them and left
out. Candidate pairs come from MinHash signatures (computed by `rensa`) and LSH banding, and every candidate is
verified on the exact Jaccard similarity of its shingle sets, so a reported pair is truly above the threshold.
Text held by fewer rows, such as a greeting and a signature many emails share, can still make two different short
questions alike: prompts alike only through such a wrapper, each with words of its own, are not alike
(`prompt_pairs`). Cleaning, the held-out split and the leakage check all use this one definition. In a short
message one misspelt word changes too many of its few shingles to pass; the split and the leakage check also pair
such copies (`misspelt_copies`).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import numpy as np
import pandas as pd

from ftpipe.config import DedupConfig
from ftpipe.core.records import source_file
from ftpipe.core.text import loose_words

_PAD_HASH = pd.util.hash_array(np.array(["\x00"], dtype=object))[0]  # the word short texts are padded with
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BAND_WEIGHTS = np.random.default_rng(0).integers(1, 2**63, size=1024, dtype=np.uint64) | np.uint64(1)
FULL_PAIRS_GROUP = 64
CHUNK_ROWS = 20_000
FALSE_POSITIVE_WEIGHT = 0.1  # candidates are verified, so a missed pair costs more than an extra one
SHARED_SHARE = 0.5  # a shingle held by more than this share of the rows is shared text...
MIN_SHARED_ROWS = 8  # ...when at least this many rows hold it (a handful of near-duplicates is not shared text)
FILE_SHARED_ROWS = 50  # a file of this many rows or more has shared text of its own (a file's template)
MINHASH_SEED = 1
WRAPPER_ROWS = MIN_SHARED_ROWS  # text held by at least this many rows may wrap different messages...
OWN_WORDS = 2  # ...when each of two messages has at least this many words of its own
ONE_ANSWER = 0.8  # ...and when no one answer is given by this share of its rows (else it is a question many ask)
MISSPELT = 0.75  # a word this alike letter for letter to the one in its place is the same word misspelt
MISSPELT_WORDS = 64  # `blind_spot` at most: comparing word by word costs the square of a prompt's length


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

    def held_by_at_least(self, count: int, among: np.ndarray, answers: np.ndarray | None = None) -> set[int]:
        """Those of the shingles `among` that at least `count` rows hold (a row holding one twice counts once); with
        `answers` (a code per row), only those whose rows give no answer in at least ONE_ANSWER of them: text that
        goes with one answer is a question many rows ask, not wrapping."""
        found = pd.Series(self.hashes).isin(among).to_numpy()
        owner = np.repeat(np.arange(len(self)), np.diff(self.offsets))[found]
        codes, uniques = pd.factorize(self.hashes[found])
        size = max(len(uniques), 1)
        held_pairs = pd.unique(owner * size + codes)  # each (row, shingle) once
        held = np.bincount(held_pairs % size, minlength=len(uniques))
        wide = held >= count
        if answers is not None:
            kinds = int(answers.max(initial=0)) + 1
            giving, rows = np.unique((held_pairs % size) * kinds + answers[held_pairs // size], return_counts=True)
            most = np.zeros(len(uniques), dtype=np.int64)  # of each shingle's rows, those giving its commonest answer
            np.maximum.at(most, giving // kinds, rows)
            wide &= most < ONE_ANSWER * held
        return set(uniques[wide].tolist())

    def chunk(self, start: int, stop: int) -> Shingles:
        begin, end = self.offsets[start], self.offsets[stop]
        return Shingles(self.hashes[begin:end], self.offsets[start : stop + 1] - begin)

    def subset(self, indices: list[int] | np.ndarray) -> Shingles:
        """The rows at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        sizes = np.diff(self.offsets)[indices]
        return Shingles(self.hashes[_ranges(self.offsets[indices], sizes)], _offsets(sizes))


def _offsets(sizes: np.ndarray) -> np.ndarray:
    """Where each of the consecutive runs of `sizes` starts, and the end of the last."""
    return np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`range(start, start + length)` for each pair, one after the other, as one index array."""
    return np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)


def _word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The hash of every word of `loose_words(text)` for each text, flat, and each text's word count.

    Arrow splits the texts at ASCII whitespace (where `str.split` splits too) and finds the distinct pieces;
    `loose_words` normalises each distinct piece once, which may drop it (punctuation only) or split it further
    (at other whitespace), so the words are exactly `loose_words(text)`'s."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pieces = pc.ascii_split_whitespace(pa.array(texts, type=pa.large_string()))
    encoded = pc.list_flatten(pieces).dictionary_encode()
    words = [loose_words(piece) for piece in encoded.dictionary.to_pylist()]
    sizes = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    vocabulary = pd.util.hash_array(np.array([w for found in words for w in found] or [""], dtype=object))
    piece = encoded.indices.to_numpy()
    if (sizes == 1).all():  # usually: every piece is one word, so pieces and words correspond one to one
        return vocabulary[piece], pc.list_value_length(pieces).to_numpy().astype(np.int64)
    first, per_piece = np.cumsum(sizes) - sizes, sizes[piece]
    flat = vocabulary[_ranges(first[piece], per_piece)]
    owner = pc.list_parent_indices(pieces).to_numpy()
    return flat, np.bincount(owner, weights=per_piece, minlength=len(texts)).astype(np.int64)


def _padded(word_hash: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts of fewer than k words padded to k words with the pad word."""
    if not (lengths < k).any():
        return word_hash, lengths
    padded = np.maximum(lengths, k)
    out = np.full(int(padded.sum()), _PAD_HASH, dtype=np.uint64)
    within = np.arange(len(word_hash)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[np.repeat(np.cumsum(padded) - padded, lengths) + within] = word_hash
    return out, padded


def _word_shingles(texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint64 hashes of the k-word shingles of every text's loose words (short texts padded), and each count."""
    word_hash, lengths = _padded(*_word_hashes(texts), k)  # every text has at least k words now
    count = max(len(word_hash) - k + 1, 0)
    shingle = word_hash[:count]
    for j in range(1, k):
        shingle = shingle * _MIX + word_hash[j : j + count]
    spanning = (np.cumsum(lengths)[:, None] - np.arange(1, k)).ravel()  # starts of shingles running into the next text
    keep = np.ones(count, dtype=bool)
    keep[spanning[spanning < count]] = False
    return shingle[keep], lengths - k + 1


def shingles(rows: list[list[tuple[str, str]]], k: int) -> Shingles:
    """The shingles of rows given as (role, text) parts: each part's words loosely normalised and shingled on
    their own (no shingle spans two messages), salted by role so a user's words differ from an assistant's."""
    return Messages.of(rows, k).rows()


@dataclass
class Messages:
    """The distinct messages of some rows, each shingled once (a system prompt shared by every row is read once),
    and which messages each row holds."""

    distinct: list[tuple[str, str]]  # the distinct (role, text) messages
    shingles: Shingles  # one entry per distinct message
    held_by: np.ndarray  # how many rows hold each distinct message
    codes: np.ndarray  # each row's messages, in order, as indices of the distinct messages
    per_row: np.ndarray  # how many messages each row has

    @classmethod
    def of(cls, rows: list[list[tuple[str, str]]], k: int) -> Messages:
        index: dict[tuple[str, str], int] = {}
        codes = np.fromiter((index.setdefault(part, len(index)) for row in rows for part in row), dtype=np.int64)
        distinct = list(index)
        hashes, counts = _word_shingles([text for _, text in distinct], k)
        salts = np.array([zlib.crc32(role.encode()) for role, _ in distinct], dtype=np.uint64)
        hashes ^= np.repeat(salts * _MIX, counts)
        offsets = _offsets(counts)
        per_row = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        return cls(distinct, Shingles(hashes, offsets), np.bincount(codes, minlength=len(distinct)), codes, per_row)

    @property
    def row_starts(self) -> np.ndarray:
        """Where each row's messages start in `codes`."""
        return np.cumsum(self.per_row) - self.per_row

    def rows(self, shared: np.ndarray | None = None, indices: np.ndarray | None = None) -> Shingles:
        """Every row's shingles (or those of the rows at `indices`): its messages' shingles one after the other,
        leaving out the `shared` ones, except in a row made only of shared text (it keeps all of its shingles)."""
        starts, counts = self.row_starts, self.per_row
        if indices is not None:
            starts, counts = starts[indices], counts[indices]
        codes = self.codes[_ranges(starts, counts)]
        if shared is None or not len(shared):
            return _gather(self.shingles, codes, counts)
        messages = len(self.held_by)
        owner = np.repeat(np.arange(messages), np.diff(self.shingles.offsets))
        touched = np.unique(owner[_member(self.shingles.hashes, shared)])  # the messages holding shared text
        both = _stacked(_without(self.shingles.subset(touched), shared), self.shingles)  # trimmed ones, then all whole
        where = np.full(messages, -1)
        where[touched] = np.arange(len(touched))
        whole = codes + len(touched)
        trimmed = np.where(where[codes] >= 0, where[codes], whole)
        bare = np.repeat(_segment_sums(np.diff(both.offsets)[trimmed], counts) == 0, counts)
        return _gather(both, np.where(bare, whole, trimmed), counts)

    def row_ids(self, message_ids: np.ndarray) -> np.ndarray:
        """An id per row, equal for rows whose messages have equal `message_ids` (one per distinct message) in the
        same order, numbered in order of first appearance."""
        labels, starts = message_ids[self.codes], self.row_starts
        ids = np.zeros(len(self.per_row), dtype=np.int64)
        for count in np.unique(self.per_row).tolist():
            members = np.flatnonzero(self.per_row == count)
            _, inverse = np.unique(labels[starts[members, None] + np.arange(count)], axis=0, return_inverse=True)
            ids[members] = inverse.ravel() + ids.max() + 1
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first)] = np.arange(len(first))
        return rank[inverse]

    def shared(self, files: list[str] | None = None) -> np.ndarray:
        """The sorted shingles held by more than SHARED_SHARE of the rows and by at least MIN_SHARED_ROWS rows
        (every row, when there are fewer): shared text, such as a system prompt. With `files` (each row's source
        file), also those so held within the rows of one file of FILE_SHARED_ROWS rows or more: a template one file
        writes in every row (an Alpaca file's one instruction), so its rows compare with other files' on what varies.
        A row holding a shingle in two of its messages counts twice."""
        found = _shared(self.shingles, self.held_by, len(self.per_row))
        for members in _file_rows(files or []):
            messages, held_by = np.unique(self.codes[_ranges(self.row_starts[members], self.per_row[members])],
                                          return_counts=True)
            found = np.union1d(found, _shared(self.shingles.subset(messages), held_by, len(members)))
        return found


def _shared(messages: Shingles, held_by: np.ndarray, count: int) -> np.ndarray:
    """The sorted shingles of the distinct `messages`, held by `held_by` of `count` rows each, that more than
    SHARED_SHARE of the rows and at least MIN_SHARED_ROWS rows hold (every row, when there are fewer)."""
    floor = max(SHARED_SHARE * count, min(MIN_SHARED_ROWS, count) - 1)
    sizes = np.diff(messages.offsets)
    codes, uniques = pd.factorize(messages.hashes)
    frequent = np.bincount(codes, weights=np.repeat(held_by, sizes), minlength=len(uniques)) > floor
    held = frequent[codes]  # each distinct message counts a frequent shingle once, for every row holding it
    message_of = np.repeat(np.arange(len(held_by)), sizes)[held]
    pairs, first = np.unique(message_of * len(uniques) + codes[held], return_index=True)
    rows_holding = np.bincount(pairs % max(len(uniques), 1), weights=held_by[message_of[first]],
                               minlength=len(uniques))
    return np.sort(uniques[rows_holding > floor].astype(np.uint64))


def source_files(rows: list[dict]) -> list[str]:
    """Each row's source file (`records.source_file`)."""
    return [source_file(str(row.get("source", ""))) for row in rows]


def _file_rows(files: list[str]) -> list[np.ndarray]:
    """The row indices of each file of at least FILE_SHARED_ROWS rows, when the rows come from several files."""
    codes, names = pd.factorize(pd.Series(files, dtype=object))
    if len(names) < 2:
        return []
    order = np.argsort(codes, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(codes, minlength=len(names)))[:-1])
    return [group for group in groups if len(group) >= FILE_SHARED_ROWS]


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Mask of `values` found in the sorted array `sorted_set`."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def _without(rows: Shingles, shared: np.ndarray) -> Shingles:
    """`rows` with the `shared` shingles left out."""
    keep = ~_member(rows.hashes, shared)
    return Shingles(rows.hashes[keep], _offsets(_segment_sums(keep, np.diff(rows.offsets))))


def _stacked(first: Shingles, second: Shingles) -> Shingles:
    """The rows of `first`, then those of `second`."""
    offsets = np.concatenate((first.offsets[:-1], first.offsets[-1] + second.offsets))
    return Shingles(np.concatenate((first.hashes, second.hashes)), offsets)


def _gather(messages: Shingles, codes: np.ndarray, counts: np.ndarray) -> Shingles:
    """Rows made of the messages at `codes`, one after the other, `counts` messages per row."""
    sizes = np.diff(messages.offsets)[codes]
    return Shingles(messages.hashes[_ranges(messages.offsets[codes], sizes)], _offsets(sizes)[_offsets(counts)])


def _segment_sums(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The sums of consecutive runs of `values`, `counts` values per run (an empty run sums to 0)."""
    totals = np.concatenate(([0], np.cumsum(values, dtype=np.int64)))
    ends = _offsets(counts)
    return totals[ends[1:]] - totals[ends[:-1]]


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


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, sizes): the indices sorted by key (stably) and the runs of equal keys in that order."""
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.concatenate(([True], keys[order][1:] != keys[order][:-1])))
    return order, starts, np.diff(np.concatenate((starts, [len(keys)])))


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
        found.append(_group_pairs(*_runs((block * _BAND_WEIGHTS[:width]).sum(axis=1, dtype=np.uint64))))
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


def prompt_pairs(prompts: Shingles, words: Callable[[int], list[str]], settings: Settings = Settings(),
                 answers: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """`similar_pairs` of prompts, less the pairs of different messages in one wrapper: each prompt has at least
    OWN_WORDS words of its own (`_own_words`; `words(i)`: prompt i's words in order), and without the text that at
    least WRAPPER_ROWS rows hold (with `answers`, a code per row: with no one answer in most of them) they are not
    alike (two questions between one greeting and signature, or above one quoted email)."""
    pairs = similar_pairs(prompts, settings)
    sets, least = prompts.set_of, OWN_WORDS + settings.shingle_words - 1  # the fewest shingles of such words
    differing = [(a, b) for a, b, _ in pairs if len(sets(a) - sets(b)) >= least <= len(sets(b) - sets(a))
                 and min(_own_words(words(a), words(b))) >= OWN_WORDS]
    if not differing:
        return pairs
    common = prompts.held_by_at_least(WRAPPER_ROWS, prompts.subset(np.unique(differing)).hashes, answers)
    wrapped = {(a, b) for a, b in differing if not _alike(sets(a) - common, sets(b) - common, settings.threshold)}
    return [pair for pair in pairs if pair[:2] not in wrapped]


def _own_words(a: list[str], b: list[str]) -> tuple[int, int]:
    """How many words each of two word sequences has where the other has others, misspelt words aside. What both
    start or end with is set aside first: matching the rest is quadratic in its length (a long quoted thread)."""
    start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    end = next((i for i, (x, y) in enumerate(zip(reversed(a[start:]), reversed(b[start:]))) if x != y),
               min(len(a), len(b)) - start)
    a, b = a[start:len(a) - end], b[start:len(b) - end]
    own_a = own_b = 0
    for tag, a_start, a_end, b_start, b_end in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if a_end - a_start == b_end - b_start:
            changed = sum(not _misspelt(x, y) for x, y in zip(a[a_start:a_end], b[b_start:b_end]))
            own_a, own_b = own_a + changed, own_b + changed
        else:
            own_a, own_b = own_a + a_end - a_start, own_b + b_end - b_start
    return own_a, own_b


def _misspelt(word: str, other: str) -> bool:
    """`other` is `word` misspelt: alike letter for letter, neither a number or an id (A-92776 is not A-92706)."""
    return not any(c.isdigit() for c in word + other) and SequenceMatcher(None, word, other).ratio() >= MISSPELT


def blind_spot(settings: Settings) -> int:
    """The fewest words a prompt needs for a copy with one word misspelt mid-sentence (which changes
    `shingle_words` of its shingles) to be `threshold` alike by Jaccard similarity; at most MISSPELT_WORDS."""
    k, threshold = settings.shingle_words, settings.threshold
    if threshold >= 1:
        return MISSPELT_WORDS
    return min(math.ceil(round((2 * k - 1 + threshold) / (1 - threshold), 6)), MISSPELT_WORDS)


def _one_deleted(word: str) -> set[str]:
    return {word} | {word[:i] + word[i + 1:] for i in range(len(word))}


def misspelt_copies(texts: list[str], settings: Settings = Settings()) -> list[tuple[int, int, int]]:
    """(i, j, position), i < j, for the prompts (`texts`: `prompt_text`) of fewer than `blind_spot` words that are
    one another but for the word at `position` of their `loose_words`, misspelt (`_misspelt`): copies the shingles
    miss. Prompts are grouped by all their words but one (`_without_one_word`), and within a group the words left
    out that share a spelling with a letter dropped (one edit apart) are compared."""
    keys, rows, positions = _without_one_word(*_word_hashes(texts), blind_spot(settings))
    order, starts, sizes = _runs(keys)
    words = functools.cache(lambda index: loose_words(texts[index]))
    found = set()
    for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        members = order[start:start + size]
        found |= _misspelt_in_group(words, list(zip(rows[members].tolist(), positions[members].tolist())))
    return sorted(found)


def _without_one_word(hashes: np.ndarray, lengths: np.ndarray, shorter: int) -> tuple[np.ndarray, ...]:
    """(key, text, position) for each word (`hashes`, flat; `lengths`: each text's word count) of the texts of fewer
    than `shorter` words; the key hashes the text's length, the position and every other word in its place, so equal
    keys are (but for a hash collision) texts alike but for the word there. Each word's hash is weighted by its
    position, so a text's key is its sum less that word's share."""
    kept = np.flatnonzero((lengths > 0) & (lengths < shorter))
    sizes = lengths[kept]
    if not len(kept):
        return np.zeros(0, dtype=np.uint64), kept, kept
    starts = _offsets(sizes)[:-1]
    positions = np.arange(int(sizes.sum())) - np.repeat(starts, sizes)
    with np.errstate(over="ignore"):
        placed = hashes[_ranges(_offsets(lengths)[kept], sizes)] * _BAND_WEIGHTS[positions]
        salt = _BAND_WEIGHTS[-1 - positions] + _BAND_WEIGHTS[MISSPELT_WORDS + np.repeat(sizes, sizes)]
        keys = np.repeat(np.add.reduceat(placed, starts), sizes) - placed + salt
    return keys, np.repeat(kept, sizes), positions


def _misspelt_in_group(words: Callable[[int], list[str]], members: list[tuple[int, int]]) -> set[tuple[int, int, int]]:
    """The pairs of `misspelt_copies` among texts (index, position of the word left out; `words(index)`) of a group."""
    by_spelling: dict[str, set[tuple[int, int]]] = {}
    for index, position in members:
        for spelling in _one_deleted(words(index)[position]):
            by_spelling.setdefault(spelling, set()).add((index, position))
    found = set()
    for alike in by_spelling.values():
        for (a, at), (b, _) in itertools.combinations(sorted(alike), 2):
            one, other = words(a), words(b)
            differing = [i for i, (x, y) in enumerate(zip(one, other)) if x != y]
            if len(one) == len(other) and differing == [at] and _misspelt(one[at], other[at]):
                found.add((a, b, at))
    return found


def _alike(a: frozenset, b: frozenset, threshold: float) -> bool:
    return len(a & b) >= threshold * len(a | b)


def prompt_text(messages: list[dict[str, str]]) -> str:
    """A row's prompt but its system message, as one text."""
    return "\n".join(m["content"] for m in messages[:-1] if m["role"] != "system")


def prompt_words(messages: list[dict[str, str]]) -> list[str]:
    """The words of a row's prompt but its system message, in order."""
    return loose_words(prompt_text(messages))


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
    messages = Messages.of([prompt_parts(row["messages"]) for row in rows], k)
    shared = messages.shared(source_files(rows)) if shared is None else shared
    return messages.rows(shared), shared


def answer_shingles(rows: list[dict], k: int) -> Shingles:
    return shingles([answer_parts(row["messages"]) for row in rows], k)
