import json
import random
from pathlib import Path

from ftpipe.core import dedup, similarity, split
from ftpipe.core.records import examples_metadata, read_examples, write_examples
from ftpipe_tests.intents import intent_task
from ftpipe_tests.rows import row, sentence


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [row(sentence(rng, 15), "a", f"s{i}") for i in range(n)]


def test_eval_fraction_is_respected_roughly() -> None:
    sides = split.assign_sides(rows(1000), eval_fraction=0.2, seed=0)
    share = sum(side == split.EVAL for side in sides.values()) / len(sides)
    assert 0.15 < share < 0.25


def test_adding_rows_never_moves_existing_rows() -> None:
    old = rows(300)
    before = split.assign_sides(old, eval_fraction=0.15, seed=0)
    after = split.assign_sides(old + rows(100, seed=9), eval_fraction=0.15, seed=0)
    assert all(after[key] == side for key, side in before.items())


def test_near_duplicate_prompts_share_a_side_and_pinned_sides_win() -> None:
    base = rows(1, seed=3)[0]
    words = base["messages"][0]["content"].split()
    near = row(" ".join(words[:-1] + ["other"]), "b")
    others = rows(50)
    sides = split.assign_sides([base, near] + others, eval_fraction=0.5, seed=0)
    assert sides[base["id"]] == sides[near["id"]]
    flipped = "train" if sides[base["id"]] == "eval" else "eval"
    pinned = split.assign_sides([base, near] + others, eval_fraction=0.5, seed=0, previous={base["id"]: flipped})
    assert pinned[near["id"]] == flipped


def test_find_leaks_detects_exact_and_near_prompts() -> None:
    train = rows(40)
    words = train[0]["messages"][0]["content"].split()
    leaked_near = row(" ".join(words[:-1] + ["zulu"]), "x")
    leaked_exact = row(train[1]["messages"][0]["content"].upper(), "different")
    clean = rows(5, seed=42)
    leaks = split.find_leaks(train, [leaked_near, leaked_exact] + clean)
    assert {(l["eval_id"], l["train_id"]) for l in leaks} == {
        (leaked_near["id"], train[0]["id"]), (leaked_exact["id"], train[1]["id"])}
    assert split.find_leaks(train, clean) == []


def test_build_split_is_deterministic_and_records_sides(tmp_path: Path) -> None:
    data = rows(120)
    write_examples(data, tmp_path / "in.parquet")
    write_examples(list(reversed(data)), tmp_path / "in_reversed.parquet")
    first = split.build_split(tmp_path / "in.parquet", tmp_path / "a", eval_fraction=0.15, seed=0)
    split.build_split(tmp_path / "in_reversed.parquet", tmp_path / "b", eval_fraction=0.15, seed=0)
    assert first["train_rows"] + first["eval_rows"] == 120
    for name in ("train.parquet", "eval.parquet", "split.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(read_examples(tmp_path / "a" / "eval.parquet")) == first["eval_rows"]
    recorded = json.loads((tmp_path / "a" / "split.json").read_text())
    assert len(recorded["sides"]) == 120 and recorded["eval_fraction"] == 0.15


def test_a_shared_system_prompt_neither_groups_rows_nor_makes_leaks(tmp_path: Path) -> None:
    task = intent_task()
    write_examples(task.rows, tmp_path / "rows.parquet")
    counts = split.build_split(tmp_path / "rows.parquet", tmp_path / "split", eval_fraction=0.15, seed=0)
    assert 0.08 < counts["eval_rows"] / len(task.rows) < 0.25
    sides = json.loads((tmp_path / "split" / "split.json").read_text())["sides"]
    assert all(sides[copy] == sides[original] for copy, original in task.near_duplicates.items())
    assert split.split_leaks(tmp_path / "split", similarity.Settings()) == []


def test_cleaning_the_split_and_the_leak_check_agree(tmp_path: Path) -> None:
    """After cleaning no two prompts are near-identical, so the split groups nothing and finds no leak."""
    task = intent_task(seed=1)
    write_examples(task.rows, tmp_path / "raw.parquet")
    dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "clean")
    clean = read_examples(tmp_path / "clean" / "examples.parquet")
    shared = similarity.decode_shared(
        examples_metadata(tmp_path / "clean" / "examples.parquet")[dedup.SHARED_TEXT_KEY])
    prompts, _ = similarity.prompt_shingles(clean, 2, shared)
    assert similarity.similar_pairs(prompts) == []
    split.build_split(tmp_path / "clean" / "examples.parquet", tmp_path / "split", eval_fraction=0.5, seed=0)
    assert split.split_leaks(tmp_path / "split", similarity.Settings()) == []


def test_leak_check_ignores_the_shared_system_prompt_but_finds_a_copied_message() -> None:
    train = intent_task(seed=2).rows
    copied = dict(train[0], id="copy", messages=[*train[0]["messages"][:-1], {"role": "assistant", "content": "x"}])
    copied["messages"][1] = {"role": "user", "content": train[0]["messages"][1]["content"].upper() + "!"}
    fresh = intent_task(seed=3).rows[:5]
    fresh = [r for r in fresh if r["messages"][1]["content"] not in {t["messages"][1]["content"] for t in train}]
    leaks = split.find_leaks(train, [copied, *fresh])
    assert [(leak["eval_id"], leak["train_id"]) for leak in leaks] == [("copy", train[0]["id"])]
