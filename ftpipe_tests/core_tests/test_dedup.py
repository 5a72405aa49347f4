import random

from ftpipe.core import dedup
from ftpipe.core.records import example_id
from ftpipe_tests.conftest import chat

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def row(prompt: str, answer: str, source: str = "f:line 1") -> dict:
    messages = chat(prompt, answer)["messages"]
    return {"id": example_id(messages), "messages": messages, "source": source}


def sentence(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n))


def test_normalize_nfkc_casefold_whitespace() -> None:
    assert dedup.normalize("  Ｈello\t WORLD \n ") == "hello world"
    assert dedup.normalize("Straße") == dedup.normalize("STRASSE")


def test_exact_duplicates_after_normalisation_keep_one() -> None:
    rows = [row("Reset my password", "account"), row("reset  my PASSWORD ", "account", "g:line 4")]
    result = dedup.deduplicate(rows)
    assert len(result.kept) == 1 and result.count("exact_duplicate") == 1
    removed = result.removed[0]
    assert removed["duplicate_of"] == result.kept[0]["id"]
    assert removed["reason"] == "exact_duplicate"


def test_near_duplicates_cluster_and_unrelated_rows_stay() -> None:
    rng = random.Random(0)
    base = sentence(rng)
    edited = base.split()
    edited[5] = "changed"
    rows = [row(base, "x"), row(" ".join(edited), "x"), row(base + " extra", "x")] + [row(sentence(rng), "y") for _ in range(30)]
    result = dedup.deduplicate(rows)
    assert result.count("near_duplicate") == 2
    assert len(result.kept) == 31
    kept_ids = {r["id"] for r in result.kept}
    assert all(r["duplicate_of"] in kept_ids for r in result.removed)
    assert all("Jaccard" in r["detail"] for r in result.removed)


def test_pairs_below_threshold_are_not_merged() -> None:
    rng = random.Random(1)
    a = sentence(rng, 10)
    b = " ".join(a.split()[:5] + sentence(rng, 5).split())
    assert dedup.near_duplicate_pairs([dedup.normalize(a), dedup.normalize(b)], threshold=0.8) == []


def test_contradiction_with_majority_keeps_the_majority() -> None:
    rows = [row("Is it on?", "yes", "a"), row("is it ON?", "yes", "b"), row("Is it on?", "no", "c")]
    result = dedup.deduplicate(rows)
    assert [r["messages"][-1]["content"] for r in result.kept] == ["yes"]
    contradiction = [r for r in result.removed if r["reason"] == "contradiction"]
    assert [r["source"] for r in contradiction] == ["c"]
    assert contradiction[0]["duplicate_of"] in {rows[0]["id"], rows[1]["id"]}
    assert "majority" in contradiction[0]["detail"]


def test_contradiction_without_majority_drops_the_group() -> None:
    rows = [row("Is it on?", "yes"), row("Is it on?", "no"), row("Other question here", "z")]
    result = dedup.deduplicate(rows)
    assert [r["messages"][-1]["content"] for r in result.kept] == ["z"]
    assert result.count("contradiction") == 2
    assert all("no" in r["detail"] or "none" in r["detail"] for r in result.removed)


def test_counts_add_up_and_result_ignores_input_order() -> None:
    rng = random.Random(2)
    rows = [row(sentence(rng, 12), rng.choice("ab"), f"s{i}") for i in range(200)]
    rows += [dict(r, source=r["source"] + "-copy") for r in rows[:20]]
    rows += [row(r["messages"][0]["content"], "other", "c") for r in rows[20:25]]
    forward = dedup.deduplicate(rows)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    backward = dedup.deduplicate(shuffled)
    assert len(rows) == len(forward.kept) + len(forward.removed)
    assert forward.kept == backward.kept
    assert forward.removed == backward.removed


def test_lsh_bands_divide_the_permutations() -> None:
    bands = dedup.lsh_bands(0.8, 128)
    assert 128 % bands == 0 and 4 <= bands <= 64


def test_clusters_union_find() -> None:
    assert dedup.clusters(5, [(3, 4, 0.9), (1, 3, 0.9)]) == [0, 1, 2, 1, 1]
