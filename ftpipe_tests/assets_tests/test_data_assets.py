"""The data assets and the leakage check, materialized against a real instance; the code location's shape."""

import ast
import json
from collections import Counter
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from ftpipe.assets import data
from ftpipe.checks import heldout_split_no_leakage, raw_examples_every_file_used
from ftpipe.core.layout import SPLIT_RECORD, TaskLayout
from ftpipe.core.records import example_id
from ftpipe.core.tasks import task_files_version
from ftpipe.partitions import task_partitions
from ftpipe_tests.builders import chat, check, make_task, materialization

ROWS = [chat(f"ticket {i}: my order number {i * 7} never arrived at street {i}", f"shipping-{i % 3}") for i in range(60)]
ASSETS = [data.raw_examples, data.deduplicated_examples, data.review_sample, data.heldout_split]


def materialize(instance: dg.DagsterInstance, task: str, run_config: dict | None = None, **kwargs):
    instance.add_dynamic_partitions(task_partitions.name, [task])
    return dg.materialize(
        ASSETS + [heldout_split_no_leakage], instance=instance, partition_key=task, run_config=run_config, **kwargs
    )


def materialized_with_warnings(task: str) -> tuple[dg.ExecuteInProcessResult, list[str]]:
    """The task's data assets materialized in a test instance, and the warnings their run logged."""
    with dg.instance_for_test() as instance:
        result = materialize(instance, task)
        return result, [log.user_message for log in instance.all_logs(result.run_id) if log.level == 30]


def test_data_assets_materialize_with_contract_metadata(ftpipe_env: Path) -> None:
    dirty = ROWS + [ROWS[0], chat("ticket 1: my order number 7 never arrived at street 1", "billing"), {"oops": 1}]
    make_task(ftpipe_env, "shop", {"a.jsonl": dirty}, "split: {eval_fraction: 0.2}\n")
    with dg.instance_for_test() as instance:
        result = materialize(instance, "shop")
        assert result.success
        raw = materialization(result, "raw_examples")
        assert (raw["rows_read"], raw["rows_valid"], raw["rows_quarantined"]) == (63, 62, 1)
        assert Path(raw["quarantine_path"]).exists()
        deduped = materialization(result, "deduplicated_examples")
        assert deduped["rows_in"] == deduped["rows_out"] + deduped["exact_duplicates"] + deduped["near_duplicates"] + deduped["contradictions"]
        assert deduped["exact_duplicates"] == 1 and deduped["contradictions"] == 1, (
            "a generation task (the default) keeps the first row of a 1-vs-1 tie")
        split = materialization(result, "heldout_split")
        assert split["train_rows"] + split["eval_rows"] == deduped["rows_out"]
        assert materialization(result, "review_sample")["rows"] == deduped["rows_out"]
        [check] = result.get_asset_check_evaluations()
        assert check.passed and check.check_name == "heldout_split_no_leakage"
        versions = {e.asset_key.to_user_string(): e.materialization.tags["dagster/data_version"]
                    for e in result.get_asset_materialization_events()}
        again = materialize(instance, "shop")
        assert versions == {e.asset_key.to_user_string(): e.materialization.tags["dagster/data_version"]
                            for e in again.get_asset_materialization_events()}


def test_run_config_overrides_the_task_for_one_run(ftpipe_env: Path) -> None:
    make_task(ftpipe_env, "shop", {"a.jsonl": ROWS})
    override = {"ops": {"heldout_split": {"config": {"overrides": "split: {eval_fraction: 0.5}"}}}}
    with dg.instance_for_test() as instance:
        result = materialize(instance, "shop", override)
    assert materialization(result, "heldout_split")["eval_fraction"] == 0.5


def test_the_leakage_check_judges_with_the_runs_overrides(ftpipe_env: Path) -> None:
    """Prompts one word apart (Jaccard about 0.7) are near-duplicates at task.yaml's threshold 0.5, not at the run's
    0.95: the split may put such a pair on both sides, and the check must judge with 0.95 as the split did."""
    from ftpipe.core import split
    from ftpipe.core.similarity import Settings

    rng = random.Random(0)
    rows = []
    for i in range(40):
        words = [f"w{rng.randrange(10**6)}" for _ in range(20)]
        rows += [chat(" ".join(words), f"a{i}"), chat(" ".join(words[:10] + [f"x{i}"] + words[11:]), f"b{i}")]
    make_task(ftpipe_env, "shop", {"a.jsonl": rows}, "dedup: {near_threshold: 0.5}\n")
    strict = {"config": {"overrides": "dedup: {near_threshold: 0.95}"}}
    with dg.instance_for_test() as instance:
        result = materialize(instance, "shop", {"ops": {"deduplicated_examples": strict, "heldout_split": strict}})
    assert result.success and check(result, "heldout_split_no_leakage").passed
    assert split.split_leaks(TaskLayout("shop").asset("heldout_split"), Settings(threshold=0.5)), \
        "task.yaml alone would call this split leaky"


def test_a_split_that_parts_one_question_in_other_wrapping_fails_the_check_until_a_new_seed_splits_again(
        ftpipe_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftpipe.core import split
    from ftpipe.core.records import read_examples
    from ftpipe_tests.intents import SYSTEM_PROMPT, wrapped_messages

    rows = [chat(message, label) for message, label in wrapped_messages(300)]
    make_task(ftpipe_env, "chats", {"a.jsonl": rows}, f"data: {{system_prompt: {json.dumps(SYSTEM_PROMPT)}}}\n")
    with dg.instance_for_test() as instance:
        with monkeypatch.context() as earlier:  # a split made before the rule
            earlier.setattr(split, "_wrapped_links", lambda copies: [])
            leaky = check(materialize(instance, "chats", raise_on_error=False), "heldout_split_no_leakage")
        assert not leaky.passed and leaky.metadata["leaked_eval_rows"].value > 10
        assert " asks the question of train row a.jsonl:line " in leaky.description
        kept = check(materialize(instance, "chats", raise_on_error=False), "heldout_split_no_leakage")
        assert kept.description == leaky.description, "the recorded sides are kept"
        new_seed = {"ops": {"heldout_split": {"config": {"overrides": "split: {seed: 1}"}}}}
        again = materialize(instance, "chats", new_seed)
        assert check(again, "heldout_split_no_leakage").passed
    folder = TaskLayout("chats").asset("heldout_split")
    sides: dict[str, set[str]] = {}
    for side in ("train", "eval"):
        for row in read_examples(folder / f"{side}.parquet"):
            core = row["messages"][1]["content"].split(", ", 1)[1].split("?")[0]
            sides.setdefault(core, set()).add(side)
    assert len(sides) > 40 and all(len(found) == 1 for found in sides.values()), "each question on one side"


def test_a_field_whose_values_are_mostly_of_one_json_type_names_the_answers_of_another(ftpipe_env: Path) -> None:
    orders = [chat(f"order A-{i}: {1 + i % 4} lamps to Oslo", json.dumps({"order_id": f"A-{i}", "quantity": 1 + i % 4}))
              for i in range(30)]
    for i in (3, 11, 12, 20):
        orders[i]["messages"][-1]["content"] = json.dumps({"order_id": f"A-{i}", "quantity": str(1 + i % 4)})
    make_task(ftpipe_env, "orders", {"a.jsonl": orders}, "evaluation: {task_type: extraction}\n")
    result, warnings = materialized_with_warnings("orders")
    assert materialization(result, "deduplicated_examples")["values_of_another_type"] == 4
    assert ("orders: 1 field of the answers has values of another JSON type than most: 'quantity' is a string in 4 "
            "answers (the first a.jsonl:line 4: \"4\") and a number in 26; a value scores only as its own type, so the "
            "model learns to answer both ways: write them one way in the raw files") in warnings


def test_answers_the_task_type_cannot_read_are_quarantined_and_a_changed_type_reads_the_files_again(
        ftpipe_env: Path) -> None:
    orders = [chat(f"order A-{i} arrived broken", json.dumps({"order_id": f"A-{i}"})) for i in range(30)]
    orders[7] = chat("order A-7 arrived broken", "order A-7, broken")
    folder = make_task(ftpipe_env, "orders", {"a.jsonl": orders}, "evaluation: {task_type: extraction}\n")
    with dg.instance_for_test() as instance:
        raw = materialization(materialize(instance, "orders"), "raw_examples")
        assert (raw["rows_valid"], raw["rows_quarantined"]) == (29, 1)
        [entry] = [json.loads(line) for line in Path(raw["quarantine_path"]).read_text().splitlines()]
        assert entry["source"] == "a.jsonl:line 8"
        assert entry["reason"] == "the answer is not a JSON object (evaluation.task_type extraction)"
        (folder / "task.yaml").write_text("evaluation: {task_type: generation}\n")
        (folder / "raw" / "b.jsonl").write_text('{"prompt": "lost"}\n{"prompt": "gone"}\n')
        (folder / "raw" / "c.csv").write_text("message_text,extracted\nlost,{}\n")
        result = dg.materialize(ASSETS + [raw_examples_every_file_used], instance=instance, partition_key="orders",
                                raise_on_error=False)
    raw = materialization(result, "raw_examples")
    assert (raw["rows_valid"], raw["rows_quarantined"]) == (30, 3), "any answer is one of a generation task"
    (verdict,) = result.get_asset_check_evaluations()
    assert not verdict.passed and verdict.description.startswith(
        "every row of b.jsonl, c.csv went to the quarantine, e.g. b.jsonl:line 1: ")
    assert "; c.csv:line 2: " in verdict.description, "each file's reason, so each file's mapping hint, at once"
    assert verdict.description.endswith("mend the files or their mappings (data.columns, data.files), or take them out "
                                        f"of raw/ (every reason in {raw['quarantine_path']})")
    assert not result.success and not [e for e in result.get_asset_materialization_events()
                                       if e.asset_key.path == ["deduplicated_examples"]], "nothing trains without it"


def test_an_extraction_answer_missing_a_field_or_giving_it_another_type_is_quarantined_not_a_contradiction(
        ftpipe_env: Path) -> None:
    orders = [chat(f"Order A-{i} from {city} arrived broken, please call me.", json.dumps(
        {"order_id": f"A-{i}", "city": city, "urgent": i % 2 == 0})) for i, city in enumerate(["Lyon", "Oslo"] * 20)]
    typed_wrong = chat(orders[3]["messages"][0]["content"], '{"order_id": "A-3", "city": "Oslo", "urgent": "no"}')
    missing = chat("Order B-1 from Rome is late.", '{"order_id": "B-1", "city": "Rome"}')
    misspelt = chat("Order C-7 from Oslo never came.", '{"order_id": "C-7", "city": "Osloo", "urgent": false}')
    system = "Extract the order as JSON with order_id, city and urgent (true when the customer asks to be called). " * 3
    make_task(ftpipe_env, "orders", {"a.jsonl": [*orders, typed_wrong, missing, misspelt]},
              f"evaluation: {{task_type: extraction}}\ndata: {{system_prompt: {json.dumps(system)}}}\n")
    result, warnings = materialized_with_warnings("orders")
    raw, deduped = materialization(result, "raw_examples"), materialization(result, "deduplicated_examples")
    shared = Path(materialization(result, "review_sample")["shared_system_prompt_path"])
    assert shared.read_text() == system and system not in shared.with_name("review_sample.csv").read_text(), \
        "the long system prompt every row carries is written once"
    quarantined = [json.loads(line) for line in Path(raw["quarantine_path"]).read_text().splitlines()]
    assert [(row["source"], row["reason"]) for row in quarantined] == [
        ("a.jsonl:line 41", "the answer gives 'urgent' as a string (\"no\"), where 41 of 42 answers give a boolean "
                            "(evaluation.task_type extraction)"),
        ("a.jsonl:line 42", "the answer lacks the field 'urgent', which 42 of 43 answers give (evaluation.task_type "
                            "extraction)")]
    assert [json.loads(row["raw"]) for row in quarantined] == [
        {"answer": typed_wrong["messages"][-1]["content"], "row": typed_wrong},
        {"answer": missing["messages"][-1]["content"], "row": missing}], "the answer, then the row as its file holds it"
    preview = raw["quarantine_preview"].splitlines()[2]
    assert preview.startswith("| a.jsonl:line 41 |") and '\\"urgent\\": \\"no\\"' in preview, \
        "the answer shown first, before the long system prompt"
    assert (deduped["rows_out"], deduped["contradictions"]) == (41, 0), "the well-formed original stays"
    assert 'orders: 1 value looks like a typo of a commoner value of its field: city "Osloo" ×1 (like "Oslo" ×20; ' \
           "first a.jsonl:line 43); it is trained and scored as a value of its own: correct it in the raw files" \
           in warnings, "the row to correct named"
    assert '| city | "Osloo" | 1 | "Oslo" | 20 | a.jsonl:line 43 |' in deduped["misspelt_labels"]


def test_a_label_written_several_ways_is_trained_as_most_rows_write_it(ftpipe_env: Path) -> None:
    from ftpipe.core.preferences import read_preferences
    from ftpipe.core.records import read_examples

    spellings = ["Billing", "billing", "Billing", "BILLING ", "Shipping"]
    rows = [chat(f"ticket {i}: question {i * 13} about invoice {i}", json.dumps({"category": spellings[i % 5]}))
            for i in range(60)] + [chat("my parcel never came, order 4417", '{"category": "Shiping"}')]
    pairs = [{"prompt": f"parcel {i}: tracking number {i * 31} shows nothing", "chosen": '{"category": "shipping "}',
              "rejected": '{"category": "billing"}'} for i in range(4)]
    make_task(ftpipe_env, "desk", {"a.jsonl": rows, "p.jsonl": pairs},
              "evaluation: {task_type: classification, label_field: category}\n")
    with dg.instance_for_test() as instance:
        result = materialize(instance, "desk")
        infos = [log.user_message for log in instance.all_logs(result.run_id) if log.level == 20]
        warnings = [log.user_message for log in instance.all_logs(result.run_id) if log.level == 30]
    deduped = materialization(result, "deduplicated_examples")
    assert deduped["labels_respelled"] == 24 and '| "Billing" | "BILLING " | 12 |' in deduped["label_spellings"]
    assert deduped["preference_answers_respelled"] == 8
    review = materialization(result, "review_sample")
    assert review["preference_rows"] == 4 and Path(review["preferences_csv_path"]).is_file()
    assert review["preference_sample"].splitlines()[0] == "| prompt | chosen | rejected | source |"
    assert '| {"category": "Shipping"} | {"category": "Billing"} |' in review["preference_sample"], "as trained"
    assert deduped["removed_by_label"].splitlines()[2:] == [
        "| Billing | 48 | 0 | 0% |", "| Shiping | 1 | 0 | 0% |", "| Shipping | 12 | 0 | 0% |"]
    assert deduped["likely_misspelt_labels"] == 1
    assert '| "Shiping" | 1 | "Shipping" | 12 | a.jsonl:line 61 |' in deduped["misspelt_labels"]
    typo = ('desk: 1 label looks like a typo of a commoner label: "Shiping" ×1 (like "Shipping" ×12; first '
            'a.jsonl:line 61); it is trained and scored as a label of its own: correct it in the raw files')
    assert typo in warnings, "a typo is not a spelling"
    assert "desk: 1 label of the train rows (Shiping ×1) has no held-out row: the scores say nothing about it (a " \
           "larger split.eval_fraction gives more labels a held-out row; 'Shiping' looks like a typo of 'Shipping': " \
           "correct it in the raw files)." in warnings
    assert 'desk: 24 rows\' and 8 preference answers\' labels respelled as each label is trained (as ' \
           'data.label_names writes it, a typo of it too, else as the last cleaning or most of its answers write ' \
           'it): "billing" as "Billing" ×12, ' \
           '"BILLING " as "Billing" ×12' in infos
    written = {json.loads(r["messages"][-1]["content"])["category"]
               for path in TaskLayout("desk").split_files for r in read_examples(path)}
    cleaned_pairs = read_preferences(TaskLayout("desk").preferences("deduplicated_examples"))
    preferred = {(r["chosen"], r["rejected"]) for r in cleaned_pairs}
    assert written == {"Billing", "Shipping", "Shiping"} and preferred == {('{"category": "Shipping"}', '{"category": "Billing"}')}
    split = materialization(result, "heldout_split")
    assert (f"desk: {split['train_rows']} train / {split['eval_rows']} eval rows, {split['train_pairs']} train / "
            f"{split['eval_pairs']} eval preference rows") in infos, "the pairs' split beside the rows'"


def test_a_system_prompt_naming_some_of_the_label_names_is_a_warning_in_the_run_log(ftpipe_env: Path) -> None:
    names = ["billing", "refund", "shipping", "warranty", "returns"]
    rows = [chat(f"ticket {i}: question {i * 13} about order {i}", names[i % 5]) for i in range(40)]
    make_task(ftpipe_env, "desk", {"a.jsonl": rows},
              f"data: {{label_names: {names}, system_prompt: 'Answer one of: billing, refund, shipping, warr'}}\n"
              "evaluation: {task_type: classification}\n")
    result, warnings = materialized_with_warnings("desk")
    assert result.success
    assert ("desk: the system prompt of 40 rows names 3 of the 5 labels of data.label_names, not warranty, returns "
            "(it ends 'illing, refund, shipping, warr'): the model is told of some labels only; list them all in "
            "data.system_prompt") in warnings


def test_pairs_whose_answers_differ_only_in_punctuation_are_kept_and_counted_with_a_warning(ftpipe_env: Path) -> None:
    rows = [chat(f"order {i}: where is parcel {i * 17}?", f"It ships on day {i}.") for i in range(20)]
    pairs = [{"prompt": "Is it free?", "chosen": "Yes.", "rejected": "yes"},
             {"prompt": "Give the count as JSON", "chosen": '{"count": 1}', "rejected": '{"count": 1,}'},
             {"prompt": "Can I return it?", "chosen": "Within 30 days.", "rejected": "No."}]
    make_task(ftpipe_env, "shop", {"a.jsonl": rows, "p.jsonl": pairs})
    result, warnings = materialized_with_warnings("shop")
    cleaned = materialization(result, "deduplicated_examples")
    assert cleaned["pairs_differing_in_punctuation"] == 2 and cleaned["preference_rows_out"] == 3, "kept"
    assert ("shop: 2 preference pairs kept whose answers differ only in punctuation, case or spacing (the first: "
            "p.jsonl:line 1): what such a pair teaches is that difference") in warnings


def test_pairs_rejecting_the_answer_a_chat_row_teaches_or_choosing_a_cut_off_answer_are_counted_with_warnings(
        ftpipe_env: Path) -> None:
    system = "You answer the shop's customers in one sentence."
    rows = [chat(f"order {i}: where is parcel {i * 17}?", f"It ships on day {i}.", system) for i in range(20)]
    pairs = [{"prompt": "order 3: where is parcel 51?", "chosen": "Parcel 51 ships on day 3.",  # given the system's
              "rejected": "it  ships on day 3."},  # the chat row's answer as cleaning compares answers
             {"prompt": "order 4: where is parcel 68?", "chosen": "It ships on day 4.", "rejected": "No idea."},
             {"prompt": "order 6: where is parcel 102?", "chosen": "It ships on day 6.",
              "rejected": "It ships on day 6"},  # another answer by its punctuation: the other warning's
             {"prompt": "order 5: where is my parcel?", "chosen": "Which parcel?", "rejected": "It ships on day 5."}]
    pairs += [{"prompt": f"Can I return item {i * 7}?", "chosen": f"Yes, within {i + 10} days of delivery.",
               "rejected": "No."} for i in range(8)]
    pairs.append({"prompt": "How do I pair the hub?", "chosen": "Open the app, tap Devices and then add it ag",
                  "rejected": "No idea."})
    make_task(ftpipe_env, "shop", {"a.jsonl": rows, "p.jsonl": pairs})
    result, warnings = materialized_with_warnings("shop")
    cleaned = materialization(result, "deduplicated_examples")
    assert (cleaned["pairs_rejecting_taught_answers"], cleaned["cut_off_chosen_answers"]) == (1, 1)
    assert ("shop: 1 preference pair has a chosen answer that ends mid-sentence where the others end whole (the "
            "first: p.jsonl:line 13, ending 'and then add it ag'): a preference stage teaches the model to prefer "
            "the cut-off text; complete the answer or drop the pair") in warnings
    assert ("shop: 1 preference pair rejects the answer a chat row gives the same prompt (the first: p.jsonl:line 1, "
            "against a.jsonl:line 4): the supervised stage teaches that answer and the preference stage trains away "
            "from it; mend the pair or the chat row") in warnings


def test_a_support_export_of_chats_pairs_and_thumbs_is_read_and_what_a_stage_leaves_out_is_said(
        ftpipe_env: Path) -> None:
    system = "You are the shop's support assistant. Answer in one short, friendly sentence."
    chats = [chat(f"order {i}: where is parcel {i * 17}?", f"Parcel {i * 17} ships on day {i}.", system)
             for i in range(40)]
    chats[0]["messages"].append({"role": "assistant", "content": "Anything else?"})  # one turn written as two
    pairs = [{"prompt": f"can I return item {i * 13}?", "chosen": f"Yes, item {i * 13} within 30 days.",
              "rejected": "No."} for i in range(20)]
    thumbs = "prompt,completion,label\n" + "".join(f"is item {i} in stock?,Yes.,{i % 2 == 0}\n" for i in range(6))
    folder = make_task(ftpipe_env, "desk", {"chats.jsonl": chats, "pairs.jsonl": pairs, "thumbs.csv": thumbs},
                       "training: {stages: [sft, dpo]}\n")
    with dg.instance_for_test() as instance:
        first = materialize(instance, "desk")
        warnings = [log.user_message for log in instance.all_logs(first.run_id) if log.level == 30]
        split = materialization(first, "heldout_split")
        unpaired = split["unpaired_train_rows"] + split["unpaired_eval_rows"]
        assert unpaired == 6 and (f"desk: 6 preference rows ({split['unpaired_eval_rows']} held out) are unpaired "
                                  "(a completion and a label): dpo trains and is evaluated on pairs (chosen and "
                                  "rejected) only, so it leaves them out; kto trains on both kinds") in warnings
        assert ("desk: 1 of 40 rows have turns that do not alternate (the first: chats.jsonl:line 1, messages[2] and "
                "[3] both assistant)") in " ".join(warnings)
        (folder / "raw" / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs[5:]))
        again = materialize(instance, "desk")
        infos = [log.user_message for log in instance.all_logs(again.run_id) if log.level == 20]
        gone = materialization(again, "heldout_split")
        assert gone["gone_train_rows"] + gone["gone_eval_rows"] == 5
        assert any(line.endswith(f"; 5 of the last split's rows left it ({gone['gone_train_rows']} train, "
                                 f"{gone['gone_eval_rows']} eval): cleaning removed them, or the raw files no longer "
                                 "hold them") for line in infos), "the split's line says which rows left"


def test_sources_naming_their_columns_differently_are_read_by_data_files(ftpipe_env: Path) -> None:
    current = "".join(f"ticket {i}: parcel {i * 7} is late,shipping\n" for i in range(30))
    legacy = "".join(f"case {i}: refund {i * 11} not received,billing\n" for i in range(30))
    yaml = ("data:\n  columns: {prompt: customer_message, completion: intent}\n"
            "  files:\n    legacy/*.csv: {columns: {prompt: text, completion: label}}\n    archive/*.csv: {}\n")
    make_task(ftpipe_env, "desk", {"tickets.csv": "customer_message,intent\n" + current,
                                   "legacy/2023.csv": "text,label\n" + legacy}, yaml)
    result, warnings = materialized_with_warnings("desk")
    raw = materialization(result, "raw_examples")
    assert (raw["rows_valid"], raw["rows_quarantined"]) == (60, 0)
    assert "desk: data.files names 'archive/*.csv', which no raw file matches (the files read: legacy/2023.csv, " \
           "tickets.csv)" in warnings


def test_a_classification_trains_a_labels_only_row_and_warns_such_labels_have_no_held_out_row(
        ftpipe_env: Path) -> None:
    from ftpipe.core.records import answers

    topics = ["lost passport", "wedding gift", "tax form", "broken window", "new puppy", "solar panels", "jury duty",
              "piano lessons", "roof repair", "school trip", "garden fence", "car insurance"]
    rows = [chat(f"message {i}: about payment {i * 17} from branch {i}", ["refund", "card"][i % 2]) for i in range(60)]
    rows += [chat(f"Can you help me with the {topic} this week?", f"rare {i}") for i, topic in enumerate(topics)]
    make_task(ftpipe_env, "bank", {"a.jsonl": rows}, "evaluation: {task_type: classification}\n")
    result, warnings = materialized_with_warnings("bank")
    train, evaluation = (set(answers(path)) for path in TaskLayout("bank").split_files)
    unheld = sorted(train - evaluation)
    assert unheld == sorted(f"rare {i}" for i in range(12)), "a label's only row trains"
    assert {"refund", "card"} <= evaluation
    assert materialization(result, "heldout_split")["labels_without_heldout_rows"] == 12
    assert warnings[0].startswith("bank: 12 labels of the train rows (rare 0 ×1, rare 1 ×1, rare 10 ×1, ")
    assert warnings[0].endswith("(a larger split.eval_fraction gives more labels a held-out row).")
    assert materialization(result, "heldout_split")["labels_without_train_rows"] == 0 and len(warnings) == 1


def test_labels_without_held_out_rows_are_named_with_their_rows_and_those_of_a_few_questions_said_so(
        ftpipe_env: Path) -> None:
    from ftpipe.core.records import answers
    from ftpipe_tests.intents import wrapped_messages

    rows = [chat(message, label) for message, label in wrapped_messages(300)]  # 2 questions a label, many wordings
    make_task(ftpipe_env, "intents", {"a.jsonl": rows}, "evaluation: {task_type: classification}\n")
    result, warnings = materialized_with_warnings("intents")
    train, evaluation = (Counter(answers(path)) for path in TaskLayout("intents").split_files)
    unheld = sorted((label for label in train if label not in evaluation), key=lambda label: (-train[label], label))
    few_questions = [label for label in unheld if train[label] >= 7]  # a share of 0.15 is a row or more
    assert len(few_questions) > 3 and len(unheld) > len(few_questions)
    line = next(warning for warning in warnings if "have no held-out row" in warning)
    assert line.startswith(f"intents: {len(unheld)} labels of the train rows ({unheld[0]} ×{train[unheld[0]]}, "
                           f"{unheld[1]} ×{train[unheld[1]]}, ")
    named = ", ".join(few_questions[:12]) + (f" and {len(few_questions) - 12} more" if len(few_questions) > 12 else "")
    assert (f"; the rows of {named} ask a few questions in other words, and a question's rows stay on one side: rows "
            "asking other questions give them held-out rows" in line)


def test_a_split_that_holds_out_no_row_says_so_and_the_training_refuses_for_that_reason(ftpipe_env: Path) -> None:
    from ftpipe.config import TrainingConfig
    from ftpipe.core.training.setup import Refused, require_rows

    rows = [chat(f"message {i}: about payment {i * 17} from branch {i}", ["refund", "card"][i % 2]) for i in range(4)]
    make_task(ftpipe_env, "tiny", {"a.jsonl": rows}, "split: {eval_fraction: 0.05}\n")
    result, warnings = materialized_with_warnings("tiny")
    assert materialization(result, "heldout_split")["eval_rows"] == 0
    assert ("tiny: no held-out row of 4: nothing can be evaluated, so no training starts; a larger "
            "split.eval_fraction holds some out") in warnings
    with pytest.raises(Refused, match=r"^no eval rows: the held-out split has none \(a larger split.eval_fraction"):
        require_rows(rows, [], [], TrainingConfig())


def test_class_ids_are_trained_and_held_out_as_the_label_names_task_yaml_gives(ftpipe_env: Path) -> None:
    from ftpipe.core.records import answers

    names = ["activate_my_card", "age_limit", "card_arrival", "lost_card"]
    rows = [{"text": f"customer {i} writes about topic {i % 4}, order {i * 31}", "label": i % 4} for i in range(80)]
    # names in another spelling, on more rows than the ids: trained as label_names writes them
    rows += [{"text": f"a shop {i} exported its ticket {i * 17} by name", "label": ["Lost Card", "card-arrival"][i % 2]}
             for i in range(60)]
    task_yaml = ("evaluation: {task_type: classification}\n"
                 f"data: {{columns: {{prompt: text, completion: label}}, label_names: [{', '.join(names)}]}}\n")
    make_task(ftpipe_env, "bank", {"export.jsonl": rows}, task_yaml)
    result, warnings = materialized_with_warnings("bank")
    assert materialization(result, "raw_examples")["rows_quarantined"] == 0
    assert set().union(*(answers(path) for path in TaskLayout("bank").split_files)) == set(names)
    assert materialization(result, "deduplicated_examples")["labels_not_in_label_names"] == 0
    assert not [warning for warning in warnings if "label_names" in warning]

    more = [{"text": f"can I get a mortgage for flat {i} on street {i * 7}", "label": "mortgage_enquiry"}
            for i in range(3)] + [{"text": "queue three please, ticket 9001", "label": "other"}]
    (ftpipe_env / "tasks" / "bank" / "raw" / "later.jsonl").write_text("".join(json.dumps(r) + "\n" for r in more))
    result, warnings = materialized_with_warnings("bank")
    assert materialization(result, "deduplicated_examples")["labels_not_in_label_names"] == 2
    assert ('bank: 2 labels of the rows are not in data.label_names: "mortgage_enquiry" ×3, "other" ×1; each is '
            "trained and scored as a class of its own: add them there, or correct the rows in the raw files") \
        in warnings


def test_zero_valid_rows_fails_naming_the_folder(ftpipe_env: Path) -> None:
    make_task(ftpipe_env, "empty", {"a.jsonl": [{"nothing": 1}]})
    with dg.instance_for_test() as instance, pytest.raises(dg.Failure, match="^empty: .*no usable rows"):
        materialize(instance, "empty")  # a Failure: the UI shows its one line, not a stack trace


def test_leakage_check_blocks_when_an_earlier_split_pinned_near_duplicates_apart(ftpipe_env: Path) -> None:
    """Cleaning keeps two near-duplicate prompts (this run's cleaning is stricter), and an earlier split pinned them
    to different sides: the check blocks."""
    prompt = " ".join(f"word{i}" for i in range(40))
    near = prompt.replace("word7", "other")
    a, b = chat(prompt, "alpha " * 30), chat(near, "omega " * 30)
    make_task(ftpipe_env, "shop", {"a.jsonl": ROWS + [a, b]})
    folder = TaskLayout("shop").asset("heldout_split")
    folder.mkdir(parents=True)
    pinned = {example_id(a["messages"]): "train", example_id(b["messages"]): "eval"}
    (folder / SPLIT_RECORD).write_text(json.dumps({"eval_fraction": 0.15, "seed": 0, "sides": pinned}))
    with dg.instance_for_test() as instance:
        strict_cleaning = {"ops": {"deduplicated_examples": {"config": {"overrides": "dedup: {near_threshold: 0.99}"}}}}
        result = materialize(instance, "shop", strict_cleaning, raise_on_error=False)
    leakage = check(result, "heldout_split_no_leakage")
    assert not result.success and not leakage.passed
    assert leakage.metadata["leaked_eval_rows"].value == 1


def test_definitions_graph_and_no_heavy_imports() -> None:
    code = (
        "import sys, json; from ftpipe.definitions import defs; "
        "g = defs.resolve_asset_graph(); "
        "print(json.dumps({'assets': sorted(k.to_user_string() for k in g.get_all_asset_keys()), "
        "'deps': {k.to_user_string(): sorted(p.to_user_string() for p in g.get(k).parent_keys) for k in g.get_all_asset_keys()}, "
        "'heavy': [m for m in ('torch', 'transformers', 'trl', 'peft', 'mlflow') if m in sys.modules]}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["heavy"] == []
    assert {"task_files", "raw_examples", "deduplicated_examples", "review_sample", "heldout_split"} <= set(info["assets"])
    assert info["deps"]["raw_examples"] == ["task_files", "teacher_examples"]
    assert info["deps"]["teacher_examples"] == ["task_files"]
    assert info["deps"]["production_report"] == ["heldout_split", "production_requests"]
    assert info["deps"]["deduplicated_examples"] == ["raw_examples"]
    assert info["deps"]["heldout_split"] == ["deduplicated_examples"]
    assert info["deps"]["review_sample"] == ["deduplicated_examples"]


def test_asset_modules_checks_and_automation_import_no_asset_module() -> None:
    """They name upstream assets by key; only `ftpipe.assets.common` is shared."""
    from ftpipe.core.storage import REPO_ROOT

    package = REPO_ROOT / "ftpipe"
    for module in [*(package / "assets").glob("*.py"), package / "checks.py", package / "automation.py"]:
        tree = ast.parse(module.read_text())
        imported = {f"{node.module}.{alias.name}" if node.module == "ftpipe.assets" else node.module
                    for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assets = {name for name in imported if name and name.startswith("ftpipe.assets.")}
        assert assets <= {"ftpipe.assets.common"}, f"{module.name} imports {assets}"


def test_tasks_sync_cli_registers_partitions(ftpipe_env: Path, tmp_path: Path) -> None:
    make_task(ftpipe_env, "alpha", {"a.jsonl": ROWS})
    (ftpipe_env / "tasks" / "UPPER").mkdir()
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "ftpipe", "tasks", "sync"], capture_output=True, text=True, env=env)
    assert "alpha" in done.stdout and "'UPPER'" in done.stderr and done.returncode == 1, "a refused folder: status 1"
    named = subprocess.run([sys.executable, "-m", "ftpipe", "run", "UPPER"], capture_output=True, text=True, env=env)
    assert named.returncode == 2 and named.stderr.strip().splitlines()[-1] == (
        "ftpipe run of task 'UPPER': FAILED before starting: task folder 'UPPER': invalid name; use lowercase letters, "
        "digits, '_' or '-', starting with a letter or digit, at most 64 characters"), "why it is refused, once"
    (ftpipe_env / "tasks" / "Other").mkdir()
    sibling = subprocess.run([sys.executable, "-m", "ftpipe", "run", "UPPER"], capture_output=True, text=True, env=env)
    assert "task folders refused (python -m ftpipe tasks sync says why): Other\n" in sibling.stdout, "not UPPER again"
    (ftpipe_env / "tasks" / "Other").rmdir()
    (ftpipe_env / "tasks" / "UPPER").rmdir()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_dynamic_partitions(task_partitions.name) == ["alpha"]
        [observed] = instance.fetch_observations(dg.AssetKey("task_files"), limit=5).records
        assert observed.asset_observation.tags["dagster/data_version"] == task_files_version("alpha")
    again = subprocess.run([sys.executable, "-m", "ftpipe", "tasks", "sync"], capture_output=True, text=True, env=env, check=True)
    assert "(0 new, 0 changed)" in again.stdout and "no task folder" not in again.stdout
    config = ftpipe_env / "tasks" / "alpha" / "task.yaml"
    valid = config.read_text()
    config.write_text(valid + "training: {epoch: 2}\nsplit: {seed: x}\n")  # mid-edit: refused, not run, not gone
    edited = subprocess.run([sys.executable, "-m", "ftpipe", "tasks", "sync"], capture_output=True, text=True, env=env)
    assert edited.returncode == 1 and "(0 new, 0 changed)" in edited.stdout and "no task folder" not in edited.stdout
    assert edited.stderr.strip().splitlines()[-2:] == [
        f"refused: {config}: training.epoch: unknown key; did you mean epochs?",
        f"refused: {config}: split.seed: Input should be a valid integer, unable to parse string as an integer "
        "(got 'x')",
    ], "each problem on a line of its own"
    config.write_text(valid)
    shutil.rmtree(ftpipe_env / "tasks" / "alpha")
    gone = subprocess.run([sys.executable, "-m", "ftpipe", "tasks", "sync"], capture_output=True, text=True, env=env, check=True)
    assert "no task folder any more for: alpha (their partitions and history are kept)" in gone.stdout
