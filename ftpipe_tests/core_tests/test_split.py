import json
import random
from pathlib import Path

from ftpipe.core import dedup, similarity, split
from ftpipe.core.preferences import as_chat, read_preferences, to_preference, write_preferences
from ftpipe.core.records import FormatSpec, example_id, examples_metadata, read_examples, write_examples
from ftpipe.core.results import read_result
from ftpipe_tests.intents import SYSTEM_PROMPT, intent_task, misspelt, misspelt_copies
from ftpipe_tests.rows import row, sentence


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [row(sentence(rng, 15), "a", f"s{i}") for i in range(n)]


def labelled(sizes: list[int], seed: int = 0) -> list[dict]:
    """Rows of distinct prompts, `sizes[k]` of them answering `label{k}`."""
    rng = random.Random(seed)
    return [row(sentence(rng, 12), f"label{k}", f"s{k}.{i}") for k, size in enumerate(sizes) for i in range(size)]


def held_out(sides: dict[str, str], group: list[dict]) -> int:
    return sum(sides[r["id"]] == split.EVAL for r in group)


def test_the_eval_share_is_the_configured_one_whatever_the_seed() -> None:
    generated = rows(1000)  # answers no other row gives, as a generation task's
    for seed in range(5):
        assert held_out(split.assign_sides(generated, eval_fraction=0.2, seed=seed), generated) == 200


def test_every_label_is_held_out_in_its_share_however_skewed_the_labels() -> None:
    sizes = [max(2, 300 // (k + 1)) for k in range(40)]  # 300, 150, 100, ... down to 2 rows a label
    data = labelled(sizes)
    for seed in range(3):
        sides = split.assign_sides(data, eval_fraction=0.15, seed=seed)
        assert abs(held_out(sides, data) - 0.15 * len(data)) <= 1
        for k, size in enumerate(sizes):
            if 0.15 * size >= 1:
                assert abs(held_out(sides, [r for r in data if r["messages"][-1]["content"] == f"label{k}"])
                           - 0.15 * size) < 1, f"label{k} of {size} rows"


def test_an_extractions_rows_are_held_out_in_the_share_of_each_value_of_its_fields_of_categories(tmp_path) -> None:
    from ftpipe.config import EvaluationConfig
    from ftpipe.core.evaluation.metrics import task_metrics

    rng = random.Random(3)
    issues = {"late_delivery": 90, "damaged_item": 60, "missing_item": 40, "cancellation": 45, "refund": 30}
    data = [row(sentence(rng, 12), json.dumps({"order": f"NW-{rng.randrange(10 ** 6):06d}", "issue": issue,
                                               "refund": rng.random() < 0.5}), f"a.jsonl:line {i}")
            for issue, size in issues.items() for i in range(size)]  # every answer an object of its own
    write_examples(data, tmp_path / "examples.parquet")
    summary = split.build_split(tmp_path / "examples.parquet", tmp_path / "split", eval_fraction=0.2, seed=0,
                                categories=task_metrics(EvaluationConfig(task_type="extraction")).categories)
    held = read_examples(tmp_path / "split" / "eval.parquet")
    assert summary["eval_rows"] == 53 and read_result(tmp_path / "split", "heldout_split").inputs["strata"] == ["issue"]
    assert [sum(json.loads(r["messages"][-1]["content"])["issue"] == issue for r in held) for issue in issues] == [
        18, 12, 8, 9, 6], "a fifth of each issue's rows"
    whole = split.assign_sides(data, eval_fraction=0.2, seed=0)
    assert sorted(held_out(whole, [r for r in data if f'"{issue}"' in r["messages"][-1]["content"]]) / size
                  for issue, size in issues.items()) != [0.2] * 5, "by whole answers: one label, shares by chance"


def test_a_classification_labels_only_row_trains_while_other_labels_fill_the_share() -> None:
    data = labelled([40, 30, 20] + [1] * 10)  # ten labels of one row each
    rare = data[90:]
    for seed in range(3):
        classified = split.assign_sides(data, eval_fraction=0.15, seed=seed, labelled=True)
        assert held_out(classified, rare) == 0 and held_out(classified, data) == 15
        generated = split.assign_sides(data, eval_fraction=0.15, seed=seed)  # answers no other row gives: one label
        assert held_out(generated, rare) in (1, 2) and held_out(generated, data) == 15


def test_adding_rows_never_moves_existing_rows_and_new_ones_fill_their_labels_share() -> None:
    old = labelled([100, 60, 30])
    before = split.assign_sides(old, eval_fraction=0.15, seed=0)
    grown = labelled([100, 60, 30, 40], seed=9)[190:]  # a new label of 40 rows
    after = split.assign_sides(old + rows(100, seed=9) + grown, eval_fraction=0.15, seed=0, previous=before)
    assert all(after[key] == side for key, side in before.items())
    assert held_out(after, grown) == 6


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


def paraphrases(n: int) -> list[tuple[dict, dict]]:
    """`n` word problems, each asked two ways with the same worked solution (as a math dataset's rewordings are)."""
    pairs = []
    for i in range(n):
        pens, friends = 20 + 2 * i, 2 + i % 5
        solution = f"Each friend gets {pens} / {friends} = {pens / friends:g}\n#### {pens / friends:g}"
        pairs.append((row(f"If Yuki divides {pens} pencils equally among {friends} friends, how many does each get?",
                          solution),
                      row(f"Yuki has {pens} pencils and shares them equally among {friends} friends. How many pencils "
                          "does each friend get?", solution + ".")))
    return pairs


def test_paraphrases_with_the_same_worked_solution_share_a_side_but_labels_and_stock_replies_do_not() -> None:
    asked_twice = paraphrases(40)
    stock = [row(sentence(random.Random(i), 12), "Thanks for reaching out, a colleague will reply within one day")
             for i in range(200)]
    sides = split.assign_sides([r for p in asked_twice for r in p] + stock + rows(200), eval_fraction=0.3, seed=0)
    assert all(sides[first["id"]] == sides[second["id"]] for first, second in asked_twice)
    assert {sides[first["id"]] for first, _ in asked_twice} == {split.TRAIN, split.EVAL}
    for group in (stock, rows(200)):  # the same long reply 200 times, the same one-word label 200 times
        share = sum(sides[r["id"]] == split.EVAL for r in group) / len(group)
        assert 0.2 < share < 0.4


def test_find_leaks_finds_a_paraphrase_by_its_answer_and_names_the_answer() -> None:
    (train_row, eval_row), *others = paraphrases(3)
    leaks = split.find_leaks([train_row, *(first for first, _ in others)], [eval_row])
    assert leaks == [{"eval_id": eval_row["id"], "eval_source": eval_row["source"], "train_id": train_row["id"],
                      "train_source": train_row["source"], "same_answer": "Each friend gets 20 / 2 = 10 #### 10"}]
    assert split.leak_line(leaks) == (
        f"1 eval row(s) duplicate a train prompt, ask a train row's question in other wrapping, give a train row's "
        f"answer word for word or are held whole by a train conversation, e.g. "
        f"eval row {eval_row['source']} gives the answer word for word of train row "
        f"{train_row['source']}; a new `split.seed` splits again")
    short = [row(p["messages"][0]["content"], "#### 10") for p in (train_row, eval_row)]
    assert split.find_leaks(short[:1], short[1:]) == [], "a short answer is no sign of the same question"


def test_a_small_labels_one_question_is_not_held_out_whole_to_make_up_the_share_of_all_rows() -> None:
    big, small = ("chat", "balance"), ("chat", "verify_my_identity")
    sizes = [4] * 10 + [3, 1]  # the big label's questions are asked 4 times each; the small one's 3 times, and once
    labels = [big] * 10 + [small] * 2
    positions = [0.5 + n / 100 for n in range(10)] + [0.1, 0.9]
    sides = split._stratified_sides(sizes, labels, [None] * 12, positions, eval_fraction=0.15)
    held = {label: sum(size for size, side, of in zip(sizes, sides, labels) if of == label and side == split.EVAL)
            for label in (big, small)}
    assert held[small] <= 2, "it keeps as many rows to learn from as it holds out"
    assert held == {big: 8, small: 0} and 8 / 44 - 0.15 < 4 / 44, "the share of all rows within half a group"


def test_an_order_sent_twice_with_the_same_compact_json_answer_shares_a_side_and_is_a_leak_across() -> None:
    cities = ["Malmö", "Köln", "Zürich", "Kraków", "São Paulo"]
    sent_twice = []
    for i in range(40):
        answer = json.dumps({"order_id": f"A-{10200 + i}", "product": "cutting board", "quantity": 1 + i % 4,
                             "city": cities[i % 5], "gift": False}, separators=(",", ":"), ensure_ascii=False)
        order = f"Order A-{10200 + i}: {1 + i % 4} x cutting boards, ship to {cities[i % 5]}."
        sent_twice.append((row(f"{order}\n\nSent from my iPhone", answer),
                           row(f"{order}\n\nSorry for the double message. Cheers", answer)))
    sides = split.assign_sides([r for pair in sent_twice for r in pair] + rows(200), eval_fraction=0.3, seed=0)
    assert all(sides[first["id"]] == sides[second["id"]] for first, second in sent_twice)
    (train_row, eval_row), *others = sent_twice
    leaks = split.find_leaks([train_row, *(first for first, _ in others)], [eval_row])
    assert [(leak["train_id"], leak["same_answer"]) for leak in leaks] == [
        (train_row["id"], train_row["messages"][-1]["content"][:79] + "…")]


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
    assert split.leak_line([]).startswith("no leakage: no eval row duplicates"), "what was looked for"
    near = next(leak for leak in leaks if leak["eval_id"] == leaked_near["id"])
    assert f"e.g. eval row {leaked_near['source']} near-identical (Jaccard {near['similarity']:.2f}) to train row " in (
        split.leak_line([near]))


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


def pair(prompt: str, chosen: str = "good", rejected: str = "bad", source: str = "p:line 1") -> dict:
    return to_preference({"prompt": prompt, "chosen": chosen, "rejected": rejected}, FormatSpec(), source)


def build(folder: Path, chat: list[dict], pairs: list[dict] | None, out: Path, eval_fraction: float = 0.5) -> dict:
    """Split `chat` rows and `pairs` (no preferences file when None) written as a deduplicated folder."""
    folder.mkdir(parents=True, exist_ok=True)
    write_examples(chat, folder / "examples.parquet")
    if pairs is not None:
        write_preferences(pairs, folder / "preferences.parquet")
    return split.build_split(folder / "examples.parquet", out, eval_fraction=eval_fraction, seed=0)


def test_chat_rows_and_preference_pairs_giving_the_same_labels_are_each_held_out_in_their_share(
        tmp_path: Path) -> None:
    rng = random.Random(4)
    colors = ["red", "green", "blue", "yellow"]
    chat = [row(f"What color is thing {sentence(rng, 6)}?", colors[i % 4], f"c:line {i}") for i in range(60)]
    pairs = [pair(f"Which color does {sentence(rng, 6)} have?", colors[i % 4], "grey", f"p:line {i}")
             for i in range(60)]
    summary = build(tmp_path / "dedup", chat, pairs, tmp_path / "split", eval_fraction=0.25)
    assert (summary["eval_rows"], summary["eval_pairs"]) == (15, 15)


def test_emails_with_a_preference_pair_are_held_out_in_their_share_too() -> None:
    rng = random.Random(6)
    emails = [sentence(rng, 20) for _ in range(240)]
    chat = [row(email, sentence(rng, 15), f"c:line {i}") for i, email in enumerate(emails[:200])]
    prompts = [as_chat(pair(email, sentence(rng, 15), sentence(rng, 15), f"p:line {i}"))
               for i, email in enumerate(emails[160:])]
    for seed in range(4):
        sides = split.assign_sides(chat + prompts, eval_fraction=0.25, seed=seed,
                                   kinds=["chat"] * len(chat) + ["preference"] * len(prompts))
        assert held_out(sides, chat[160:]) == 10, "a quarter of the emails that have both"
        assert held_out(sides, chat[:160]) == 40 and held_out(sides, prompts[40:]) == 10


def test_all_rows_of_one_prompt_are_on_one_side_and_adding_rows_never_moves_them(tmp_path: Path) -> None:
    rng = random.Random(5)
    prompts = [sentence(rng, 12) for _ in range(30)]
    pairs = [pair(p, chosen, rejected, f"p:line {i}") for i, p in enumerate(prompts)
             for chosen, rejected in (("a", "b"), ("a", "c"), ("b", "c"))]
    pairs += [to_preference({"prompt": p, "completion": "a", "label": True}, FormatSpec(), "k:line 1") for p in prompts]
    summary = build(tmp_path / "one", rows(40), pairs, tmp_path / "split")
    assert summary["train_pairs"] + summary["eval_pairs"] == len(pairs) and summary["eval_pairs"] > 0
    train, evaluation = (read_preferences(tmp_path / "split" / name)
                         for name in ("train_preferences.parquet", "eval_preferences.parquet"))
    assert len(evaluation) == summary["eval_pairs"] and len(train) == summary["train_pairs"]
    assert summary["unpaired_eval_rows"] == sum(row["chosen"] is None for row in evaluation) > 0
    assert summary["unpaired_train_rows"] + summary["unpaired_eval_rows"] == len(prompts), "one unpaired row a prompt"
    side = {row["id"]: "train" for row in train} | {row["id"]: "eval" for row in evaluation}
    for prompt in prompts:
        assert len({side[row["id"]] for row in pairs if row["prompt"][-1]["content"] == prompt}) == 1
    before = json.loads((tmp_path / "split" / "split.json").read_text())["sides"]
    assert all(before[row["id"]] == side[row["id"]] for row in pairs)
    more = [pair(sentence(rng, 12), source=f"q:line {i}") for i in range(60)]
    grown = build(tmp_path / "two", rows(40) + rows(30, seed=8), pairs + more, tmp_path / "split")
    assert grown["new_train_rows"] + grown["new_eval_rows"] == 30 + 60 and grown["new_eval_rows"] > 0
    assert summary["new_train_rows"] == summary["new_eval_rows"] == 0, "a first split has nothing to call new"
    after = json.loads((tmp_path / "split" / "split.json").read_text())["sides"]
    assert all(after[key] == value for key, value in before.items())
    assert read_result(tmp_path / "split").produced["eval_preferences"] == "eval_preferences.parquet"
    assert split.changes_said(grown) == (f"; 90 new since the last split ({grown['new_train_rows']} train, "
                                         f"{grown['new_eval_rows']} eval), the others on their sides")
    left = pairs[:9] + rows(40)[:4]  # cleaning removed them this time
    shrunk = build(tmp_path / "three", rows(40)[4:] + rows(30, seed=8), pairs[9:] + more, tmp_path / "split")
    gone = [after[row["id"]] for row in left]
    assert (shrunk["gone_train_rows"], shrunk["gone_eval_rows"]) == (gone.count("train"), gone.count("eval"))
    assert split.changes_said(shrunk) == (f"; 13 of the last split's rows left it ({gone.count('train')} train, "
                                          f"{gone.count('eval')} eval): cleaning removed them, or the raw files no "
                                          "longer hold them")


def conversation(turns: list[str], source: str) -> dict:
    """A row of alternating user and assistant `turns`, after a system message."""
    messages = [{"role": "system", "content": "You are the shop's support assistant."}] + [
        {"role": "user" if at % 2 == 0 else "assistant", "content": text} for at, text in enumerate(turns)]
    return {"id": example_id(messages), "messages": messages, "source": source}


def test_a_conversation_another_row_holds_whole_shares_its_side_and_is_a_leak_across_the_split() -> None:
    rng = random.Random(11)
    greeting = ["Hi there", "Hello! How can I help you today?"]
    chats = [conversation(greeting + [sentence(rng, 8), sentence(rng, 12)], f"c:line {i}") for i in range(60)]
    continued = [conversation([m["content"] for m in chat["messages"][1:]] + ["And the other one?", sentence(rng, 9)],
                              f"d:line {i}") for i, chat in enumerate(chats[:20])]
    faq = [conversation([m["content"] for m in chat["messages"][3:5]], f"faq.csv:line {i}")
           for i, chat in enumerate(chats[20:30])]  # a question and answer a conversation holds after its greeting
    opener = conversation(greeting, "faq.csv:line 99")  # held by every conversation: no copy of any of them
    rows = chats + continued + faq + [opener]
    sides = split.assign_sides(rows, eval_fraction=0.3, seed=0)
    for short, long in zip(chats[:20] + faq, continued + chats[20:30]):
        assert sides[short["id"]] == sides[long["id"]]
    assert sum(sides[row["id"]] == "eval" for row in chats) > 5, "the greeting every chat opens with links none"
    leaks = split.find_leaks([continued[0], chats[21]], [chats[0], faq[1]])
    assert [(leak["eval_source"], leak["train_source"]) for leak in leaks] == [("c:line 0", "d:line 0"),
                                                                            ("faq.csv:line 1", "c:line 21")]
    assert "c:line 0 is held whole, answer and all, by train row d:line 0" in split.leak_line(leaks)
    assert split.find_leaks([chats[0]], [continued[0]]) == [], "a train conversation continued in eval: a new answer"


def test_a_preference_prompt_near_a_chat_prompt_takes_its_side(tmp_path: Path) -> None:
    chat = rows(60)
    near = [pair(" ".join(row["messages"][0]["content"].split()[:-1] + ["zulu"]), source=f"p:line {i}")
            for i, row in enumerate(chat[:12])]
    build(tmp_path / "in", chat, near, tmp_path / "split")
    sides = json.loads((tmp_path / "split" / "split.json").read_text())["sides"]
    assert all(sides[p["id"]] == sides[row["id"]] for p, row in zip(near, chat))
    assert len({sides[row["id"]] for row in chat[:12]}) == 2
    assert split.split_leaks(tmp_path / "split", similarity.Settings()) == []


def test_the_leak_check_finds_a_planted_preference_leak(tmp_path: Path) -> None:
    chat = rows(40)
    pairs = [pair(sentence(random.Random(i), 15), source=f"p:line {i}") for i in range(20)]
    build(tmp_path / "in", chat, pairs, tmp_path / "split")
    train_chat = read_examples(tmp_path / "split" / "train.parquet")
    train_pairs = read_preferences(tmp_path / "split" / "train_preferences.parquet")
    evaluation = read_preferences(tmp_path / "split" / "eval_preferences.parquet")
    near_chat = pair(train_chat[0]["messages"][0]["content"].upper() + "!", source="x:line 1")
    near_pair = pair(" ".join(train_pairs[0]["prompt"][-1]["content"].split()[:-1] + ["zulu"]), "x", "y", "x:line 2")
    write_preferences(evaluation + [near_chat, near_pair], tmp_path / "split" / "eval_preferences.parquet")
    leaks = split.split_leaks(tmp_path / "split", similarity.Settings())
    assert {(leak["eval_id"], leak["train_id"]) for leak in leaks} == {
        (near_chat["id"], train_chat[0]["id"]), (near_pair["id"], train_pairs[0]["id"])}


def test_a_task_without_preference_rows_splits_to_the_same_chat_files(tmp_path: Path) -> None:
    """No preferences file, an empty one, or preference prompts unlike every chat prompt: the same chat files (the
    SFT training fingerprint hashes them)."""
    chat = intent_task(seed=1).rows
    unlike = [pair(sentence(random.Random(i), 15), source=f"p:line {i}") for i in range(10)]
    for name, pairs in (("none", None), ("empty", []), ("unlike", unlike)):
        summary = build(tmp_path / f"in_{name}", chat, pairs, tmp_path / name, eval_fraction=0.15)
        assert summary["train_pairs"] + summary["eval_pairs"] == len(pairs or [])
    for file in ("train.parquet", "eval.parquet"):
        assert (tmp_path / "none" / file).read_bytes() == (tmp_path / "empty" / file).read_bytes()
        assert (tmp_path / "none" / file).read_bytes() == (tmp_path / "unlike" / file).read_bytes()
    assert (tmp_path / "none" / "split.json").read_bytes() == (tmp_path / "empty" / "split.json").read_bytes()


def test_a_system_prompt_shared_by_preference_rows_does_not_group_them(tmp_path: Path) -> None:
    spec = FormatSpec(system_prompt=SYSTEM_PROMPT)
    pairs = [to_preference({"prompt": row["messages"][1]["content"], "chosen": "yes", "rejected": "no"}, spec,
                           f"p:line {i}") for i, row in enumerate(intent_task(seed=4).rows[:200])]
    summary = build(tmp_path / "in", [], pairs, tmp_path / "split", eval_fraction=0.2)
    assert 0.1 < summary["eval_pairs"] / len(pairs) < 0.3
    assert split.split_leaks(tmp_path / "split", similarity.Settings()) == []


def test_preference_prompts_without_a_system_message_get_the_one_the_chat_rows_and_serving_start_with(
        tmp_path: Path) -> None:
    chat = intent_task(seed=3).rows[:150]  # short messages after one long shared system prompt
    bare = [pair(row["messages"][1]["content"] + " (again)", source=f"p:line {i}") for i, row in enumerate(chat[:40])]
    own = [to_preference({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                          "chosen": "Hi.", "rejected": "Hello there, how are you today?"}, FormatSpec(), "p:line 41")]
    summary = build(tmp_path / "in", chat, bare + own, tmp_path / "split", eval_fraction=0.2)
    assert summary["preference_rows_given_system_prompt"] == 40
    written = [row for name in ("train_preferences.parquet", "eval_preferences.parquet")
               for row in read_preferences(tmp_path / "split" / name)]
    systems = {row["id"]: row["prompt"][0]["content"] for row in written if row["prompt"][0]["role"] == "system"}
    assert systems == {**{row["id"]: SYSTEM_PROMPT for row in bare}, own[0]["id"]: "Be brief."}, "its own one is kept"
    assert split.split_leaks(tmp_path / "split", similarity.Settings()) == [], "the shared prompt is no likeness"
    alone = build(tmp_path / "alone", [], bare, tmp_path / "split_alone")
    assert alone["preference_rows_given_system_prompt"] == 0, "without chat rows there is no default to give"


def test_short_copies_with_one_word_misspelt_share_a_side_and_one_across_the_split_is_a_leak() -> None:
    task = intent_task(600, near=0, contradictions=0)  # distinct short messages after one long system prompt
    originals = task.rows[:80]
    copies = misspelt_copies(originals)
    together = task.rows + copies
    assert similarity.blind_spot(similarity.Settings()) == 19, "the README's number"
    caught = split._similar_prompts(together, similarity.Settings(), None)
    assert len(caught) < len(copies) / 10, "a short message's one typo leaves too few word bigrams for Jaccard"
    texts = [similarity.prompt_text(row["messages"]) for row in task.rows]
    assert similarity.misspelt_copies(texts) == [], "the task's distinct messages (other cards, places, days) differ"

    sides = split.assign_sides(together, eval_fraction=0.3, seed=0)
    assert all(sides[row["id"]] == sides[f"typo-{i}"] for i, row in enumerate(originals))
    assert 0.2 < sum(side == split.EVAL for side in sides.values()) / len(sides) < 0.4

    original, copy = originals[0], copies[0]
    leaks = split.find_leaks(task.rows, [copy])
    typed, meant = next((a, b) for a, b in zip(misspelt(original["messages"][1]["content"]).lower().split(),
                                               original["messages"][1]["content"].lower().split()) if a != b)
    assert leaks == [{"eval_id": "typo-0", "eval_source": "more.csv:row 2", "train_id": original["id"],
                      "train_source": original["source"], "misspelt": f"'{typed}' for '{meant}'"}]
    assert (f"e.g. eval row more.csv:row 2 is train row {original['source']} with one word misspelt ('{typed}' for "
            f"'{meant}'); a new `split.seed` splits again") in split.leak_line(leaks)
    assert similarity.misspelt_copies(["order A-92776 is late", "order A-92706 is late"]) == [], "another order"
    assert similarity.misspelt_copies(["Where's my REFUND?", "where is my refnd", "where's my refnd"]) == [(0, 2, 2)]


def test_one_answer_ending_a_fifth_of_the_train_rows_is_named_with_the_advice_that_fits_the_rows() -> None:
    rng = random.Random(2)
    varied = [row(sentence(rng, 10), sentence(rng, 10), f"a:line {i}") for i in range(30)]
    closing = [row(sentence(rng, 10), "You are  welcome!" if i % 2 else "you are welcome!", f"b:line {i}")
               for i in range(8)]
    assert split.stock_answer(varied + closing) == (
        "8 of 38 train rows (21%) end with the same answer ('you are welcome!'): the model learns to give it to much "
        "of what it is asked; keep as many of these rows as there are questions it is the right reply to, or leave "
        "them out")
    opening = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "How can I help?"}]
    thanked = [{**r, "messages": [*opening, *r["messages"]]} for r in closing]
    assert split.stock_answer(varied + thanked).endswith(
        "only a row's final assistant message is learnt, so this answer is much of what the model learns; learn every "
        "assistant turn of multi-turn rows (training.every_turn: true), or give each turn worth learning a row of its "
        "own"), "a sign-off ending conversations"
    assert split.stock_answer(varied[:20] + thanked, every_turn=True) == (
        "8 of the 36 assistant turns the train rows teach (22%) are the same answer ('How can I help?'): with "
        "training.every_turn every assistant turn is learnt, so this answer is much of what the model learns; take "
        "such turns out of the rows, or learn final turns only (training.every_turn: false) where those vary more"), \
        "learning every turn, a greeting opening conversations"
    assert split.stock_answer(varied + closing[:7]) is None, "under a fifth"
    assert split.stock_answer(varied[:8] + closing[:4]) is None, "too few rows to say"
