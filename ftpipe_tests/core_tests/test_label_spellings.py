"""One spelling per label in the cleaned rows of a classification task."""

import json

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation.metrics import task_metrics
from ftpipe.core.dedup import NO_LABEL
from ftpipe.core.label_spellings import Spellings, answers, likely_misspellings, misspellings_said, said
from ftpipe.core.preferences import FormatSpec, to_preference
from ftpipe_tests.rows import row


def ticket(number: int, category: str, priority: str = "low") -> dict:
    answer = json.dumps({"category": category, "priority": priority})
    return row(f"ticket {number}: something about my account", answer)


def test_labels_written_differently_take_the_spelling_most_rows_use_and_keep_the_rest_of_the_answer() -> None:
    labels = task_metrics(EvaluationConfig(task_type="classification", label_field="category"))
    rows = [ticket(1, "Billing"), ticket(2, "Billing"), ticket(3, "billing ", "high"), ticket(4, "BILLING."),
            ticket(5, "Billing"), ticket(6, "shipping"), ticket(7, "Shipping"), ticket(8, "Shipping Delay"),
            row("ticket 9: no JSON here", "billing")]
    spellings = Spellings.of(answers(rows), labels)
    out, respelled = spellings.respell(rows)
    assert spellings.label('{"category": "billing."}') == "Billing" and spellings.label("no JSON") is None
    assert [r["messages"][-1]["content"] for r in out[2:4]] == [
        '{"category": "Billing", "priority": "high"}', '{"category": "Billing", "priority": "low"}']
    assert out[5]["messages"][-1]["content"] == '{"category": "Shipping", "priority": "low"}', "a tie: the smallest"
    assert [r["messages"] for r in out[6:]] == [r["messages"] for r in rows[6:]], "other labels and no label stay"
    assert [r["id"] for r in out] == [r["id"] for r in rows] and rows[2]["messages"][-1]["content"].endswith('"high"}')
    assert respelled == [{"label": "Billing", "respelled": "billing ", "rows": 1},
                         {"label": "Billing", "respelled": "BILLING.", "rows": 1},
                         {"label": "Shipping", "respelled": "shipping", "rows": 1}]
    assert said(respelled) == ('3 rows\' labels respelled as each label is trained (as data.label_names writes it, a '
                               'typo of it too, else as the last cleaning or most of its answers write it): "billing " '
                               'as "Billing" ×1, "BILLING." as "Billing" ×1, "shipping" as "Shipping" ×1')


def test_a_label_data_label_names_lacks_a_typo_away_from_one_it_names_is_that_label() -> None:
    labels = task_metrics(EvaluationConfig(task_type="classification"))
    named = ["card_arrival", "faq_12", "refund", "Köln"]
    rows = [row(f"message {i}", label) for i, label in enumerate(
        ["card_arrival", "card_arival", "Card Arival", "faq_12", "faq_13", "refunds please", "koln"])]
    out, respelled = Spellings.of(answers(rows), labels, named=named).respell(rows)
    assert [r["messages"][-1]["content"] for r in out] == [
        "card_arrival", "card_arrival", "card_arrival", "faq_12", "faq_13", "refunds please", "Köln"], (
        "typos of a named label are that label; a numbered class and another answer are not")
    assert said(respelled).endswith('"card_arival" as "card_arrival" ×1, "Card Arival" as "card_arrival" ×1, "koln" '
                                    'as "Köln" ×1')
    unnamed = Spellings.of(answers(rows), labels).respell(rows)[0]
    assert [r["messages"][-1]["content"] for r in unnamed].count("card_arrival") == 1, (
        "without data.label_names a typo is a label of its own (named for a person to fix)")


def test_a_bare_label_is_respelled_whole() -> None:
    labels = task_metrics(EvaluationConfig(task_type="classification"))
    rows = [row(f"message {i}", answer) for i, answer in enumerate(["Refund", "Refund", "refund\n", " Card lost "])]
    out, respelled = Spellings.of(answers(rows), labels).respell(rows)
    assert [r["messages"][-1]["content"] for r in out] == ["Refund", "Refund", "Refund", "Card lost"]
    assert respelled == [{"label": "Refund", "respelled": "refund\n", "rows": 1},
                         {"label": "Card lost", "respelled": " Card lost ", "rows": 1}], "spaces around it count"


def test_a_label_spaced_with_a_space_an_underscore_or_a_hyphen_is_one_label_wherever_labels_are_compared() -> None:
    from ftpipe.config import AcceptConfig
    from ftpipe.core.feedback import same_answer
    from ftpipe.core.teacher import accepted

    config = EvaluationConfig(task_type="classification")
    labels = task_metrics(config)
    written = ["order_status"] * 3 + ["Order Status", "ORDER-STATUS", "refund"]
    rows = [row(f"message {i}", answer) for i, answer in enumerate(written)]
    out, respelled = Spellings.of(answers(rows), labels).respell(rows)
    assert [r["messages"][-1]["content"] for r in out] == ["order_status"] * 5 + ["refund"]
    assert {entry["respelled"] for entry in respelled} == {"Order Status", "ORDER-STATUS"}
    assert labels.scores(["Order status"], ["order_status"]).summary["accuracy"] == 1.0
    assert labels.valid_outputs(["order status"], ["order_status", "refund"]) == [True]
    assert same_answer(config)("Order Status", "order_status"), "feedback confirms the served label"
    assert accepted("Order Status", AcceptConfig(labels=["order_status", "refund"])) == ("order_status", None)


def test_preference_answers_count_toward_the_spelling_and_are_respelled_unless_a_pair_would_become_one_answer() -> None:
    labels = task_metrics(EvaluationConfig(task_type="classification", label_field="category"))
    category = lambda label: json.dumps({"category": label})  # noqa: E731
    rows = [ticket(1, "Billing"), ticket(2, "Billing"), ticket(3, "Billing"), ticket(4, "refund")]
    pairs = [to_preference({"prompt": f"order {i}", "chosen": category("Refund"), "rejected": category("billing ")},
                           FormatSpec(), f"p.jsonl:line {i}") for i in range(2)]
    pairs += [to_preference({"prompt": "order 3", "chosen": category("Refund"), "rejected": category("refund.")},
                            FormatSpec(), "p.jsonl:line 3"),
              to_preference({"prompt": "order 4", "completion": category("BILLING"), "label": False},
                            FormatSpec(), "k.jsonl:line 1")]
    spellings = Spellings.of(answers(rows, pairs), labels)
    chats, respelled = spellings.respell(rows)
    out, count = spellings.respell_preferences(pairs)
    assert respelled == [{"label": "Refund", "respelled": "refund", "rows": 1}], "the pairs' Refund outnumbers"
    assert [(r["chosen"], r["rejected"], r["completion"]) for r in out] == [
        (category("Refund"), category("Billing"), None), (category("Refund"), category("Billing"), None),
        (category("Refund"), category("refund."), None), (None, None, category("Billing"))]
    assert count == 3 and [r["id"] for r in out] == [r["id"] for r in pairs]
    assert said(respelled, count) == ('1 row\'s and 3 preference answers\' labels respelled as each label is trained '
                                      '(as data.label_names writes it, a typo of it too, else as the last cleaning or '
                                      'most of its answers write it): "refund" as "Refund" ×1')
    assert said(respelled).startswith("1 row's label respelled as each"), "in the singular"


def test_a_rare_label_a_typo_away_from_a_commoner_one_is_named_and_labels_of_like_size_are_not() -> None:
    counts = {"positive": 300, "postive": 2, "neutral": 120, "neutrl": 1, "negative": 100, NO_LABEL: 5,
              "refund": 10, "refunds": 9, "gone": 0, "why_verify_identity": 200, "verify_my_identity": 10,
              "get_physical_card": 150, "order_physical_card": 12,  # banking intents alike in words, not typos
              "intent_14": 40, "intent_18": 2, "E11": 50, "E1": 3,  # numbered classes: apart in digits, not typos
              "Köln": 70, "Koln": 8, "Zürich": 67, "Zurich": 5,  # written without the accent
              "かぎ": 50, "かき": 3}  # a dakuten makes another word
    found = likely_misspellings(counts)
    assert found == [{"label": "neutrl", "rows": 1, "like": "neutral", "like_rows": 120},
                     {"label": "postive", "rows": 2, "like": "positive", "like_rows": 300},
                     {"label": "Zurich", "rows": 5, "like": "Zürich", "like_rows": 67},
                     {"label": "Koln", "rows": 8, "like": "Köln", "like_rows": 70}], "refunds: as many rows"
    assert misspellings_said(found[:2]) == (
        '2 labels look like a typo of a commoner label: "neutrl" ×1 (like "neutral" ×120), "postive" ×2 (like '
        '"positive" ×300); each is trained and scored as a label of its own: correct them in the raw files')
    assert misspellings_said(found[1:2]).startswith('1 label looks like a typo of a commoner label: "postive" ×2')


def test_rows_added_later_never_respell_a_label_the_last_cleaning_trained(tmp_path) -> None:
    from ftpipe.core.dedup import build_deduplicated
    from ftpipe.core.records import read_examples, write_examples

    labels = task_metrics(EvaluationConfig(task_type="classification"))
    written = ["cancel-order"] * 3 + ["Cancel Order"] * 2 + ["order_status"] * 4
    rows = [row(f"message number {i} about my order", answer, f"a.jsonl:line {i}") for i, answer in enumerate(written)]
    write_examples(rows, tmp_path / "raw.parquet")
    build_deduplicated(tmp_path / "raw.parquet", tmp_path / "clean", labels=labels)
    first = {r["messages"][-1]["content"] for r in read_examples(tmp_path / "clean" / "examples.parquet")}
    assert first == {"cancel-order", "order_status"}, "the spelling most rows write"

    more = [row(f"please drop order {i} today", "Cancel Order", f"b.jsonl:line {i}") for i in range(4)]
    write_examples(rows + more, tmp_path / "raw.parquet")
    again = build_deduplicated(tmp_path / "raw.parquet", tmp_path / "clean", labels=labels)
    kept = [r["messages"][-1]["content"] for r in read_examples(tmp_path / "clean" / "examples.parquet")]
    assert set(kept) == {"cancel-order", "order_status"} and kept.count("cancel-order") == 9, "as before, not 6 to 3"
    assert again["label_spellings"] == [{"label": "cancel-order", "respelled": "Cancel Order", "rows": 6}]
    assert Spellings.of(answers(rows + more), labels).label("cancel order") == "Cancel Order", "in a new home: most"


def test_data_label_names_choose_the_spelling_each_label_is_trained_in(tmp_path) -> None:
    from ftpipe.core.dedup import build_deduplicated
    from ftpipe.core.records import read_examples, write_examples

    labels = task_metrics(EvaluationConfig(task_type="classification"))
    written = ["Cancel Order"] * 3 + ["cancel-order"] * 2 + ["Order Status"] * 4 + ["refund"]
    rows = [row(f"message number {i} about my order", answer, f"a.jsonl:line {i}") for i, answer in enumerate(written)]
    write_examples(rows, tmp_path / "raw.parquet")
    summary = build_deduplicated(tmp_path / "raw.parquet", tmp_path / "clean", labels=labels,
                                 label_names=("cancel_order", "order_status", "refund"))
    kept = [r["messages"][-1]["content"] for r in read_examples(tmp_path / "clean" / "examples.parquet")]
    assert kept == ["cancel_order"] * 5 + ["order_status"] * 4 + ["refund"], "one style, as named, even written once"
    assert summary["label_spellings"] == [{"label": "order_status", "respelled": "Order Status", "rows": 4},
                                          {"label": "cancel_order", "respelled": "Cancel Order", "rows": 3},
                                          {"label": "cancel_order", "respelled": "cancel-order", "rows": 2}]
