import json
import random
from pathlib import Path

from ftpipe.core import split
from ftpipe.core.records import read_examples, write_examples
from ftpipe_tests.core_tests.test_dedup import row, sentence


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
    sides = split.assign_sides([base, near] + rows(50), eval_fraction=0.5, seed=0)
    assert sides[base["id"]] == sides[near["id"]]
    flipped = "train" if sides[base["id"]] == "eval" else "eval"
    pinned = split.assign_sides([base, near], eval_fraction=0.5, seed=0, previous={base["id"]: flipped})
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
