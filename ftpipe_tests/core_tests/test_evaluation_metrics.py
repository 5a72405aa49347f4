"""Task metrics, one entry per task type: label parsing, scores, references they cannot read, the label set for
log-likelihood ranking, and the confusion table; and the general-skills probe's checks."""

from __future__ import annotations

import json
import re
import typing

import numpy as np
import pytest

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation import select_rows
from ftpipe.core.evaluation.metrics import TASK_TYPES, check_references, task_metrics
from ftpipe.core.evaluation.metrics.classification import confusion_table, parse_label, resampled_macro_f1
from ftpipe.core.evaluation.metrics.final_answer import same_answer
from ftpipe.core.evaluation.measurements import DELTA_SEED, delta_intervals
from ftpipe.core.evaluation.probe import CHECKS, probe_correct, read_probe
from ftpipe.core.evaluation.statistics import paired_bootstrap
from ftpipe.core.storage import REPO_ROOT


def scores(task_type: str, answers: list[str], references: list[str], **settings):
    return task_metrics(EvaluationConfig(task_type=task_type, **settings)).scores(answers, references)


def test_every_configurable_task_type_has_one_entry_whose_primary_metric_it_scores():
    configurable = typing.get_args(EvaluationConfig.model_fields["task_type"].annotation)
    assert set(TASK_TYPES) == set(configurable)
    for name in configurable:
        task = task_metrics(EvaluationConfig(task_type=name))
        assert task.name == name and task.primary in task.scores(['{"a": "x"}'], ['{"a": "x"}']).rows


@pytest.mark.parametrize(("text", "field", "label"), [
    ('{"label": "Billing"}', "label", "billing"),
    ('Sure! Here it is: {"label": "Bug-Report", "x": {"y": 1}} hope that helps', "label", "bugreport"),
    ('{"other": "a"} then {"label": "b"}', "label", None),  # the first {...} decides
    ("not json at all", "label", None),
    ('{"label": "billing"', "label", None),
    ("  Red. ", None, "red"),
    ("Order Status", None, "orderstatus"),  # one label however it is spaced
    ('{"label": "order_status"}', "label", "orderstatus"),
    ("...", None, None),
])
def test_parse_label(text, field, label):
    assert parse_label(text, field) == label


def test_classification_accuracy_macro_f1_and_unparseable_counts_wrong():
    references = ['{"label": "a"}', '{"label": "a"}', '{"label": "b"}', '{"label": "b"}']
    answers = ['{"label": "a"}', "I think a", '{"label": "b"}', '{"label": "a"}']
    found = scores("classification", answers, references, label_field="label")
    assert found.rows["accuracy"] == [1.0, 0.0, 1.0, 0.0]
    assert found.summary["accuracy"] == 0.5
    # a: tp 1, fp 1, fn 1 -> 0.5; b: tp 1, fp 0, fn 1 -> 2/3
    assert found.summary["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert found.labels == ["a", None, "b", "a"]


def test_macro_f1_counts_each_row_as_often_as_a_resample_draws_it_and_its_change_gets_an_interval():
    metric = resampled_macro_f1(["a", "a", "b", "b", "c"], ["a", "b", "b", None, "a"])
    # rows 0, 0, 3, 4, 4: a tp 2, fp 2 -> 2/3; b (its row answered None) and c (answered a) 0
    # every row once: a tp 1, fp 1, fn 1 -> 1/2; b alike; c 0
    assert metric(np.array([[0, 0, 3, 4, 4], [0, 1, 2, 3, 4]])) == pytest.approx([2 / 9, 1 / 3])

    labels = [f"intent_{n:02d}" for n in range(12)]
    references = labels * 5
    base = scores("classification", [labels[0]] * len(references), references)
    tuned = scores("classification", references[:-6] + [labels[1]] * 6, references)
    intervals = delta_intervals(base, tuned, samples=500)
    low, high = intervals["macro_f1"]
    assert 0 < low < tuned.summary["macro_f1"] - base.summary["macro_f1"] < high < 1, "above 0: it learned the labels"
    assert intervals["accuracy"] == list(paired_bootstrap(base.rows["accuracy"], tuned.rows["accuracy"], 500,
                                                          seed=DELTA_SEED)[1:]), "drawn as the primary metric's"
    assert delta_intervals(base, base, samples=500)["macro_f1"] == [0, 0]


def test_confusion_table_counts_reference_by_prediction():
    table = confusion_table(["a", "a", "b", "b", "b"], ["a", None, "b", "zzz", "a"])
    lines = table.splitlines()
    assert lines[0] == "| reference / predicted | a | b | (not a label) | (unparseable) |"
    assert lines[2] == "| a | 1 | 0 | 0 | 1 |"
    assert lines[3] == "| b | 1 | 1 | 1 | 0 |"
    assert lines[-1] == "(not a label) holds answers that are no held-out label, most often first: zzz ×1"


def test_a_label_named_other_keeps_its_own_column():
    lines = confusion_table(["other", "b"], ["other", "zzz"]).splitlines()
    assert lines[0] == "| reference / predicted | b | other | (not a label) | (unparseable) |"
    assert lines[2:4] == ["| b | 0 | 0 | 1 | 0 |", "| other | 0 | 1 | 0 | 0 |"]


def test_the_answers_other_counts_are_listed_as_written_most_often_first():
    made_up = ["system"] * 3 + ["triage"] * 2 + [f"made_up_{n}" for n in range(6)]
    table = confusion_table(["a"] * len(made_up), made_up, {"system": "System"})
    assert table.splitlines()[-1] == ("(not a label) holds answers that are no held-out label, most often first: System ×3, "
                                      "triage ×2, made_up_0 ×1, made_up_1 ×1, made_up_2 ×1 and 3 other answers")


def test_many_labels_list_what_each_was_confused_with_instead_of_a_wide_table():
    labels = [f"intent_{n:02d}" for n in range(27)]
    expected = labels * 2 + ["intent_00"]
    predicted = labels * 2 + [None]
    predicted[1] = predicted[28] = "intent_05"  # intent_01 predicted as intent_05 twice
    predicted[2] = "no_such_intent"
    predicted[31] = "i think the customer wants to know where the parcel is"  # an answer in prose
    lines = confusion_table(expected, predicted).splitlines()
    assert lines[0] == "| reference | rows | right | precision | F1 | predicted instead |"
    assert len(lines) == 4 + len(labels)
    assert lines[-1] == ("26 of the 27 held-out labels are answered at all; the commonest answer, intent_05, is 4 of "
                         "the 55 answers (7%), right in 2 of them."), "intent_01 never"
    collapsed = confusion_table(expected, ["intent_07"] * 50 + labels[:5]).splitlines()[-1]
    assert collapsed == ("6 of the 27 held-out labels are answered at all; the commonest answer, intent_07, is 50 of "
                         "the 55 answers (91%), right in 2 of them."), "one label for most rows"
    prose = confusion_table(expected, ["i"] * 40 + labels[:5] * 3, {"i": "I…"}).splitlines()[-1]
    assert prose == ("5 of the 27 held-out labels are answered at all; the commonest answer, intent_00, is 3 of the "
                     "55 answers (5%), right in 0 of them."), "not `I…`: forty texts in prose, cut where they began"
    assert confusion_table(expected, [None] * len(expected)).endswith("0 of the 27 held-out labels are answered at all.")
    assert confusion_table(labels + ["intent_00"], labels + ["intent_00"]).endswith(
        "right in 2 of them. 26 labels have one held-out row: one answer decides their precision and F1.")
    assert lines[2] == "| intent_00 | 3 | 2 | 1.00 | 0.80 | (unparseable) ×1 |"
    assert lines[3] == "| intent_01 | 2 | 0 | – | 0.00 | intent_05 ×2 |", "never answered: no precision"
    assert lines[4] == "| intent_02 | 2 | 1 | 1.00 | 0.67 | no_such_intent ×1 |"
    assert lines[5] == "| intent_03 | 2 | 2 | 1.00 | 1.00 |  |"
    assert lines[6] == "| intent_04 | 2 | 1 | 1.00 | 0.67 | i think the customer wants to know wher… ×1 |", "what was answered"
    assert lines[7] == "| intent_05 | 2 | 2 | 0.50 | 0.67 |  |", "answered for intent_01 twice"
    f1 = [float(line.split(" | ")[4]) for line in lines[2:-2]]
    whole = resampled_macro_f1(expected, predicted)(np.arange(len(expected))[None])[0]
    assert abs(sum(f1) / len(f1) - whole) < 0.01, "the F1s macro-F1 averages"


def test_the_confusion_table_shows_labels_as_the_references_write_them():
    task = task_metrics(EvaluationConfig(task_type="classification", label_field="intent"))
    references = ['{"intent": "card_arrival"}', '{"intent": "age_limit"}']
    records = [{"reference": r, "finetuned_answer": r, "finetuned_label": task.expected_label(r)} for r in references]
    [(title, table)] = task.report_sections(records, {"finetuned": "fine-tuned"})
    assert title == "Confusion table (fine-tuned)"
    assert table.splitlines()[0] == "| reference / predicted | age_limit | card_arrival | (unparseable) |"
    assert table.splitlines()[3] == "| card_arrival | 0 | 1 | 0 |"


def test_each_answers_label_is_kept_as_the_references_write_it_or_else_as_the_answer_does():
    task = task_metrics(EvaluationConfig(task_type="classification"))
    references = ["card_arrival", "lost_or_stolen_card", "card_arrival", "lost_or_stolen_card"]
    answers = ["Card Arrival", "card_arival", "se…", ""]
    labels = task.scores(answers, references).labels
    assert labels == ["card_arrival", "card_arival", "se…", None], "not the key `cardarrival` nor a cut `se`"
    records = [{"reference": r, "finetuned_answer": a, "finetuned_label": label}
               for r, a, label in zip(references, answers, labels)]
    [(_, table)] = task.report_sections(records, {"finetuned": "fine-tuned"})
    assert "| card_arrival | 1 | 0 | 1 | 0 |" in table.splitlines(), "read back as the label it is"


def test_answers_that_are_no_eval_label_show_as_written_and_a_stopped_one_is_explained():
    from ftpipe.core.evaluation.metrics.classification import STOPPED

    task = task_metrics(EvaluationConfig(task_type="classification"))
    labels = [f"intent_{n:02d}" for n in range(14)]
    answers = [*labels[:12], "wrong_amount_atm", "Th" + STOPPED]  # a train-only label, a stopped answer
    records = [{"reference": label, "finetuned_answer": answer, "finetuned_label": task.scores([answer], [label]).labels[0]}
               for label, answer in zip(labels, answers)]
    [(_, table)] = task.report_sections(records, {"finetuned": "fine-tuned"})
    lines = table.splitlines()
    assert lines[14].endswith("| wrong_amount_atm ×1 |") and lines[15].endswith("| Th… ×1 |")
    assert lines[-3:] == ["macro-F1 averages the F1 of the 14 labels that have held-out rows.", "",
                          "1 answer(s) ending in … stopped where they could no longer become a label (wrong whatever "
                          "followed)."]
    few = [{**record, "fewshot_answer": "th" + STOPPED, "fewshot_label": "th" + STOPPED} for record in records]
    tables = dict(task.report_sections(few, {"fewshot": "few-shot", "finetuned": "fine-tuned"}))
    assert tables["Confusion table (few-shot)"].splitlines()[15].endswith("| th… ×1 |"), "as that model wrote it"
    assert tables["Confusion table (fine-tuned)"].splitlines()[15].endswith("| Th… ×1 |")


def test_label_choices_put_each_label_where_the_reference_has_its_label():
    task = task_metrics(EvaluationConfig(task_type="classification", label_field="category"))
    references = ['{"category": "feature_request", "priority": "low"}', '{"priority": "high", "category":"billing"}']
    choices = task.label_choices(references)
    assert choices.names == ["billing", "featurerequest"] and choices.expected == ["featurerequest", "billing"]
    assert choices.candidates[0] == ['{"category": "billing"', '{"category": "feature_request"']
    assert choices.candidates[1] == ['{"priority": "high", "category":"billing"',
                                     '{"priority": "high", "category":"feature_request"']
    plain = task_metrics(EvaluationConfig(task_type="classification")).label_choices(["Red", "green ", "red."])
    assert plain.names == ["green", "red"] and plain.candidates[0] == ["green", "Red"]


def test_label_choices_rank_the_labels_of_train_rows_too_and_name_those_without_a_heldout_row():
    task = task_metrics(EvaluationConfig(task_type="classification", label_field="intent"))
    train = ['{"intent": "top_up"}', '{"intent": "card_arrival"}', '{"intent": "card_arrival"}',
             '{"intent": "Card_Arrival"}', "no JSON here"]
    choices = task.label_choices(['{"intent": "top_up"}'], train)
    assert choices.names == ["cardarrival", "topup"] and choices.expected == ["topup"]
    assert choices.candidates == [['{"intent": "card_arrival"', '{"intent": "top_up"']]
    # as written, with its train rows of every spelling; an unreadable train answer adds none
    assert choices.without_heldout_rows() == {"card_arrival": 3}


def test_label_answers_are_complete_answers_written_as_the_references_write_them():
    task = task_metrics(EvaluationConfig(task_type="classification", label_field="intent"))
    references = ['{"intent": "card_arrival"}', '{"intent":"top_up"}', '{"intent": "top_up"}', '{"intent": "Top_Up"}',
                  'Sure: {"intent": "lost_card", "why": "x"}']
    assert task.label_answers(references) == ['{"intent": "card_arrival"}', '{"intent": "lost_card"}',
                                              '{"intent": "top_up"}']
    plain = task_metrics(EvaluationConfig(task_type="classification"))
    assert plain.label_answers(["Red", "green", "red", "red"]) == ["green", "red"]  # the usual spelling
    assert task_metrics(EvaluationConfig()).label_answers(["x"]) is None  # generation has no labels


@pytest.mark.parametrize(("answer", "reference", "same"), [
    ("1,000", "1000", True),
    ("1000.0", "1,000", True),
    ("72.", "72", True),
    ("-3", "-3.00", True),
    ("72", "27", False),
    ("Paris", "paris.", True),
    ("$18", "18", True),
    ("45$", "45.00", True),
    ("£1,200.", "1200", True),
    (".5", "0.5", True),
    ("-.5", "0.5", False),
    ("$18", "81", False),
    ("18 dollars", "18", False),  # not a number: compared as text
    (None, "18", False),
])
def test_final_answers_compare_as_numbers_when_both_are_numbers(answer, reference, same):
    assert same_answer(answer, reference) is same


def test_a_final_answer_pattern_makes_exact_match_on_final_answers_primary():
    task = task_metrics(EvaluationConfig(answer_pattern=r"#### (\S+)"))
    references = ["She has 3 + 4 = 7 apples.\n#### 7", "1000 * 2 = 2000\n#### 2,000", "So 5.\n#### 5"]
    answers = ["3 + 4 = 7\n#### 7", "It is 2000.\n#### 2000.0", "I think 5"]
    found = task.scores(answers, references)
    assert task.primary == "answer_exact_match" and list(found.rows)[0] == "answer_exact_match"
    assert found.rows["answer_exact_match"] == [1.0, 1.0, 0.0] and found.rows["exact_match"] == [0.0, 0.0, 0.0]
    assert found.final_answers == ["7", "2000.0", None]
    assert task.final_answer(references[1]) == "2,000"
    assert task.valid_outputs(answers, references) == [True, True, False], "an answer without '#### N' is out of form"
    assert found.rows["lenient_answer_match"] == [1.0, 1.0, 1.0], "without a final answer, the last number counts"
    lenient = task.scores(["It is 7, or\n#### 9", "2,000 or 2,001", "5 of them. No, 6"], references)
    assert lenient.rows["lenient_answer_match"] == [0.0, 0.0, 0.0], "a final answer given is the answer"
    assert task_metrics(EvaluationConfig()).primary == "rouge_l"
    assert task_metrics(EvaluationConfig()).valid_outputs([*answers, " "], references) == [True, True, True, False]


def test_a_final_answer_field_reads_json_and_references_without_one_are_refused():
    task = task_metrics(EvaluationConfig(answer_field="answer"))
    found = task.scores(['{"answer": 12, "work": "..."}', '{"answer": "no"}'],
                        ['{"answer": "12"}', '{"answer": "yes"}'])
    assert found.rows["answer_exact_match"] == [1.0, 0.0] and found.final_answers == ["12", "no"]
    rows = [{"id": "r1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "7"}]}]
    with pytest.raises(ValueError, match=r"is not a JSON object, so it has no field 'answer' "
                                         r"\(evaluation.answer_field; plain answers: leave it unset\).*r1"):
        check_references(rows, task)
    with pytest.raises(ValueError, match=re.escape("no final answer matching answer_pattern `#### (\\S+)`")):
        check_references(rows, task_metrics(EvaluationConfig(answer_pattern=r"#### (\S+)")))


def test_a_final_answer_the_working_never_writes_is_found_and_said():
    from ftpipe.core.evaluation.metrics.final_answer import uncomputed_final_answer, uncomputed_said

    pattern = r"#### \$?(\S+)"
    assert uncomputed_final_answer("25 * 41 = 1025, and 1025 * 6 = 6150.\n#### 6160", pattern) == ("6160", "6150")
    for fine in ("25 * 41 = 1,025 and 1025 * 6 = 6,150.\n#### $6150", "It falls from -1 to -15.\n#### -15",
                 "#### 42", "She has three apples.\n#### 3", "No final answer here: 12", "3 / 4 is left.\n#### 3/4"):
        assert uncomputed_final_answer(fine, pattern) is None, fine
    task = task_metrics(EvaluationConfig(answer_pattern=pattern))
    assert task.uncomputed_final_answers(["1 + 1 = 2\n#### 2", "2 + 2 = 4\n#### 5"]) == [(1, "5", "4")]
    assert task_metrics(EvaluationConfig(answer_field="answer")).uncomputed_final_answers(['{"answer": 5}']) == []
    assert uncomputed_said(1, "a.jsonl:line 3: '5' after '4'") == (
        "1 worked solution ends with a final answer its working never writes (the first: a.jsonl:line 3: '5' after "
        "'4'): the model learns to end its reasoning with another number; check it against its steps")


def test_a_reference_that_misses_the_answer_pattern_only_by_its_spacing_is_refused_with_the_pattern_that_reads_it():
    task = task_metrics(EvaluationConfig(answer_pattern=r"#### (\S+)"))
    assert task.reference_problem("48 / 2 = 24\n####24") == (
        "misses answer_pattern `#### (\\S+)` only by its spacing: answer_pattern `####\\s*(\\S+)` reads it")
    assert task.reference_problem("48 / 2 = 24") == "has no final answer matching answer_pattern `#### (\\S+)`"
    assert task_metrics(EvaluationConfig(answer_pattern=r"####(\d+)")).reference_problem("####x") == (
        "has no final answer matching answer_pattern `####(\\d+)`"), "no space in the pattern: no hint"


@pytest.mark.parametrize(("settings", "problem"), [
    ({"answer_pattern": "#### \\S+"}, "needs exactly one capture group"),
    ({"answer_pattern": "(a)(b)"}, "needs exactly one capture group"),
    ({"answer_pattern": "(unclosed"}, "not a regular expression"),
    ({"answer_pattern": "(x)", "answer_field": "y"}, "not both"),
    ({"task_type": "classification", "answer_field": "y"}, "answer_field applies to task_type generation only"),
    ({"constrain_to_labels": True}, "constrain_to_labels applies to task_type classification only"),
    ({"task_type": "extraction", "require_human_review": 2}, "require_human_review applies to task_type generation"),
    ({"judge": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": "sk-123"}}, "never the key itself"),
    ({"fewshot_k": -1}, "greater than or equal to 0"),
])
def test_evaluation_settings_that_cannot_work_are_refused(settings, problem):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=problem):
        EvaluationConfig(**settings)


def test_extraction_metrics():
    references = ['{"name": "Ann", "age": 3}', '{"name": "Bob", "age": 4}', '{"name": "Cy", "age": 5}']
    answers = ['Result: {"name": "Ann", "age": 3}.', '{"name": "Bob", "age": 40}', "no json here"]
    found = scores("extraction", answers, references)
    assert found.rows["json_valid"] == [0.0, 1.0, 0.0], "text around an object its reference has alone"
    assert found.rows["exact_match"] == [1.0, 0.0, 0.0]
    assert found.rows["field_accuracy"] == [1.0, 0.5, 0.0]
    assert found.summary["field_accuracy_by_field"] == {"age": pytest.approx(1 / 3), "name": pytest.approx(2 / 3)}
    typed = scores("extraction", ['{"name": "Ann", "age": 3.0}', '{"name": "Bob", "age": true}',
                                  'Here it is: {"name": "Cy", "age": 5}'], references)
    assert typed.rows["exact_match"] == [1.0, 0.0, 1.0] and typed.rows["field_accuracy"] == [1.0, 0.5, 1.0], (
        "3.0 is 3, true is not 1")
    assert typed.rows["json_valid"] == [1.0, 1.0, 0.0], "json.loads would fail on the text before the object"
    fenced = scores("extraction", ['{"name": "Ann", "age": 3}', '```json\n{"name": "Bob", "age": 4}\n```'],
                    ['```json\n{"name": "Ann", "age": 3}\n```', '```json\n{"name": "Bob", "age": 4}\n```'])
    assert fenced.rows["json_valid"] == [1.0, 1.0], "fenced as its reference is"
    composed = scores("extraction", ['{"name": "Zoe\u0308", "tags": ["a", {"b": false}]}'],
                      ['{"name": "Zo\u00eb", "tags": ["a", {"b": false}]}'])
    assert composed.rows["exact_match"] == [1.0], "one letter written two ways in Unicode"
    assert scores("extraction", ['{"tags": ["a", {"b": 0}]}'], ['{"tags": ["a", {"b": false}]}']).rows[
        "exact_match"] == [0.0]
    extraction = task_metrics(EvaluationConfig(task_type="extraction"))
    assert extraction.valid_outputs(['{"age": 1, "name": "Di"}', 'Sure: {"name": "Di", "age": 1}', '{"name": "Di"}',
                                     '{"name": "Di", "age": 1} Hope it helps!'], references) == [
        True, False, False, False], "a served answer in the form of the references, as a client reads it whole"
    assert extraction.valid_outputs(['```json\n{"name": "Di", "age": 1}\n```'], [f"```json\n{r}\n```" for r in
                                                                                references]) == [True]
    invented = scores("extraction", ['{"name": "Ann", "age": 3, "amount": 3}'], references[:1])
    assert invented.rows["field_accuracy"] == [pytest.approx(2 / 3)], "a field the reference lacks is never right"
    assert invented.summary["field_accuracy_by_field"]["amount"] == 0.0


def test_an_extraction_answer_is_odd_only_against_the_shape_nearly_all_answers_share():
    from ftpipe.core.evaluation.metrics.extraction import shape_of

    def odd_shapes(objects: list[dict]) -> list[str | None]:
        return list(map(shape_of(objects), objects))

    usual = [{"order": f"A-{i}", "amount": i + 0.5 if i % 2 else i, "urgent": i % 3 == 0,
              "note": None if i % 4 else "call back", **({"cc": "x"} if i % 5 == 0 else {})} for i in range(39)]
    odd = [*usual, {"order": "A-99", "amount": 3, "urgent": "no", "note": None}, {"order": "A-98", "amount": 1}]
    assert odd_shapes(usual) == [None] * 39, "ints and floats are numbers; null and a field a fifth give are not odd"
    assert odd_shapes(odd)[:39] == [None] * 39
    assert odd_shapes(odd)[39:] == ["gives 'urgent' as a string (\"no\"), where 39 of 40 answers give a boolean",
                                    "lacks the field 'urgent', which 40 of 41 answers give"]
    assert odd_shapes(odd[-12:]) == [None] * 12, "a dozen answers say too little about the usual shape"


def test_an_answer_with_text_around_its_object_is_odd_where_nearly_all_are_the_object_alone():
    from ftpipe.core.evaluation.metrics import answer_problem, shape_problems

    config = EvaluationConfig(task_type="extraction")
    answers = [json.dumps({"order": f"A{n}", "issue": "late"}) for n in range(40)]
    fenced = '```json\n{"order": "A9", "issue": "late"}\n```'
    found = shape_problems(config)([*answers, fenced, f"Here it is: {answers[0]}"])
    assert found == [None] * 40 + [
        "the answer has text around its JSON object ('```json' before it and '```' after it), where 40 of 42 answers "
        "are the object alone (evaluation.task_type extraction)",
        "the answer has text around its JSON object ('Here it is:' before it), where 40 of 42 answers are the object "
        "alone (evaluation.task_type extraction)"]
    assert shape_problems(config)([fenced] * 30 + answers[:2]) == [None] * 32, "a task whose answers are fenced"
    assert answer_problem(config)('{"order": "A1", "issue": "la') == (
        "the answer is not a JSON object (cut off?) (evaluation.task_type extraction)")
    assert answer_problem(config)("late") == "the answer is not a JSON object (evaluation.task_type extraction)"
    assert answer_problem(config)('{"order": "A1", "gift": false,}') == (
        "the answer is not valid JSON: Expecting property name enclosed in double quotes at character 31 "
        "('ift\": false,}') (evaluation.task_type extraction)")
    assert answer_problem(config)("Sure: {'order': 'A1'}").startswith(
        "the answer is not valid JSON: Expecting property name enclosed in double quotes at character 8 (")


def test_a_classification_answer_in_json_is_held_to_the_shape_nearly_all_answers_share_and_a_bare_label_is_not():
    from ftpipe.core.evaluation.metrics import shape_problems

    answers = [json.dumps({"category": label, "priority": "low"}) for label in ["billing", "shipping"] * 15]
    found = shape_problems(EvaluationConfig(task_type="classification", label_field="category"))(
        [*answers, '{"category": "billing", "priorty": "low"}'])
    assert found == [None] * 30 + ["the answer lacks the field 'priority', which 30 of 31 answers give (it gives "
                                   "'priorty': misspelt?) (evaluation.task_type classification)"]
    bare = shape_problems(EvaluationConfig(task_type="classification"))([*["billing"] * 30, '{"odd": 1}'])
    assert bare == [None] * 31


def test_the_extraction_report_shows_each_fields_accuracy_and_the_fields_answers_invent():
    from ftpipe.config import EvaluationConfig
    from ftpipe.core.evaluation.metrics import task_metrics

    records = [{"reference": '{"order": "A-1", "issue": "refund"}', "base_answer": "no idea",
                "finetuned_answer": '{"order": "A-1", "issue": "refund", "amount": 3}'},
               {"reference": '{"order": "A-2", "issue": "late", "amount": 9.5}', "base_answer": '{"order": "A-2"}',
                "finetuned_answer": '{"order": "A-2", "issue": "late", "amount": 9.5}'}]
    [(title, table)] = task_metrics(EvaluationConfig(task_type="extraction")).report_sections(
        records, {"finetuned": "fine-tuned", "base": "base"})
    assert title == "Fields" and table.splitlines()[2:] == [
        "| amount | 1 | 0.500 | 0.000 | 1 | 0 |",
        "| issue | 2 | 1.000 | 0.000 | 0 | 0 |",
        "| order | 2 | 1.000 | 0.500 | 0 | 0 |"]
    made_up = [{**records[0], "finetuned_answer": '{"order": "A-1", "wanted": "refund", "wanted_id": 1}'},
               {**records[1], "finetuned_answer": '{"order": "A-2", "wanted": "cancel"}'}]
    [(_, table)] = task_metrics(EvaluationConfig(task_type="extraction")).report_sections(
        made_up, {"finetuned": "fine-tuned", "base": "base"})
    assert [line.split(" |")[0] for line in table.splitlines()[2:5]] == ["| amount", "| issue", "| order"]
    assert table.splitlines()[-1] == "Fields no reference has, in the answers of fine-tuned: wanted ×2, wanted_id ×1"


def test_extraction_can_judge_by_field_accuracy():
    exact = task_metrics(EvaluationConfig(task_type="extraction"))
    fields = task_metrics(EvaluationConfig(task_type="extraction", extraction_metric="field_accuracy"))
    assert (exact.primary, fields.primary) == ("exact_match", "field_accuracy")
    rows = fields.scores(['{"order": "A-1", "city": "Lyon"}'], ['{"order": "A-1", "city": "Metz"}']).rows
    assert rows[fields.primary] == [0.5] and rows[exact.primary] == [0.0]


def test_the_extraction_report_shows_the_fields_often_null_on_the_rows_that_give_a_value():
    from ftpipe.config import EvaluationConfig
    from ftpipe.core.evaluation.metrics import task_metrics

    def row(order: int, city: str | None, answered: str | None) -> dict:
        return {"reference": json.dumps({"order": f"A-{order}", "city": city}),
                "base_answer": json.dumps({"order": f"A-{order}", "city": city}),
                "finetuned_answer": json.dumps({"order": f"A-{order}", "city": answered})}

    records = [row(1, None, None), row(2, None, None), row(3, None, None), row(4, "Lyon", None), row(5, "Metz", "Metz")]
    fields, given = task_metrics(EvaluationConfig(task_type="extraction")).report_sections(
        records, {"base": "base", "finetuned": "fine-tuned"})
    assert fields[1].splitlines()[2] == "| city | 5 | 1.000 | 0.800 | 0 | 0 |", "nulls answered null count as right"
    assert given == ("Fields on the rows that give a value",
                     "| field | null in the reference (answering null scores this) | rows with a value | base | "
                     "fine-tuned |\n|---|---|---|---|---|\n| city | 0.600 | 2 | 1.000 | 0.500 |")
    records += [{**row(6 + i, None, None), "finetuned_answer": json.dumps({"order": f"A-{6 + i}", "city": "Lyon"})}
                for i in range(2)]  # the fine-tuned model now fills in a city no reference gives
    given = task_metrics(EvaluationConfig(task_type="extraction")).report_sections(
        records, {"base": "base", "finetuned": "fine-tuned"})[1][1]
    assert given.endswith("\n\nBelow what answering null every time scores: city (fine-tuned 0.571 against 0.714)")


def test_the_extraction_report_shows_a_field_answered_with_one_value_everywhere():
    from ftpipe.config import EvaluationConfig
    from ftpipe.core.evaluation.metrics import task_metrics

    issues = ["late_delivery", "damaged_item", "wrong_item", "refund"]
    records = [{"reference": json.dumps({"order": f"A-{i}", "issue": issues[i % 4], "refund": i % 2 == 0,
                                         "name": None if i % 3 else f"N{i}"}),
                "finetuned_answer": json.dumps({"order": f"A-{i}", "issue": "cancelled" if i < 2 else issues[i % 4],
                                                "refund": False, "name": None}),
                "base_answer": "I can help with that order."} for i in range(24)]
    sections = dict(task_metrics(EvaluationConfig(task_type="extraction")).report_sections(
        records, {"finetuned": "fine-tuned", "base": "base"}))
    assert sections["Fields of a few values"].splitlines()[2:] == [
        "| issue | 4 | 0.250 (`\"late_delivery\"`) | `\"wrong_item\"` in 6 of 24, 2 with a value no reference gives "
        "| n/a |",
        "| refund | 2 | 0.500 (`true`) | `false` in 24 of 24 | n/a |",
        "",
        "No better than answering the commonest value every time: refund (fine-tuned 0.500 against 0.500 for `true`): "
        "the model does not tell this field's values apart"], "the order ids and names are no few values"
    assert "Below what answering null" not in sections["Fields on the rows that give a value"], (
        "the base model never gives the field: not said to be below (the fine-tuned model answers null: level)")


def test_generation_metrics():
    references = ["The apple is red.", "The lime is green", "Grüße aus Köln"]
    answers = ["the apple is red", "a lime is very green", "Grüße aus Bonn"]
    rows = scores("generation", answers, references).rows
    assert rows["exact_match"] == [1.0, 0.0, 0.0]
    assert rows["rouge_l"][0] == pytest.approx(1.0)
    # lcs "lime is green" = 3; P 3/5, R 3/4 -> F 2/3; token F1: overlap 3 -> 6/9
    assert rows["rouge_l"][1] == pytest.approx(2 / 3)
    assert rows["token_f1"][1] == pytest.approx(2 / 3)
    assert rows["rouge_l"][2] == pytest.approx(2 / 3)  # non-ASCII words are words too
    japanese = scores("generation", ["保証期間は二年間です"], ["保証期間はお買い上げから二年間です。"]).rows
    # written without spaces, each character is a word: the answer's 10 are in the reference's 17, in order
    assert japanese["rouge_l"] == [pytest.approx(20 / 27)] and japanese["token_f1"] == [pytest.approx(20 / 27)]


def test_check_references_refuses_unreadable_references_before_generation():
    rows = [{"id": "r1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "plain"}]}]
    with pytest.raises(ValueError, match="not a JSON object.*r1"):
        check_references(rows, task_metrics(EvaluationConfig(task_type="extraction")))
    with pytest.raises(ValueError, match="not a JSON object, so it has no field 'label'.*r1"):
        check_references(rows, task_metrics(EvaluationConfig(task_type="classification", label_field="label")))
    misspelt = [{**rows[0], "messages": [rows[0]["messages"][0], {"role": "assistant", "content": '{"lable": "x"}'}]}]
    with pytest.raises(ValueError, match=r"has no JSON field 'label' \(evaluation.label_field; it gives 'lable': "
                                         r"misspelt\?\)"):
        check_references(misspelt, task_metrics(EvaluationConfig(task_type="classification", label_field="label")))
    empty = [{**rows[0], "messages": [rows[0]["messages"][0], {"role": "assistant", "content": '{"label": null}'}]}]
    with pytest.raises(ValueError, match=r"gives nothing usable in its JSON field 'label' \(null; evaluation\."):
        check_references(empty, task_metrics(EvaluationConfig(task_type="classification", label_field="label")))
    check_references(rows, task_metrics(EvaluationConfig(task_type="generation")))


def test_select_rows_takes_first_n_by_id():
    rows = [{"id": i} for i in ("c", "a", "d", "b")]
    assert [r["id"] for r in select_rows(rows, 2)] == ["a", "b"]
    assert len(select_rows(rows, None)) == 4


@pytest.mark.parametrize(("check", "answer", "reference", "correct"), [
    ("contains", "The sky is Blue.", "blue", True),
    ("contains", "blueish", "blue", False),
    ("exact", "See you soon!", "see you soon", True),
    ("exact", "see you soon, friend", "see you soon", False),
    ("exact_case", "APPLE.", "APPLE", True),
    ("exact_case", "Apple", "APPLE", False),
    ("number", "The answer is 1,024 apples", "1024", True),
    ("number", "96 or 97", "97", False),
    ("number", "no idea", "0", False),
])
def test_probe_rows_are_scored_with_their_own_check(check, answer, reference, correct):
    assert probe_correct(answer, {"check": check, "reference": reference}) is correct


def test_every_row_of_the_shipped_probe_has_a_known_check_its_reference_passes():
    rows = read_probe(REPO_ROOT / "data" / "general" / "probe.jsonl")
    assert len(rows) >= 300 and len({row["skill"] for row in rows}) >= 4
    for row in rows:
        assert row.get("check", "contains") in CHECKS and probe_correct(row["reference"], row), row["id"]
    larger = next(row for row in rows if row["messages"][-1]["content"].startswith("Which number is larger, 7 or "))
    assert not probe_correct("7 is larger than 25.", larger), "a number-only question wants its number, not a mention"
    assert all(row["check"] == "number" for row in rows if row["messages"][-1]["content"].endswith("number only."))


def test_the_report_shows_each_models_score_by_message_length_when_lengths_vary():
    from ftpipe.core.evaluation.report import MIN_LENGTH_ROWS, length_table

    records = [{"message": " ".join(["word"] * words), "base_accuracy": 1.0, "finetuned_accuracy": float(words <= 12)}
               for words in range(24, 0, -1)]
    lines = length_table(records, "accuracy").splitlines()
    assert lines[0] == "| message words | rows | base | fine-tuned | fine-tuned − base |"
    assert lines[2:] == ["| 1–6 | 6 | 1.000 | 1.000 | +0.000 |", "| 7–12 | 6 | 1.000 | 1.000 | +0.000 |",
                         "| 13–18 | 6 | 1.000 | 0.000 | -1.000 |", "| 19–24 | 6 | 1.000 | 0.000 | -1.000 |"]
    assert length_table(records[:MIN_LENGTH_ROWS - 1], "accuracy") is None  # too few rows to say anything
    skewed = [{**record, "message": "short"} for record in records[:20]] + records[20:]  # 20 rows of one word
    assert length_table(skewed, "accuracy").splitlines()[2:] == [
        "| 1 | 21 | 1.000 | 0.429 | -0.571 |", "| 2–4 | 3 | 1.000 | 1.000 | +0.000 |"], "one length, one group"
    same = [{**record, "message": "one length"} for record in records]
    assert length_table(same, "accuracy") is None


def test_a_base_answering_out_of_the_tasks_form_is_said_with_what_measures_the_task():
    from ftpipe.core.evaluation.report import base_out_of_form

    extraction = {"rows": 40, "base_answers_in_form": 19, "fewshot_score": 0.4,
                  "metrics": {"base": {}, "finetuned": {}}}  # no label ranking
    said = "The base model answered 19 of 40 held-out rows in the task's form, so the delta over it counts learning"
    assert base_out_of_form(extraction) == (f"{said} the form as much as the task; the few-shot baseline (shown the "
                                            "form) says how much is the task.")
    assert base_out_of_form({**extraction, "fewshot_score": None}) == f"{said} the form as much as the task."
    assert base_out_of_form({**extraction, "base_answers_in_form": 20}) is None, "half in the form: a task baseline"
    assert base_out_of_form({**extraction, "base_answers_in_form": None}) is None, "an evaluation from before"
    math = {**extraction, "fewshot_score": None, "metrics": {"base": {"lenient_answer_match": 0.25},
                                                             "finetuned": {"lenient_answer_match": 0.4}}}
    assert base_out_of_form(math) == (f"{said} the form as much as the task; the lenient answer match, which reads an "
                                      "answer's last number where it gives no final one (base 0.250, fine-tuned "
                                      "0.400) says how much is the task.")


def test_labels_of_one_side_of_the_split_only_are_named_up_to_a_dozen():
    from ftpipe.core.evaluation.report import unheld_labels, unheld_labels_of, untaught_labels

    labels = [f"intent_{n:02d}" for n in range(14)]
    assert unheld_labels(labels[:9]).startswith(f"9 labels of the train rows ({', '.join(labels[:9])}) have no held-out")
    assert unheld_labels(labels).startswith(f"14 labels of the train rows ({', '.join(labels[:12])} and 2 more)")
    assert unheld_labels(["refund"]).startswith("1 label of the train rows (refund) has no held-out row: the scores "
                                                "say nothing about it")
    typos = {"refnd": "refund", "crad": "card", "other": "another"}
    assert unheld_labels(["refnd", "crad", "rare"], typos).endswith(
        "(a larger split.eval_fraction gives more labels a held-out row; 'refnd' looks like a typo of 'refund', 'crad' "
        "looks like a typo of 'card': correct them in the raw files).")
    assert unheld_labels({"rare": 1, "refund": 10, "card": 6}, None, 0.15) == (
        "3 labels of the train rows (refund ×10, card ×6, rare ×1) have no held-out row: the scores say nothing about "
        "them (a larger split.eval_fraction gives more labels a held-out row; the rows of refund ask a few questions "
        "in other words, and a question's rows stay on one side: rows asking other questions give it held-out rows).")
    evaluated = {"rows": 15, "train_rows": 85, "labels_without_heldout_rows": ["refund", "card", "rare"],
                 "train_rows_of_unheld_labels": {"refund": 10, "card": 6, "rare": 1}, "likely_typos": {}}
    assert unheld_labels_of(evaluated) == unheld_labels({"refund": 10, "rare": 1, "card": 6}, None, 0.15)
    before = {"rows": 15, "labels_without_heldout_rows": ["refund", "card"]}  # an evaluation from before the counts
    assert unheld_labels_of(before).startswith("2 labels of the train rows (refund, card) have no held-out row")
    assert untaught_labels({"rare": 2, "refnd": 1}).startswith(
        "2 labels of the held-out rows (rare ×2, refnd ×1) have no train row")
    assert untaught_labels(["refnd", "rare"], typos) == (
        "2 labels of the held-out rows (refnd, rare) have no train row: fine-tuning never shows them to the model (more "
        "rows of them in the raw files give them train rows; 'refnd' looks like a typo of 'refund': correct it in the "
        "raw files).")


def test_one_reference_over_the_answers_limit_is_said_in_the_singular():
    from ftpipe.core.evaluation.answer_budget import cut_off_warning

    found = {"references_over_limit": 1, "rows": 12, "answer_token_limit": 64, "longest_reference_tokens": 90}
    assert cut_off_warning(found).startswith("1 of 12 reference answers is longer than the answers' limit of 64 tokens")
    assert cut_off_warning({**found, "references_over_limit": 0}) is None
