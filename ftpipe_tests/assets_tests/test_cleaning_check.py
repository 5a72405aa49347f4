"""Cleaning on data shaped like users' data (a CSV of short messages, a long system prompt in task.yaml, a dozen
labels) and its non-blocking check, materialized against a real instance."""

import csv
import io
import random
from pathlib import Path

import dagster as dg

from ftpipe.assets import data
from ftpipe.checks import deduplicated_examples_removal_share, removal_warning
from ftpipe.partitions import task_partitions
from ftpipe_tests.builders import make_task, materialization
from ftpipe_tests.intents import SYSTEM_PROMPT, intent_task

TASK_YAML = f"""
data:
  system_prompt: {SYSTEM_PROMPT!r}
  columns: {{prompt: text, completion: category}}
evaluation: {{task_type: classification}}
"""
TOLERANT = "dedup: {max_removed_share: 0.4}\n"


def intents_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "category"])
    writer.writerows([r["messages"][1]["content"], r["messages"][2]["content"]] for r in rows)
    return out.getvalue()


def clean(ftpipe_env: Path, rows: list[dict], extra_yaml: str = ""):
    make_task(ftpipe_env, "banking", {"intents.csv": intents_csv(rows)}, TASK_YAML + extra_yaml)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, ["banking"])
        result = dg.materialize([data.raw_examples, data.deduplicated_examples, deduplicated_examples_removal_share],
                                instance=instance, partition_key="banking")
    assert result.success
    [check] = result.get_asset_check_evaluations()
    return materialization(result, "deduplicated_examples"), check


def test_cleaning_keeps_distinct_short_messages_and_reports_removals_by_label(ftpipe_env: Path) -> None:
    task = intent_task()
    deduped, check = clean(ftpipe_env, task.rows, TOLERANT)
    assert deduped["near_duplicates"] == len(task.near_duplicates)
    assert deduped["contradictions"] == 2 * len(task.contradictions)
    assert deduped["shared_text_shingles"] > 20  # the system prompt from task.yaml, left out of the comparison
    assert "| activate_my_card |" in deduped["removed_by_label"]
    assert check.passed and check.severity == dg.AssetCheckSeverity.WARN and check.metadata["max_removed_share"].value == 0.4
    assert check.description == ("cleaning removed at most 40% of the rows, and of each label at most that or no more "
                                 "than chance")


def test_check_warns_when_one_label_loses_too_many_rows(ftpipe_env: Path) -> None:
    task = intent_task()
    rng = random.Random(0)
    refunds = [r for r in task.rows if r["messages"][2]["content"] == "request_refund"]
    copies = [{**r, "messages": [r["messages"][0], {"role": "user", "content": r["messages"][1]["content"] + "!!"},
                                 r["messages"][2]]} for r in rng.sample(refunds, len(refunds) // 2)]
    deduped, check = clean(ftpipe_env, task.rows + copies)
    assert not check.passed
    assert "label 'request_refund'" in check.description and "read the matched examples" in check.description
    removed = Path(check.description.rsplit("(every removed row: ", 1)[1].removesuffix(")"))
    assert len(removed.read_text().splitlines()) >= len(copies), "the path holds the removed rows"
    assert "!!" in check.metadata["matched_examples"].value


def test_a_long_tail_of_small_labels_with_a_duplicate_each_is_no_warning(ftpipe_env: Path) -> None:
    task = intent_task()
    system = task.rows[0]["messages"][0]
    tail = [[system, {"role": "user", "content": f"{text} {n}"}, {"role": "assistant", "content": f"rare_{n}"}]
            for n in range(8) for text in ("how do I change the nickname on savings pot number", "nickname pot")]
    copies = [[system, {"role": "user", "content": m[1]["content"] + "!!"}, m[2]] for m in tail[::2]]
    deduped, check = clean(ftpipe_env, task.rows + [{"messages": m} for m in tail + copies])
    assert "| rare_0 | 3 | 1 |" in deduped["removed_by_label"], "a third of each small label removed"
    assert check.passed, check.description


def test_the_warning_names_a_few_labels_in_one_line_and_counts_the_rest() -> None:
    heavy = {None: "all rows: 44% removed (185 of 425)",
             **{f"l{i}": f"label 'l{i}': 50% removed (4 of 8)" for i in range(27)}}
    removed = Path("tasks/t/deduplicated_examples/removed.jsonl")
    assert removal_warning(heavy, 0.2, removed) == (
        "all rows: 44% removed (185 of 425); label 'l0': 50% removed (4 of 8); label 'l1': 50% removed (4 of 8); "
        "label 'l2': 50% removed (4 of 8) and 24 more labels (the check's over_the_limit names them) (more than 20%, "
        "and of a label more than chance would take at the share of all rows): read the matched examples before "
        f"training (every removed row: {removed})")
    assert removal_warning({"x": "label 'x': 30% removed (3 of 10)"}, 0.25, removed) == (
        "label 'x': 30% removed (3 of 10) (more than 25%, and of a label more than chance would take at the share of "
        f"all rows): read the matched examples before training (every removed row: {removed})")
    assert removal_warning({None: "all rows: 44% removed (185 of 425)"}, 0.2, removed) == (
        f"all rows: 44% removed (185 of 425) (more than 20%): read the matched examples before training (every removed "
        f"row: {removed})")
    four = {label: f"label {label!r}: 50% removed (4 of 8)" for label in "abcd"}
    assert "label 'd'" in removal_warning(four, 0.2, removed) and "more labels" not in removal_warning(
        four, 0.2, removed), "one more label is named, not counted"
