import json
import random

import numpy as np

from ftpipe.config import EvaluationConfig
from ftpipe.core import dedup, similarity, split
from ftpipe.core.evaluation.metrics import task_metrics
from ftpipe.core.records import example_id, examples_metadata, read_examples, write_examples
from ftpipe.core.results import read_result
from ftpipe.core.text import canonical, loose
from ftpipe_tests.emails import QUESTIONS, wrapped_emails
from ftpipe_tests.intents import SYSTEM_PROMPT, intent_task
from ftpipe_tests.rows import row, sentence


def test_canonical_is_nfkc_casefold_whitespace_and_loose_drops_punctuation() -> None:
    assert canonical("  Ｈello\t WORLD \n ") == "hello world"
    assert canonical("Straße") == canonical("STRASSE")
    assert canonical("Zero\u200bwidth\u00ad text\ufeff ❤\ufe0f") == "zerowidth text ❤", "invisible characters go"
    assert loose("Hello, WORLD!") == "hello world" and canonical("Hello, WORLD!") == "hello, world!"


def test_exact_duplicates_after_normalisation_keep_one() -> None:
    rows = [row("Reset my password", "account"), row("reset  my PASSWORD ", "account", "g:line 4")]
    result = dedup.deduplicate(rows)
    assert len(result.kept) == 1 and result.count("exact_duplicate") == 1
    removed = result.removed[0]
    assert removed["duplicate_of"] == result.kept[0]["id"]
    assert removed["reason"] == "exact_duplicate"
    assert removed["detail"] == ("the same conversation after normalisation (Unicode forms, case, spacing, "
                                 "JSON key order)")
    again = dedup.deduplicate([row("Reset my password", "account", "a.csv:row 2"),
                               row("Reset my password", "account", "a.csv:row 9")])
    assert again.removed[0]["duplicate_of"] == again.removed[0]["id"] and again.removed[0]["detail"] == (
        "the same conversation, character for character (so the same id)"), "why a row is a duplicate of its own id"


def test_json_answers_differing_in_key_order_or_spacing_are_one_answer() -> None:
    rng = random.Random(3)
    orders = [(f"A{n}", issue) for n, issue in enumerate(["refund", "late", "broken", "double_charge"] * 3)]
    spaced = [row(f"order {o} {sentence(rng, 12)}", f'{{"order_id": "{o}", "issue": "{i}"}}', f"chat.jsonl:line {n}")
              for n, (o, i) in enumerate(orders)]
    compact = [row(r["messages"][0]["content"], f'{{"issue":"{i}","order_id":"{o}"}}', f"export.csv:row {n}")
               for n, (r, (o, i)) in enumerate(zip(spaced, orders))]
    typo = row(spaced[0]["messages"][0]["content"].replace("order", "ordr"), '{ "issue" : "refund" , "order_id":"A0"}')
    other = row(spaced[1]["messages"][0]["content"], '{"order_id": "A1", "issue": "refund"}', "export.csv:row 99")
    result = dedup.deduplicate([*spaced, *compact, typo, other])
    counts = [result.count(reason) for reason in ("exact_duplicate", "near_duplicate", "contradiction")]
    assert counts == [12, 1, 1]
    assert [r["messages"] for r in result.kept] == [r["messages"] for r in spaced], "the first written stay, as written"
    written = {r["source"]: r["messages"][-1]["content"] for r in result.removed}
    assert written[other["source"]] == other["messages"][-1]["content"], "another value is another answer"
    assert written["export.csv:row 5"] == '{"issue":"late","order_id":"A5"}', "removed rows keep their answers"
    assert written[typo["source"]] == typo["messages"][-1]["content"]


def test_the_row_written_first_stays_whatever_the_ids() -> None:
    rng = random.Random(9)
    original = row(sentence(rng, 30), "x", "tickets.csv:row 9")
    words = original["messages"][0]["content"].split()
    copies = [row(" ".join(words[:i] + ["typo"] + words[i + 1:]), "x", "tickets.csv:row 10") for i in range(30)]
    copy = next(c for c in copies if c["id"] < original["id"])  # first by id, written after
    result = dedup.deduplicate([copy, original] + [row(sentence(rng, 30), "y", f"more.csv:row {i}") for i in range(9)])
    [removed] = result.removed
    assert removed["source"] == "tickets.csv:row 10" and removed["duplicate_of_source"] == "tickets.csv:row 9"


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
    assert similarity.similar_pairs(similarity.shingles([[("user", a)], [("user", b)]], 3)) == []


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


def test_a_free_text_task_keeps_the_first_of_two_wordings_of_one_answer() -> None:
    """Two titles for one ticket can both be right: a generation task keeps the one written first, exact or near."""
    rng = random.Random(11)
    ticket = sentence(rng, 20)
    rows = [row("Printer on floor 3 is jammed again", "Printer jam on floor 3", "t.csv:row 2"),
            row("printer on floor 3 is JAMMED again", "Floor 3 printer jammed", "t.csv:row 7"),
            row(ticket, "Login fails after password reset", "t.csv:row 3"),
            row(ticket + " please", "Password reset breaks login", "t.csv:row 9")]
    others = [row(sentence(rng, 20), f"title {i}", f"u.csv:row {i}") for i in range(5)]
    labels = dedup.deduplicate(rows + others)
    assert labels.count("contradiction") == 4 and len(labels.kept) == 5, "labels: no majority, the group goes"
    titles = dedup.deduplicate(rows + others, free_text=True)
    kept = {r["messages"][-1]["content"] for r in titles.kept}
    assert {"Printer jam on floor 3", "Login fails after password reset"} <= kept and len(titles.kept) == 7
    assert sorted(r["source"] for r in titles.removed) == ["t.csv:row 7", "t.csv:row 9"]
    assert all(r["detail"].endswith("a free-text task keeps the first row written") for r in titles.removed)


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
    bands = similarity.lsh_bands(0.8, 128)
    assert 128 % bands == 0 and 4 <= bands <= 64


def test_components_union_find() -> None:
    assert similarity.components(5, [(3, 4, 0.9), (1, 3, 0.9)]) == [0, 1, 2, 1, 1]


def test_short_messages_with_a_long_shared_system_prompt_keep_their_labels() -> None:
    task = intent_task()
    result = dedup.deduplicate(task.rows)
    label = {r["id"]: r["messages"][-1]["content"] for r in task.rows}
    near = {r["id"]: r["duplicate_of"] for r in result.removed if r["reason"] == "near_duplicate"}
    assert {frozenset(pair) for pair in near.items()} == {frozenset(p) for p in task.near_duplicates.items()}
    assert all(label[a] == label[b] for a, b in near.items())
    contradicted = {r["id"] for r in result.removed if r["reason"] == "contradiction"}
    assert contradicted == set(task.contradictions) | set(task.contradictions.values())
    assert len(result.removed) == len(task.near_duplicates) + 2 * len(task.contradictions)
    assert len(result.shared) > 20  # the system prompt's shingles, left out of the comparison


def test_a_repeated_preamble_inside_the_user_message_does_not_make_rows_similar() -> None:
    preamble = "Classify the following message from a customer of our bank into one of the known intents. Message:"
    rows = [row(f"{preamble} {text}", label) for text, label in (
        ("how do i activate my card", "activate"), ("please give me a refund", "refund"),
        ("how do I delete my account now", "terminate"), ("my pin is blocked", "pin"),
        ("the transfer never arrived", "transfer"), ("why was my card declined", "declined"),
        ("can my child open an account", "age"), ("my card has not arrived yet", "arrival"),
        ("top up failed this morning", "top_up"), ("what exchange rate do you use", "rate"),
    )]
    result = dedup.deduplicate(rows)
    assert result.removed == [] and len(result.kept) == 10


def test_near_identical_prompts_with_different_answers_are_contradictions_not_duplicates() -> None:
    rng = random.Random(5)
    text = sentence(rng, 20)
    rows = [row(text, "billing", "a"), row(text + " please", "billing", "b"), row(text + "!", "shipping", "c")]
    result = dedup.deduplicate(rows + [row(sentence(rng, 20), "other", f"x{i}") for i in range(5)])
    assert result.count("near_duplicate") == 1 and result.count("contradiction") == 1
    contradiction = next(r for r in result.removed if r["reason"] == "contradiction")
    assert contradiction["source"] == "c" and "majority (2 of 3 rows)" in contradiction["detail"]


def test_rows_whose_answers_differ_where_their_prompts_do_are_two_examples() -> None:
    notice = ("Order {} from the Berlin warehouse was shipped on 3 May by express courier to the customer, who asked "
              "us to confirm the delivery window and the tracking number as soon as possible, thank you")
    extraction = [row(notice.format(number), f'{{"order": "{number}", "city": "Berlin"}}', f"e{number}")
                  for number in ("A-10422", "A-10977", "A-31005")]
    copied = [row(notice.format("A-10977") + ". Regards", '{"order": "A-10977", "city": "Berlin"}', "again")]
    rng = random.Random(6)
    others = [row(sentence(rng, 20), "other", f"x{i}") for i in range(12)]  # the notice is not most rows' text
    result = dedup.deduplicate(extraction + copied + others)
    assert sorted(r["messages"][-1]["content"] for r in result.kept if r not in others) == sorted(
        r["messages"][-1]["content"] for r in extraction), "one row per order number"
    [removed] = result.removed
    assert removed["reason"] == "near_duplicate" and removed["source"] in {"again", "eA-10977"}, "a true duplicate"
    text = sentence(rng, 20)
    decided = [row(text + " about billing", "billing", "b"), row(text + " about shipping", "shipping", "s")]
    assert len(dedup.deduplicate(decided).kept) == 2, "the prompts differ in the word that decides the label"
    for cancel, renew in (("cancel_order", "renew_order"), ("cancel-order", "renew-order"),
                          ("CancelOrder", "RenewOrder")):
        joined = [row(f"{text} please {verb} my order", label, verb) for verb, label in (("cancel", cancel),
                                                                                         ("renew", renew))]
        kept = dedup.deduplicate(joined + others).kept
        assert len(kept) == 14, f"{cancel}: a label's words joined are still its words"
    mislabelled = [row(text + " about billing", "billing", "b"), row(text + " about billing!", "refund", "r"),
                   row(text + " about billing.", "billing", "b2")]
    result = dedup.deduplicate(mislabelled)
    assert [r["source"] for r in result.removed if r["reason"] == "contradiction"] == ["r"], "still a contradiction"


def test_json_answers_that_differ_in_one_field_are_two_answers() -> None:
    order = {"customer": "Maria Lopez", "item": "lemon tart", "quantity": 6, "date": "2026-06-02", "notes": None}
    asked = "Can I get 6 lemon tarts for Tuesday the 2nd? Thanks, Maria Lopez"
    rng = random.Random(8)
    others = [row(sentence(rng, 20), "other", f"x{i}") for i in range(12)]
    disagree = [row(asked, json.dumps(order), "a"), row(asked.lower() + "??", json.dumps({**order, "quantity": 16}), "b")]
    assert dedup.deduplicate(disagree + others).count("contradiction") == 2, "6 or 16: no majority, both go"
    again = [row(asked, json.dumps(order), "a"), row(asked.lower() + "??", json.dumps(dict(reversed(order.items()))),
                                                     "b")]
    [removed] = dedup.deduplicate(again + others).removed
    assert removed["reason"] == "near_duplicate" and removed["detail"].endswith("answer Jaccard 1.00")


def test_an_answer_written_two_ways_is_one_answer_and_a_templates_problems_are_not_contradictions() -> None:
    question = "A car drives at 65 km/h for 5 hours. How far does it go?"
    solution = "Distance is speed times time: 65 * 5 = 325 km.\n#### 325"
    written_twice = [row(question, solution + ".", "a"), row(question, solution, "b")]
    problem = ("The regular price of a bike is ${}, and the shop takes 20% off in its spring sale. What does the bike "
               "cost in the sale?")
    template = [row(problem.format(price), f"20% of {price} is {price // 5}.\n#### {price - price // 5}", f"t{price}")
                for price in (120, 150, 40, 1200)]
    rng = random.Random(7)
    others = [row(sentence(rng, 20), "other", f"x{i}") for i in range(12)]  # the template is not most rows' text
    result = dedup.deduplicate(written_twice + template + others)
    [removed] = result.removed
    assert removed["reason"] == "near_duplicate" and {removed["source"], removed["duplicate_of_source"]} == {"a", "b"}
    assert all(r in result.kept for r in template), "prices decide the answers"
    assert similarity.similar_pairs(similarity.shingles([[("user", r["messages"][0]["content"])] for r in template],
                                                        2)), "the template's prompts are near-identical"
    worded = [row(problem.format(120), "#### 96", "w1"),
              row(problem.format(120).replace("spring", "summer"), "#### 90", "w2")]
    assert dedup.deduplicate(worded + others).count("contradiction") == 2, "a word, not a number: a contradiction"
    miscounted = [row(question, solution, "c"), row(question, solution.replace("#### 325", "#### 330"), "d")]
    assert dedup.deduplicate(miscounted + others).count("contradiction") == 2, "another final answer disagrees"


def test_a_templates_problems_apart_in_a_sign_or_with_alike_solutions_are_two_problems() -> None:
    rng = random.Random(7)
    others = [row(sentence(rng, 20), "other", f"x{i}") for i in range(12)]
    problem = "At 6 am the temperature was {} degrees, and by noon it had dropped {} degrees. What was it at noon?"
    solution = "It started at {0} degrees and fell {1}, so {0} - {1} = {2}.\n#### {2}"
    signs = [row(problem.format(start, 14), solution.format(start, 14, start - 14), f"s{start}") for start in (-1, 1)]
    assert dedup.deduplicate(signs + others).removed == [], "-1 is not 1: two problems, not a contradiction"
    drops = [row(problem.format(-2, drop), solution.format(-2, drop, -2 - drop), f"d{drop}") for drop in (12, 4)]
    assert dedup.deduplicate(drops + others).removed == [], "alike solutions with their own results: no near-duplicate"
    fraction = [row(problem.format(start, 2), solution.format(start, 2, 0), f"f{start}") for start in ("1/2", "12")]
    assert dedup.deduplicate(fraction + others).removed == [], "1/2 is not 12"


def test_prompts_apart_in_an_operator_are_two_problems_and_prose_punctuation_still_makes_a_copy() -> None:
    rng = random.Random(7)
    others = [row(sentence(rng, 20), f"answer {i}", f"x{i}") for i in range(12)]
    drills = [row(f"What is 12 {sign} 7? Reply with the number only.", str(result), f"d{index}")
              for index, (sign, result) in enumerate((("+", 19), ("*", 84), ("-", 5)))]
    brackets = [row("Evaluate (12 + 7) * 3 and reply with the number only.", "57", "b1"),
                row("Evaluate 12 + 7 * 3 and reply with the number only.", "33", "b2")]
    code = [row(f"Write a Python function that returns x {op} 2 for a given number x.",
                f"def f(x):\n    return x {op} 2", f"c{len(op)}") for op in ("*", "**")]
    python = [row(f"In Python, what does the expression a {op} b compute for two integers?", meaning, f"p{len(op)}")
              for op, meaning in (("/", "True division."), ("//", "Floor division."))]
    assert dedup.deduplicate(drills + brackets + code + python + others).removed == [], "each is its own problem"
    copies = [row("Hi - my card was declined at the shop today, why?", "declined_card_payment", "q1"),
              row("Hi, my card was declined at the shop today (why?)", "declined_card_payment", "q2"),
              row("What is 12 + 7 ? Reply with the number only.", "19", "q3")]
    removed = dedup.deduplicate(drills + copies + others).removed
    assert sorted((r["source"], r["reason"]) for r in removed) == [
        ("q2", "near_duplicate"), ("q3", "near_duplicate")], "prose dashes and brackets, spacing: copies"


def test_sql_and_code_answers_apart_in_an_operator_a_literal_or_a_block_are_other_answers() -> None:
    rng = random.Random(7)
    others = [row(sentence(rng, 20), f"SELECT {i};", f"x{i}") for i in range(12)]
    count = "Count the orders in the shop database that were placed by the customer with the id {}?"
    template = [row(count.format(n), f"SELECT COUNT(*) FROM orders WHERE customer_id = {n};", f"t:line {n}")
                for n in range(3060, 3070)]  # other problems beside the one in question: no votes in it
    negated = [row(count.format(3057), "SELECT COUNT(*) FROM orders WHERE customer_id != 3057;", "a:line 1"),
               row(count.format(3057)[:-1], "select count(*) from orders where customer_id = 3057", "b:line 1"),
               row(count.format(3057)[:-1], "SELECT COUNT(*) FROM orders WHERE customer_id = 3057;", "c:line 1")]
    name = "Find the emails of the customers whose last name is Smith, as written."
    literal = [row(name, f"SELECT email FROM customers WHERE last_name = '{spelt}';", f"{file}:line 2")
               for file, spelt in (("a", "smith"), ("b", "Smith"), ("c", "Smith"))]
    loop = "for item in items:\n{}process(item)\n{}save(items)"
    blocks = [row("Process each item, then save the items once.", loop.format(*indents), f"{file}:line 3")
              for file, indents in (("a", ("    ", "    ")), ("b", ("    ", "")), ("c", ("  ", "")))]
    removed = dedup.deduplicate(others + template + negated + literal + blocks, free_text=True).removed
    assert sorted((r["source"], r["reason"]) for r in removed) == [
        ("a:line 1", "contradiction"), ("a:line 2", "contradiction"), ("a:line 3", "contradiction"),
        ("c:line 1", "near_duplicate"), ("c:line 2", "exact_duplicate"), ("c:line 3", "exact_duplicate")], (
        "the majority's answer stays: `=` is not `!=`, 'Smith' not 'smith', a line in a loop not after it (however "
        "wide the indent); the template's other customers are other problems, not votes")
    keys = [row(f"Write Python that sorts the rows by their '{key}' field.", f"sorted(rows, key=lambda r: r['{key}'])",
                f"k:line {i}") for i, key in enumerate(("price", "quantity", "name"))]
    assert dedup.deduplicate(others + keys).removed == [], "apart where the prompts are: `r['price']` holds price"
    ask = ("For the flights database: list every nonstop flight from {} to {} leaving on Monday morning before ten "
           "with seats left in economy class, for a customer who wants the options before booking a trip next week "
           "within the travel budget the company approved for the quarter")
    sql = "SELECT flight_id FROM flights WHERE origin = '{}' AND destination = '{}' AND day = 'monday';"
    trips = [row(ask.format(*cities), sql.format(*(city[:3].upper() for city in cities)), f"t:line {i}")
             for i, cities in enumerate((("Boston", "Denver"), ("Denver", "Boston")))]
    reply = ("The nonstop Monday morning flights from {} to {} with economy seats left are the 7:05 and the 9:40; "
             "both fit the travel budget the company approved for the quarter, and I can hold a seat on either")
    replies = [row(ask.format(*cities), reply.format(*cities), f"r:line {i}")
               for i, cities in enumerate((("Boston", "Denver"), ("Denver", "Boston")))]
    assert [dedup.deduplicate(others + rows, free_text=True).removed for rows in (trips, replies)] == [[], []], (
        "two problems each: the prompts' words in another order (Boston to Denver) decide the answer too")
    account = ("Hello, I have a Lumen Care subscription on my account with the email address jo.meyer@example.com and "
               "I would like you to please {} my subscription today.")
    decided = [row(account.format("cancel"), "Hi Jo, I have cancelled your Lumen Care subscription. It stays active "
                   "until the end of the current period and will not renew. Best, Nova", "d:line 1"),
               row(account.format("renew"), "Hi Jo, I have renewed your Lumen Care subscription for another year. The "
                   "invoice will be sent to your email address. Best, Nova", "d:line 2")]
    flicker = ("Hi there, my {} flickers when dimmed below 20 percent since the last update, I already restarted it "
               "twice and reinstalled the app. What should I do now?")
    greeted = [row(flicker.format(product), f"Hi {name}, please reset the {product}: hold its button for ten seconds "
                   "and add it again in the Lumen app. Best, Nova", f"g:line {i}")
               for i, (product, name) in enumerate((("Halo ceiling light", "Kemal"), ("Pixel night light", "Greta")))]
    assert [dedup.deduplicate(others + rows, free_text=True).removed for rows in (decided, greeted)] == [[], []], (
        "answers that take up the word setting the prompts apart (cancelled, renewed), and replies apart in their "
        "product and the customer they greet: two problems each")
    copied = [row("Sort the rows by price from largest to smallest.", "rows.sort(key=lambda r: r['price'])", "o:1"),
              row("Sort the rows by price, from largest to smallest!", "rows.sort(key=lambda r: r['price'])", "o:2"),
              row("Sort the rows by price from largest to smallest.", "rows.sort(key=lambda r: -r['price'])", "o:3")]
    assert sorted((r["source"], r["reason"]) for r in dedup.deduplicate(others + copied, free_text=True).removed) == [
        ("o:2", "near_duplicate"), ("o:3", "contradiction")], "in the same order: a copy, and a contradiction"


def test_worked_solutions_are_compared_by_their_final_answers_where_the_task_checks_them(tmp_path) -> None:
    rng = random.Random(7)
    others = [row(sentence(rng, 20), f"#### {i}", f"x{i}") for i in range(12)]
    pay = "Ines earns $25 an hour and works 41 hours a week. How much does Ines earn in 6 weeks?"
    reworded = [row(pay, "25 * 41 = 1025 a week, and 1025 * 6 = 6150.\n#### 6150", "a:line 1"),
                row(pay, "In 6 weeks she works 246 hours, and 246 * 25 = 6,150.\n#### $6,150", "b:line 1")]
    change = "Wes buys 9 notebooks that cost $15 each and pays with $155. How much change does Wes get?"
    miscounted = [row(change, "9 * 15 = 135, so 155 - 135 = 30.\n#### 30", "a:line 2"),  # first written, wrong
                  row(change, "9 * 15 = 135 and 155 - 135 = 20.\n#### 20", "b:line 2")]
    area = "A garden is {} m by {} m. What is its area?"
    template = [row(area.format(*sides), f"{sides[0]} * {sides[1]} = 60.\n#### 60", f"c:line {i}")
                for i, sides in enumerate(((20, 3), (30, 2)))]  # two problems with one result
    slip = [row("Mia reads 12 pages a day for 5 days. How many pages?", "12 * 5 = 60 pages.\n#### 65", "d:line 1")]
    write_examples(others + reworded + miscounted + template + slip, tmp_path / "raw.parquet")
    checked = task_metrics(EvaluationConfig(task_type="generation", answer_pattern=r"#### \$?(\S+)"))
    summary = dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "out", free_text=True, labels=checked)
    removed = {r["source"]: r for r in summary["removed"]}
    assert set(removed) == {"b:line 1", "a:line 2", "b:line 2"}, "the template's two problems stay"
    assert removed["b:line 1"]["reason"] == "exact_duplicate" and "its final answer compared" in (
        removed["b:line 1"]["detail"]), "another wording of one solution: 6,150 is 6150"
    assert {removed[source]["reason"] for source in ("a:line 2", "b:line 2")} == {"contradiction"}, (
        "two final answers to one problem: no first row written is kept, as one of them is wrong")
    assert (summary["uncomputed_final_answers"], summary["first_uncomputed_final_answer"]) == (
        1, "d:line 1: '65' after '60'"), "a final answer its working never writes"
    free = dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "free", free_text=True)
    assert {r["source"] for r in free["removed"]} == {"b:line 1", "b:line 2"}, "free text keeps the first written"


def test_different_questions_in_one_greeting_and_signature_are_two_examples_and_a_copy_is_still_a_copy() -> None:
    """Support emails: two in three rows wrap their question in one of two long greetings and signatures. That text
    is held by too few rows to be shared text, yet it makes any two questions in one wrapper alike."""
    task = wrapped_emails()
    result = dedup.deduplicate(task.rows)
    found = {frozenset((r["id"], r["duplicate_of"])): r["reason"] for r in result.removed}
    assert found == {**{frozenset(pair): "near_duplicate" for pair in task.near_duplicates.items()},
                     **{frozenset(pair): "contradiction" for pair in task.contradictions.items()}}, (
        "typos and a longer name are a copy; one against one, both rows of a contradiction go")
    emails = task.rows[:len(QUESTIONS) * 9]
    wrapped = similarity.prompt_shingles(emails, 2)[0]
    assert len(similarity.similar_pairs(wrapped)) > 50, "questions in one wrapper look alike"
    assert similarity.prompt_pairs(wrapped, lambda i: similarity.prompt_words(emails[i]["messages"])) == []
    assert similarity._own_words("where is my refnd".split(), "where is my refund".split()) == (0, 0), "a typo"
    assert similarity._own_words("order a92776 usd".split(), "order a92706 usd".split()) == (1, 1), "another order"
    sides = split.assign_sides(emails, eval_fraction=0.3, seed=0)
    in_first_wrapper = {sides[r["id"]] for r in emails if r["source"].endswith(" 0")}
    assert in_first_wrapper == {"train", "eval"}, "questions in one wrapper are split as any others"


def test_near_duplicates_do_not_chain() -> None:
    """a ~ b and b ~ c, but a is not like c: unless b comes first, b goes as a copy of a or c and both others stay."""
    words = [f"w{i}" for i in range(30)]
    texts = [" ".join(words[shift : shift + 24]) for shift in (0, 2, 4)]
    prompts = similarity.shingles([[("user", t)] for t in texts], 3)
    assert prompts.jaccard(0, 1) >= 0.8 and prompts.jaccard(1, 2) >= 0.8 and prompts.jaccard(0, 2) < 0.8
    rows = [row(text, "x", "same source") for text in texts]
    position = {r["id"]: index for index, r in enumerate(rows)}
    rng = random.Random(3)
    result = dedup.deduplicate(rows + [row(sentence(rng, 24), "y", f"other {i}") for i in range(10)])
    removed = {position[r["id"]]: position[r["duplicate_of"]] for r in result.removed}
    first = position[min(position)]
    assert set(removed) == ({0, 2} if first == 1 else {1})
    kept = {position[r["id"]] for r in result.kept if r["id"] in position}
    assert all(of in kept and prompts.jaccard(gone, of) >= 0.8 for gone, of in removed.items())


def test_a_row_kept_before_stays_when_a_new_file_written_first_brings_its_copy(tmp_path) -> None:
    rng = random.Random(8)
    replies = [row(sentence(rng, 30), sentence(rng, 20), f"legacy.csv:line {i + 2}") for i in range(20)]
    write_examples(replies, tmp_path / "raw.parquet")
    dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "out")
    prompt = replies[3]["messages"][0]["content"].split()
    copy = row(" ".join(prompt[:-1] + ["typo"]), replies[3]["messages"][1]["content"], "followups.jsonl:line 1")
    write_examples(replies + [copy], tmp_path / "raw.parquet")  # followups.jsonl comes first by name
    summary = dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "out")
    assert [r["id"] for r in summary["removed"]] == [copy["id"]]
    assert replies[3]["id"] in {r["id"] for r in read_examples(tmp_path / "out" / "examples.parquet")}
    assert dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "new")["removed"][0]["id"] == replies[3]["id"]


def test_build_deduplicated_reports_removals_by_label_with_matched_rows(tmp_path) -> None:
    task = intent_task()
    write_examples(task.rows, tmp_path / "raw.parquet")
    labels = task_metrics(EvaluationConfig(task_type="classification"))
    summary = dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "out", labels=labels)
    by_label = summary["removed_by_label"]
    assert sum(v["removed"] for v in by_label.values()) == len(summary["removed"])
    assert sum(v["rows_in"] for v in by_label.values()) == len(task.rows)
    assert dedup.match_columns(summary)[0] == "label"
    unlabelled = dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "plain")
    assert "label" not in dedup.match_columns(unlabelled), "no empty label column for a task without labels"
    example = summary["matched_examples"][0]
    assert example["removed_message"] and example["matched_message"] and SYSTEM_PROMPT not in example["removed_message"]
    result = read_result(tmp_path / "out", "deduplicated_examples")
    assert result.metadata["near_duplicates"] == len(task.near_duplicates)
    assert examples_metadata(tmp_path / "out" / "examples.parquet")[dedup.SHARED_TEXT_KEY].startswith("[")


def test_heavy_removals_name_the_rows_and_labels_over_the_limit() -> None:
    summary = {"rows_in": 100, "rows_out": 74, "removed_by_label": {
        "refund": {"rows_in": 20, "removed": 11}, "card": {"rows_in": 80, "removed": 15}}}
    assert dedup.heavy_removals(summary, 0.2) == {None: "all rows: 26% removed (26 of 100)",
                                                  "refund": "label 'refund': 55% removed (11 of 20)"}
    assert dedup.heavy_removals(summary, 0.6) == {}
    pairs = {"rows_in": 260, "rows_out": 260, "preference_rows_in": 180, "preference_rows_out": 58}
    assert dedup.heavy_removals(pairs, 0.2) == {dedup.PREFERENCE_ROWS: "preference rows: 68% removed (122 of 180)"}
    assert dedup.heavy_removals({**pairs, "rows_out": 182}, 0.2)[None] == "chat rows: 30% removed (78 of 260)"


def test_a_duplicate_in_a_label_of_a_few_rows_is_no_warning_but_a_label_cleaned_away_is() -> None:
    """Many labels with a long tail: small labels go over the limit by one duplicate, which says nothing."""
    labels = {f"intent_{i}": {"rows_in": 200 // (i + 1), "removed": (200 // (i + 1)) // 10} for i in range(40)}
    labels |= {"intent_3": {"rows_in": 3, "removed": 1}, "intent_7": {"rows_in": 2, "removed": 1},
               "intent_9": {"rows_in": 9, "removed": 3}, "intent_11": {"rows_in": 2, "removed": 2},
               "intent_12": {"rows_in": 10, "removed": 6}}
    rows_in = sum(counts["rows_in"] for counts in labels.values())
    removed = sum(counts["removed"] for counts in labels.values())
    summary = {"rows_in": rows_in, "rows_out": rows_in - removed, "removed_by_label": labels}
    assert dedup.heavy_removals(summary, 0.2) == {"intent_11": "label 'intent_11': 100% removed (2 of 2)",
                                                  "intent_12": "label 'intent_12': 60% removed (6 of 10)"}


def test_rows_leave_out_shared_text_unless_it_is_all_a_row_has_and_can_be_picked() -> None:
    system = ("system", "Classify the message into one of the labels below and answer with the label only")
    rows = [[system, ("user", f"message number {i} about topic {i * 7}")] for i in range(12)] + [[system]]
    messages = similarity.Messages.of(rows, 2)
    shared = messages.shared()
    whole, kept = messages.rows(), messages.rows(shared)
    assert len(shared) and all(not set(kept.row(i).tolist()) & set(shared.tolist()) for i in range(12))
    assert all(set(kept.row(i).tolist()) == set(whole.row(i).tolist()) - set(shared.tolist()) for i in range(12))
    assert kept.row(12).tolist() == whole.row(12).tolist(), "a row of shared text only keeps all its shingles"
    picked = messages.rows(shared, np.array([12, 3, 3]))
    assert [picked.row(i).tolist() for i in range(3)] == [kept.row(i).tolist() for i in (12, 3, 3)]


def test_a_message_in_a_file_that_writes_an_instruction_before_every_row_is_compared_on_the_message() -> None:
    instruction = ("Extract the order details from the customer message as JSON with the fields order_id, product, "
                   "quantity and city.")
    cities, products = ["Oslo", "Köln", "Porto", "Madrid"], ["duvet", "lamp", "mirror", "desk", "rug", "chair"]

    def order(i: int) -> tuple[str, str]:
        city, product = cities[i % 4], products[i % 6]
        message = f"Order A-{10000 + i}: {1 + i % 5} x {product}s, ship to {city}. Danke, Lukas"
        return message, json.dumps({"order_id": f"A-{10000 + i}", "product": product, "quantity": 1 + i % 5,
                                    "city": city})

    chats = [row(*order(i), f"chat.jsonl:line {i + 1}") for i in range(180)]  # 3 rows in 4: not text most rows share
    alpaca = [row(f"{instruction}\n\n{order(i)[0]}", order(i)[1], f"alpaca.json:row {i - 179}")
              for i in range(180, 240)]
    message, answer = order(7)
    alpaca.append(row(f"{instruction}\n\n{message}", answer.replace('"quantity": 3', '"quantity": 4'),
                      "alpaca.json:row 61"))  # chat line 8's message, another quantity
    alpaca.append(row(f"{instruction}\n\n{order(9)[0]}", order(9)[1], "alpaca.json:row 62"))  # chat line 10's
    result = dedup.deduplicate(chats + alpaca)
    assert sorted(r["source"] for r in result.removed if r["reason"] == "contradiction") == [
        "alpaca.json:row 61", "chat.jsonl:line 8"]
    assert [(r["source"], r["reason"], r["duplicate_of_source"]) for r in result.removed
            if r["reason"] != "contradiction"] == [("chat.jsonl:line 10", "near_duplicate", "alpaca.json:row 62")]
    assert len(result.kept) == 240 - 1, "the other orders, alike but for their numbers, product and city, all stay"


def conversation(turns: list[str], source: str, system: str = SYSTEM_PROMPT) -> dict:
    """A multi-turn row: user and assistant turns alternating, after the shared system prompt."""
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}] + [{"role": role, "content": text}
                                                           for role, text in zip(roles, turns)]
    return {"id": example_id(messages), "messages": messages, "source": source}


def test_multi_turn_conversations_are_near_identical_only_turn_for_turn() -> None:
    rng = random.Random(8)
    opening = [sentence(rng, 25), sentence(rng, 30), sentence(rng, 8), sentence(rng, 30)]  # two shared exchanges
    thanked = conversation(opening + ["thanks!", "You are welcome."], "chats:line 1")
    agreed = conversation(opening + ["ok will do", "Sounds good, I am here if you need anything."], "chats:line 2")
    longer = conversation(opening + [sentence(rng, 6), sentence(rng, 12), "thanks!", "Glad I could help."],
                          "chats:line 3")
    shouted = conversation([turn.upper() for turn in opening] + ["THANKS!!", "You are welcome."], "chats:line 4")
    retyped = conversation(opening[:2] + [opening[2] + " please", opening[3], "thanks!", "You are welcome."],
                           "chats:line 5")
    exported = {"id": example_id(thanked["messages"][1:]), "messages": thanked["messages"][1:],
                "source": "sharegpt:row 1"}  # the same chat exported without its system message
    others = [conversation([sentence(rng, 20), sentence(rng, 20)], f"more:line {i}") for i in range(6)]
    result = dedup.deduplicate([thanked, agreed, longer, shouted, retyped, exported, *others])
    assert {row["source"] for row in result.removed} == {"chats:line 4", "chats:line 5", "sharegpt:row 1"}, [
        (row["source"], row["reason"], row["detail"]) for row in result.removed]
    assert {row["reason"] for row in result.removed} == {"near_duplicate"}


def test_near_copies_in_chinese_and_japanese_are_found_by_their_characters() -> None:
    """Scripts written without spaces: a whole sentence is one word to a whitespace split, so one changed word made a
    near-copy as unlike its original as any other question."""
    questions = {
        "毎晩ルーターの接続が切れてしまいます。再起動しても直りません。": "ファームウェアを最新版に更新してください。",
        "プリンターで両面印刷をするにはどうすればいいですか？": "印刷設定の「両面」を選んでください。",
        "請問我的訂單什麼時候會送到？已經等了一個星期了。": "您的訂單預計三天內送達。",
        "ノートパソコンの画面が真っ暗で何も表示されません。": "電源ボタンを十秒間押し続けてください。",
        "我想更改收貨地址，應該怎麼做？": "請在訂單頁面點擊「修改地址」。",
        "請求書の宛名を会社名に変更できますか？": "はい、マイページから変更できます。",
        "保証期間はどのくらいですか？購入日は去年の四月です。": "保証期間はお買い上げから二年間です。",
    }
    rows = [row(q, a, f"a.jsonl:line {i + 1}") for i, (q, a) in enumerate(questions.items())]
    rows.append(row("毎夜ルーターの接続が切れてしまいます。再起動しても直りません。", "ファームウェアを最新版に更新してください。",
                    "a.jsonl:line 8"))
    result = dedup.deduplicate(rows)
    [removed] = result.removed
    assert (removed["reason"], removed["source"], removed["duplicate_of_source"]) == (
        "near_duplicate", "a.jsonl:line 8", "a.jsonl:line 1")
    assert len(result.kept) == len(questions), "the other questions share particles, not sentences"


def test_one_label_spelt_two_ways_is_one_answer_to_cleaning_not_a_contradiction(tmp_path) -> None:
    rng = random.Random(5)
    labels = ["order_status"] * 4 + ["refund"] * 4
    own = [row(sentence(rng, 12), label, f"a.csv:row {i}") for i, label in enumerate(labels)]
    twice = [("Where is my parcel?", "Order Status"), ("Where is my parcel?", "order_status"),
             ("My card was charged twice", "refund"), ("My card was charged twice", "Refund")]
    write_examples([*own, *(row(prompt, answer, f"b.csv:row {i}") for i, (prompt, answer) in enumerate(twice))],
                   tmp_path / "raw.parquet")
    labelled = task_metrics(EvaluationConfig(task_type="classification"))
    summary = dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "out", labels=labelled)
    assert (summary["contradictions"], summary["exact_duplicates"], summary["rows_out"]) == (0, 2, 10), summary
    kept = {r["messages"][0]["content"]: r["messages"][-1]["content"]
            for r in read_examples(tmp_path / "out" / "examples.parquet")}
    assert kept["Where is my parcel?"] == "order_status" and kept["My card was charged twice"] == "refund"
    assert {r["messages"][-1]["content"] for r in summary["removed"]} == {"order_status", "Refund"}, "as written"
    assert {r["detail"] for r in summary["removed"]} == {
        "the same conversation after normalisation (Unicode forms, case, spacing, JSON key order, a label's spelling)"}


def test_a_label_field_spelt_two_ways_counts_as_one_answer_in_a_contradiction_vote(tmp_path) -> None:
    rng = random.Random(5)

    def ticket(category: str, priority: str = "low") -> str:
        return json.dumps({"category": category, "priority": priority})

    own = [row(sentence(rng, 12), ticket(label), f"a.csv:row {i}")
           for i, label in enumerate(["order_status"] * 4 + ["refund"] * 4)]
    answers = [ticket("Order Status"), '{"priority":"low","category":"order_status"}', ticket("order-status", "high")]
    write_examples([*own, *(row("Where is my parcel?", answer, f"b.csv:row {i}") for i, answer in enumerate(answers))],
                   tmp_path / "raw.parquet")
    labelled = task_metrics(EvaluationConfig(task_type="classification", label_field="category"))
    summary = dedup.build_deduplicated(tmp_path / "raw.parquet", tmp_path / "out", labels=labelled)
    assert [(r["reason"], r["messages"][-1]["content"]) for r in summary["removed"]] == [
        ("contradiction", answers[2]), ("exact_duplicate", answers[1])], "two of three rows agree: a majority"


def test_questions_many_rows_ask_above_one_quoted_email_are_different_messages_not_contradictions() -> None:
    rng = random.Random(4)
    quotes = [sentence(rng, 60) for _ in range(3)]  # each quoted by a third of the rows: too few to be shared text
    asked = {"cancel_order": ["please cancel this order before it ships", "stop the order, i no longer need it"],
             "refund_status": ["the refund has still not reached my card", "when will i get my money back"],
             "reset_password": ["the password reset email never came", "i cannot log in, the reset link is broken"],
             "return_item": ["how do i send the boots back", "i need a return label for the jacket"]}
    rows = [row(f"{rng.choice(questions)} {' '.join(rng.sample(['today', 'asap', 'please', 'again', 'now'], 3))}\n\n"
                f"> On Monday, Support wrote:\n> {rng.choice(quotes)}", label, f"mail.jsonl:line {len(asked) * k + i}")
            for k in range(24) for i, (label, questions) in enumerate(asked.items())]
    result = dedup.deduplicate(rows)
    assert result.count("contradiction") == 0, [r["detail"] for r in result.removed][:3]
    assert {r["messages"][-1]["content"] for r in result.kept} == set(asked)
    assert all(r["messages"][-1]["content"] == next(o for o in rows if o["id"] == r["duplicate_of"])["messages"][-1][
        "content"] for r in result.removed), "a copy of one question in other filler words goes as a near-duplicate"
