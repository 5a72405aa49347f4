import random

from ftpipe.core import split, wrapping
from ftpipe_tests.intents import CORES, SYSTEM_PROMPT, wrapped_messages
from ftpipe_tests.rows import row, sentence


def wrapped_rows(n: int = 600, run_on: bool = False) -> list[dict]:
    """Short messages after a long shared system prompt: a core question in random wrapping."""
    return [row(message, label, f"chats.jsonl:line {i + 1}", system=SYSTEM_PROMPT)
            for i, (message, label) in enumerate(wrapped_messages(n, run_on=run_on))]


def core_of(message: str) -> str:
    return next(core for questions in CORES.values() for core in questions if core in message)


def test_a_core_question_in_other_wrapping_is_a_copy_and_the_wrapping_is_not_the_question() -> None:
    rows = wrapped_rows()
    copies = wrapping.wrapped_copies(rows)
    assert len(copies) > 0.9 * len(rows), "nearly every row repeats a core question some other row asks"
    cores = {" ".join(core.lower().split()) for questions in CORES.values() for core in questions}
    for index, held in copies.items():
        assert all(any(clause in core for core in cores) for clause in held), (
            "greetings, context and sign-offs go with every label: they are wrapping")
        label = rows[index]["messages"][-1]["content"]
        assert all(rows[i]["messages"][-1]["content"] == label and index in group for group in held.values()
                   for i in group)


def test_greetings_and_sign_offs_written_on_without_punctuation_are_taken_off_the_questions_edges() -> None:
    rows = wrapped_rows(run_on=True)
    assert rows[0]["messages"][1]["content"] == "hi where can I find the o settings page regards Tom (ticket 0)"
    copies = wrapping.wrapped_copies(rows)
    assert len(copies) > 0.9 * len(rows)
    for index, held in copies.items():
        assert all(clause in core_of(rows[index]["messages"][1]["content"]).lower() for clause in held)
    sides = split.assign_sides(rows, eval_fraction=0.2, seed=0)
    by_core: dict[str, set[str]] = {}
    for r in rows:
        by_core.setdefault(core_of(r["messages"][1]["content"]), set()).add(sides[r["id"]])
    assert all(len(found) == 1 for found in by_core.values()), "each core question's rows on one side"


def test_a_question_typed_with_a_slip_in_other_wrapping_is_a_copy_of_it() -> None:
    questions = {"shipping": "my parcel never arrived at all", "billing": "the invoice total looks wrong to me",
                 "login": "i cannot log into my account", "cancel": "please cancel my subscription right away"}
    slipped = {"shipping": "my parcle never arrived at all", "billing": "the invoce total looks wrong to me",
               "login": "i cannot log into my acount", "cancel": "please cancel my subscripton right away"}
    rng = random.Random(5)
    rows = [row(f"{rng.choice(['Hi', 'Hello', 'Hey there'])}, {questions[label]}. {rng.choice(['Thanks', 'Cheers'])}",
                label, f"chats.jsonl:line {i}") for i, label in enumerate(rng.choices(list(questions), k=120))]
    slips = [row(f"Hey there, {question}", label, f"more.csv:row {i}")  # no sign-off: no train row but for the slip
             for i, (label, question) in enumerate(slipped.items())]
    sides = split.assign_sides(rows + slips, eval_fraction=0.2, seed=0)
    for slip in slips:
        label = slip["messages"][1]["content"]
        assert {sides[r["id"]] for r in rows if r["messages"][1]["content"] == label} == {sides[slip["id"]]}
    leaks = split.find_leaks(rows, slips)
    assert [leak["same_question"] for leak in leaks] == list(slipped.values())


def test_a_sign_off_most_rows_write_as_a_sentence_of_its_own_is_wrapping_where_one_runs_it_on() -> None:
    questions = {"deposit": "is my money protected", "card": "how long does a new card take",
                 "fees": "why was I charged a fee", "limits": "what is the most I can withdraw"}
    rng = random.Random(7)
    rows = [row(f"{rng.choice(['Hi', 'Hello'])}, {questions[label]}? {rng.choice(['Please help.', 'Thanks!'])}",
                label, f"chats.jsonl:line {i}") for i, label in enumerate(rng.choices(list(questions), k=120))]
    run_on = [row(f"Hello, {question} Please help.", label, f"more.csv:row {i}")  # only these run it on
              for i, (label, question) in enumerate(questions.items())]
    copies = wrapping.wrapped_copies(rows + run_on)
    assert [list(copies[len(rows) + i]) for i in range(len(run_on))] == [[q.lower()] for q in questions.values()]
    sides = split.assign_sides(rows + run_on, eval_fraction=0.2, seed=0)
    for r in run_on:
        question = r["messages"][0]["content"].removeprefix("Hello, ").removesuffix(" Please help.")
        assert {sides[o["id"]] for o in rows if question in o["messages"][0]["content"]} == {sides[r["id"]]}


def test_a_greeting_written_onto_a_question_without_spaces_or_punctuation_is_wrapping_too() -> None:
    questions = {"reset_password": ["パスワードを忘れてしまいました", "パスワードリセットのメールが届きません"],
                 "cancel_order": ["注文をキャンセルしたいです", "先ほどの注文をキャンセルできますか"],
                 "refund_status": ["返金はいつになりますか", "まだ返金されていません"],
                 "payment_failed": ["カードの支払いができません", "決済エラーが出ます"]}
    openers = ["", "こんにちは", "お世話になっております", "すみません"]
    closers = ["", "よろしくお願いします", "ありがとうございます"]
    rng = random.Random(3)
    rows = [row(f"{rng.choice(openers)}{question}{rng.choice(closers)}", label, f"ja.jsonl:line {i}")
            for i, (label, question) in enumerate((label, rng.choice(asked)) for label, asked in
                                                  rng.choices(list(questions.items()), k=160))]
    sides = split.assign_sides(rows, eval_fraction=0.2, seed=0)
    asked = {}
    for r in rows:
        question = next(q for qs in questions.values() for q in qs if q in r["messages"][0]["content"])
        asked.setdefault(question, set()).add(sides[r["id"]])
    assert all(len(found) == 1 for found in asked.values()), "each question's rows on one side"
    hashed = [split.EVAL if split.hash_position(r["messages"][0]["content"], 0) < 0.2 else split.TRAIN
              for r in rows]  # a split made before
    leaks = split.find_leaks([r for r, side in zip(rows, hashed) if side == split.TRAIN],
                             [r for r, side in zip(rows, hashed) if side == split.EVAL])
    named = [leak["same_question"] for leak in leaks if "same_question" in leak]
    assert len(named) > 0.5 * len(leaks) and all(" " not in question for question in named), "named as written"
    assert len(leaks) == hashed.count(split.EVAL) and "パスワードを忘れてしまいました" in named


def test_a_question_of_its_own_beside_a_telling_phrase_is_no_copy_and_chance_is_no_sign() -> None:
    telling = "It would make a real difference for our team."
    requests = [row(f"Please add {feature}. {telling}", "feature_request", f"f:line {i}")
                for i, feature in enumerate(["dark mode", "CSV export", "an API for invoices", "a Slack hook",
                                             "two-factor login", "bulk edit", "custom fields", "audit logs"])]
    rng = random.Random(0)
    others = [row(sentence(rng, 12), "billing", f"g:line {i}") for i in range(40)]
    assert wrapping.wrapped_copies(requests + others) == {}, "each request asks for its own feature"
    alone = row(telling, "feature_request", "f:line 99")
    copies = wrapping.wrapped_copies(requests + others + [alone])
    assert list(copies) == [len(requests) + len(others)], "nothing but the telling phrase: what the others ask"
    coin = [row(f"Is this a scam call from the bank? {i}", "yes" if i < 6 else "no", f"h:line {i}") for i in range(12)]
    shared = [row("Got a text today, is it a scam", "no", f"h:line {i}") for i in (20, 21)]
    assert wrapping.wrapped_copies(coin + shared) == {}, "two rows of a two-label task agreeing is no sign"


def test_the_split_keeps_a_question_on_one_side_and_the_check_names_one_across() -> None:
    rows = wrapped_rows()
    sides = split.assign_sides(rows, eval_fraction=0.2, seed=0)
    by_core: dict[str, set[str]] = {}
    for r in rows:
        core = r["messages"][1]["content"].split(", ", 1)[1].split("?")[0]
        by_core.setdefault(core, set()).add(sides[r["id"]])
    assert all(len(found) == 1 for found in by_core.values()), "each core question's rows on one side"
    assert 0.05 < sum(side == split.EVAL for side in sides.values()) / len(rows) < 0.4

    hashed = {r["id"]: split.EVAL if split.hash_position(r["messages"][1]["content"], 0) < 0.2 else split.TRAIN
              for r in rows}  # a split made before
    train, evaluation = ([r for r in rows if hashed[r["id"]] == side] for side in (split.TRAIN, split.EVAL))
    leaks = split.find_leaks(train, evaluation)
    assert len(leaks) > 0.9 * len(evaluation)
    first = leaks[0]
    asked = next(r for r in evaluation if r["id"] == first["eval_id"])["messages"][1]["content"]
    assert first["same_question"] in asked.lower()
    assert split.leak_line(leaks).startswith(
        f"{len(leaks)} eval row(s) duplicate a train prompt, ask a train row's question in other wrapping, give a "
        f"train row's answer word for word or are held whole by a train conversation, e.g. "
        f"eval row {first['eval_source']} asks the question of train row "
        f"{first['train_source']} in other wrapping ('{first['same_question']}'); a new `split.seed` splits again")
    assert split.find_leaks([r for r in rows if sides[r["id"]] == split.TRAIN],
                            [r for r in rows if sides[r["id"]] == split.EVAL]) == []


def test_clauses_break_at_punctuation_mask_numbers_and_leave_long_messages_to_word_bigrams() -> None:
    def asked(text: str) -> frozenset[str]:
        return wrapping.clauses([{"role": "system", "content": "Classify. Reply with the intent."},
                                 {"role": "user", "content": text}, {"role": "assistant", "content": "x"}])

    assert asked("Hi!! Is order #12345 on its way?\nRegards, Tom") == {"hi", "is order 0 on its way", "regards", "tom"}
    assert asked("パスワードを忘れました。ありがとう") == {"パ ス ワ ー ド を 忘 れ ま し た", "あ り が と う"}
    assert len(asked("where is my order " * 30)) == 1, "120 words"
    assert asked("where is my order " * 31) == frozenset(), "longer: left to word bigrams"


def test_json_answers_are_one_answer_whatever_their_key_order_as_cleaning_compares_them() -> None:
    import json

    rows = wrapped_rows()
    as_json = [{**r, "messages": [*r["messages"][:-1], {"role": "assistant", "content": json.dumps(
        dict(sorted({"intent": r["messages"][-1]["content"], "urgent": False}.items(), reverse=i % 2 == 0)))}]}
        for i, r in enumerate(rows)]
    assert len({r["messages"][-1]["content"][:9] for r in as_json}) == 2, "both key orders are written"
    assert set(wrapping.wrapped_copies(as_json)) == set(wrapping.wrapped_copies(rows))
