"""Property-based tests: readers round-trip any valid text and never crash on any bytes; dedup and
split keep their invariants (rows_in = rows_out + removed, disjoint and stable split sides)."""

from __future__ import annotations

import csv
import json
import random
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import numpy as np
import pandas as pd

from ftpipe.core import dedup, records, similarity, split
from ftpipe.core.records import FormatSpec, example_id
from ftpipe.core.similarity import Settings
from ftpipe.core.text import _folded, canonical, canonical_codes, loose, loose_words
from ftpipe_tests.builders import chat


def examples(n: int) -> settings:
    slow = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
    return settings(max_examples=n, deadline=None, suppress_health_check=slow)

WORDS = ["reset", "my", "password", "please", "the", "printer", "is", "broken", "again", "today"]

characters = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")  # no surrogates, no NUL
text = st.text(characters, min_size=1, max_size=40).filter(str.strip)
pair = st.tuples(text, text)
sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)


def row(prompt: str, answer: str, source: str) -> dict:
    messages = chat(prompt, answer)["messages"]
    return {"id": example_id(messages), "messages": messages, "source": source}


def kept(result: records.ReadResult, file: str) -> list[tuple[str, str]]:
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in result.examples if r["source"].startswith(file)]


def examples_rows(data: list[tuple[str, str]], prefix: str = "s") -> list[dict]:
    return [row(p, a, f"{prefix}{i}") for i, (p, a) in enumerate(data)]


def write_all_formats(raw: Path, pairs: list[tuple[str, str]]) -> None:
    rows = [{"prompt": p, "completion": a} for p, a in pairs]
    (raw / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (raw / "b.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    with (raw / "c.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), raw / "d.parquet")


@examples(80)
@given(st.lists(pair, min_size=1, max_size=6))
def test_valid_rows_come_back_exactly_from_every_format(pairs: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp, "raw")
        raw.mkdir()
        write_all_formats(raw, pairs)
        result = records.read_raw_dir(raw, FormatSpec())
    assert result.quarantine == []
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet"):
        assert kept(result, name) == pairs, name


@examples(120)
@given(st.sampled_from([b"", b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf"]), st.binary(max_size=400), st.binary(max_size=400), pair)
def test_any_bytes_never_crash_and_a_good_line_among_them_survives(bom: bytes, before: bytes, after: bytes, good: tuple) -> None:
    line = json.dumps({"prompt": good[0], "completion": good[1]}).encode()
    clean = [part.replace(b"\x00", b"") for part in (before, after)]  # NUL-free, so the file stays UTF-8
    assume(not clean[0].startswith((b"\xff\xfe", b"\xfe\xff")))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp, "raw")
        raw.mkdir()
        for suffix in (".jsonl", ".json", ".csv", ".parquet"):
            (raw / f"garbage{suffix}").write_bytes(bom + before + after)
        (raw / "mixed.jsonl").write_bytes(clean[0] + b"\n" + line + b"\n" + clean[1])
        result = records.read_raw_dir(raw, FormatSpec())
        records.write_examples(result.examples, Path(tmp, "examples.parquet"))
        records.write_jsonl(result.quarantine, Path(tmp, "quarantine.jsonl"))
    assert result.rows_read == len(result.examples) + len(result.quarantine)
    assert all(entry["reason"] and entry["source"] for entry in result.quarantine)
    files = {entry["source"].split(":")[0] for entry in result.quarantine + result.examples}
    assert {f"garbage{s}" for s in (".jsonl", ".json", ".csv", ".parquet")} <= files
    assert good in kept(result, "mixed.jsonl")


ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)) | st.sampled_from("\x1c\x1d\x1e\x1f\x85\u00a0 \t!-_."),
                   max_size=30)


@examples(300)
@given(st.lists(ANY_TEXT, max_size=8))
def test_vectorised_words_are_the_loose_words_of_any_text(texts: list[str]) -> None:
    words = [loose_words(t) for t in texts]
    hashes, counts = similarity._word_hashes(texts)
    flat = np.array([w for found in words for w in found], dtype=object)
    assert counts.tolist() == [len(found) for found in words]
    assert hashes.tolist() == (pd.util.hash_array(flat).tolist() if len(flat) else [])


@examples(200)
@given(st.lists(ANY_TEXT, max_size=6), st.integers(1, 3))
def test_vectorised_shingles_are_each_texts_own_k_word_windows(texts: list[str], k: int) -> None:
    expected = []
    for text in texts:
        words = pd.util.hash_array(np.array(loose_words(text) or [], dtype=object)).tolist() if loose_words(text) else []
        words += [int(similarity._PAD_HASH)] * (k - len(words))
        for start in range(len(words) - k + 1):
            value = words[start]
            for word in words[start + 1 : start + k]:
                value = (value * int(similarity._MIX) + word) % 2**64
            expected.append(value)
    hashes, counts = similarity._word_shingles(texts, k)
    assert hashes.tolist() == expected
    assert counts.sum() == len(expected)


@examples(300)
@given(ANY_TEXT)
def test_canonical_is_the_single_spaced_folded_words_of_any_text(text: str) -> None:
    assert canonical(text) == " ".join(_folded(text).split())


@examples(300)
@given(st.lists(st.one_of(ANY_TEXT, st.sampled_from(["", " a  B ", "a b", "A\tb", "a\x7fb", "é  É"])), max_size=10))
def test_bulk_canonical_codes_are_equal_exactly_when_canonical_texts_are(texts: list[str]) -> None:
    codes = canonical_codes(texts).tolist()
    forms = [canonical(t) for t in texts]
    assert codes == [list(dict.fromkeys(forms)).index(form) for form in forms]


@examples(100)
@given(st.lists(st.tuples(sentence, st.sampled_from("abc")), max_size=40), st.randoms(use_true_random=False))
def test_dedup_counts_add_up_and_ignore_input_order(data: list[tuple[str, str]], rng: random.Random) -> None:
    rows = examples_rows(data)
    result = dedup.deduplicate(rows)
    assert len(rows) == len(result.kept) + len(result.removed)
    reasons = {"exact_duplicate", "near_duplicate", "contradiction"}
    assert all(r["reason"] in reasons and r["duplicate_of"] for r in result.removed)
    assert len({r["id"] for r in result.kept}) == len(result.kept)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    again = dedup.deduplicate(shuffled)
    assert (again.kept, again.removed) == (result.kept, result.removed)


def word_shingles(parts: list[tuple[str, str]], k: int = Settings().shingle_words) -> set:
    """A row's shingles written out plainly: each message's loosely normalised words, padded to k, in k-word
    windows tagged with the message's role."""
    found = set()
    for role, content in parts:
        words = loose(content).split()
        words += [""] * (k - len(words))
        found |= {(role, *words[i : i + k]) for i in range(len(words) - k + 1)}
    return found


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


SYSTEM = "Answer the question about the office printer with one short word, nothing else, ever."


@examples(100)
@given(st.lists(st.tuples(sentence, st.sampled_from(["a", "b", "a b c d"])), max_size=40), st.booleans())
def test_every_removed_row_is_itself_similar_to_the_row_it_names(data: list[tuple[str, str]], system: bool) -> None:
    rows = [row(p, a, f"s{i}") for i, (p, a) in enumerate(data)]
    for r in rows if system else []:
        r["messages"].insert(0, {"role": "system", "content": SYSTEM})
    prompts = {r["id"]: word_shingles([(m["role"], m["content"]) for m in r["messages"][:-1]]) for r in rows}
    answers = {r["id"]: word_shingles([("assistant", r["messages"][-1]["content"])]) for r in rows}
    held = [s for shingles in prompts.values() for s in shingles]
    shared = {s for s in set(held) if held.count(s) > max(0.5 * len(rows), min(8, len(rows)) - 1)}
    varying = {key: (value - shared) or value for key, value in prompts.items()}
    result = dedup.deduplicate(rows)
    kept = {r["id"] for r in result.kept}
    for removed in result.removed:
        this, other = removed["id"], removed["duplicate_of"]
        if removed["reason"] == "near_duplicate":
            assert other in kept
            assert jaccard(varying[this], varying[other]) >= 0.8 and jaccard(answers[this], answers[other]) >= 0.8
        elif removed["reason"] == "contradiction" and "near-identical" in removed["detail"]:
            assert jaccard(varying[this], varying[other]) >= 0.8
            agrees = removed["detail"].startswith("agrees")
            assert (jaccard(answers[this], answers[other]) >= 0.8) == agrees


@examples(40)
@given(st.lists(st.tuples(sentence, text), min_size=1, max_size=30), st.lists(st.tuples(sentence, text), max_size=15))
def test_split_sides_are_disjoint_complete_and_stable_when_rows_are_added(
    old: list[tuple[str, str]], new: list[tuple[str, str]]
) -> None:
    old_rows, new_rows = examples_rows(old, "old"), examples_rows(new, "new")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sides = []
        for name, rows in (("old", old_rows), ("all", old_rows + new_rows)):
            records.write_examples(rows, tmp / f"{name}.parquet")
            split.build_split(tmp / f"{name}.parquet", tmp / "split", eval_fraction=0.3, seed=0)
            train, evaluation = (records.read_examples(tmp / "split" / f) for f in ("train.parquet", "eval.parquet"))
            assert not {r["id"] for r in train} & {r["id"] for r in evaluation}
            assert sorted(r["source"] for r in train + evaluation) == sorted(r["source"] for r in rows)
            sides.append({r["id"]: side for side, part in (("train", train), ("eval", evaluation)) for r in part})
    before, after = sides
    assert all(after[key] == side for key, side in before.items())
