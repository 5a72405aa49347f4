"""Corrections close the loop: answers the server logged for a trained task are corrected in a file dropped in the
task's `feedback/` folder; the production report turns them into raw rows, the data assets clean and split them,
and with `retrain.on_data_change` the retraining sensor asks for a new training."""

import json
import time
from pathlib import Path

import dagster as dg
import pytest

from ftpipe.assets import data, training
from ftpipe.automation import retrain_on_data_change_sensor
from ftpipe.core.dedup import build_deduplicated
from ftpipe.core.evaluation.metrics import task_metrics
from ftpipe.core.feedback import (ADDED, CONFIRMED, FEEDBACK_FILE, REPLACED, UNCHANGED, FeedbackError, add_feedback,
                                  apply_dropped_feedback, corrections, feedback_dir)
from ftpipe.core.layout import TaskLayout
from ftpipe.core.monitoring import production_report
from ftpipe.core.records import read_examples, write_examples
from ftpipe.core.server.request_log import RequestLog
from ftpipe.definitions import defs
from ftpipe.partitions import task_partitions
from ftpipe.resources import default_resources
from ftpipe.core.storage import task_dir
from ftpipe.core.tasks import system_prompt_source, task_config, task_system_prompt
from ftpipe_tests.builders import materialization
from ftpipe_tests.tiny_model import COLORS, toy_rows

FRUITS = sorted(COLORS)[:6]


def served(task: str, output: str = "blue") -> list[str]:
    """Requests the server answered with `output` for `task` (wrongly, by default), logged as it logs them; their
    ids."""
    log = RequestLog()
    ids = []
    for number, fruit in enumerate(FRUITS):
        ids.append(f"chatcmpl-{number}")
        log.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "task": task, "model": task,
                    "version": 1, "request_id": ids[-1], "messages": [
                        {"role": "user", "content": f"Customer {number} asks: what color is the {fruit} I bought?"}],
                    "output": output, "latency_ms": 50.0, "prompt_tokens": 12, "completion_tokens": 1,
                    "total_tokens": 13, "status": 200, "error": None})
    log.close()
    return ids


def test_a_correction_keeps_the_system_prompt_the_model_answered_with(tiny_task: str) -> None:
    rows = toy_rows(20)  # each starts with the same system message, and task.yaml sets none
    train = TaskLayout(tiny_task).split_files[0]
    train.parent.mkdir(parents=True)
    write_examples(rows, train)
    system = rows[0]["messages"][0]["content"]
    assert task_system_prompt(tiny_task, task_config(tiny_task)) == system
    [first, *_] = served(tiny_task)
    row, outcome = add_feedback(tiny_task, first, "yellow")
    assert outcome == ADDED
    assert row["messages"][0] == {"role": "system", "content": system}, "the correction trains with the served prompt"
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    raw = task_dir(tiny_task) / "raw" / FEEDBACK_FILE
    assert add_feedback(tiny_task, first, "yellow") == (row, UNCHANGED) and len(raw.read_text().splitlines()) == 1
    second = served(tiny_task)[1]
    add_feedback(tiny_task, second, "green")
    assert add_feedback(tiny_task, first, "gold")[1] == REPLACED
    answers = [json.loads(line)["messages"][-1]["content"] for line in raw.read_text().splitlines()]
    assert answers == ["green", "gold"], "a later correction of a request replaces the earlier one"
    config = task_dir(tiny_task) / "task.yaml"
    valid = config.read_text()
    config.write_text(valid + "training: {max_step: 3}\n")  # a typo mid-edit does not lose a correction
    assert add_feedback(tiny_task, first, "red")[0]["messages"][0]["content"] == system
    config.write_text(valid)

    config.write_text(config.read_text() + "data: {system_prompt: Name the color.}\n")
    assert task_system_prompt(tiny_task, task_config(tiny_task)) == "Name the color.", "data.system_prompt wins"
    config.write_text(config.read_text().replace("data: {system_prompt: Name the color.}\n", ""))
    rows[3]["messages"][0]["content"] = "Answer in French."
    rows[4]["messages"] = rows[4]["messages"][1:]
    write_examples(rows, train)
    assert task_system_prompt(tiny_task, task_config(tiny_task)) == system, "the prompt most rows start with"
    assert system_prompt_source(tiny_task, task_config(tiny_task)) == (
        "the default system prompt is the one 18 of 20 train rows start with; 2 start without it or with another")
    for other in rows[5:13]:  # 9 rows in French, 10 with the first prompt, one without
        other["messages"][0]["content"] = "Answer in French."
    write_examples(rows, train)
    assert task_system_prompt(tiny_task, task_config(tiny_task)) is None, "no prompt of more than half the rows"
    assert add_feedback(tiny_task, first, "red")[0]["messages"][0]["role"] == "user"

    config.write_text(valid + "evaluation: {task_type: extraction}\n")
    before = raw.read_text()
    with pytest.raises(FeedbackError, match=r"^output: the answer is not a JSON object \(evaluation.task_type "
                                            r"extraction\)$"):
        add_feedback(tiny_task, first, "not json {")
    assert raw.read_text() == before, "a correction the task cannot use replaces nothing"
    assert add_feedback(tiny_task, first, '{"color": "red"}')[0]["messages"][-1]["content"] == '{"color": "red"}'
    with pytest.raises(FeedbackError, match=r"^messages: field 'messages' must be a list of \{role, content\} objects"):
        add_feedback(tiny_task, first, '{"color": "red"}', messages="oops")
    with pytest.raises(FeedbackError, match=r"^messages: field 'messages\[0\].content' is empty or only whitespace"):
        add_feedback(tiny_task, first, '{"color": "red"}', messages=[{"role": "user", "content": " "}])


def test_only_a_request_that_was_answered_can_be_corrected(tiny_task: str) -> None:
    log = RequestLog()
    for request_id, status, error in (("chatcmpl-refused", 400, "messages: 10034 prompt tokens + 256 exceed 8192"),
                                      ("chatcmpl-closed", 499, "the client closed the stream before the answer ended")):
        log.append({"time": "2026-12-01T10:00:00.000Z", "task": tiny_task, "model": tiny_task, "version": 1,
                    "request_id": request_id, "messages": [{"role": "user", "content": "What color is a kiwi?"}],
                    "output": "", "latency_ms": 5.0, "status": status, "error": error})
    log.close()
    with pytest.raises(FeedbackError, match=r"^request_id: 'chatcmpl-refused' was refused \(400: messages: 10034 "
                                            r"prompt tokens \+ 256 exceed 8192\), so no answer was served to correct$"):
        add_feedback(tiny_task, "chatcmpl-refused", "green")
    assert add_feedback(tiny_task, "chatcmpl-closed", "green")[1] == ADDED, "a closed stream was a valid request"
    (feedback_dir(tiny_task) / "notes.jsonl").write_text(json.dumps({"output": "green"}) + "\n")
    assert apply_dropped_feedback(tiny_task) == (0, [
        "notes.jsonl:1: request_id: missing: the id of the served answer it corrects (the response's `id`)"])


def cleaned_classification(task: str, folder: Path, rows: list[dict], evaluation: str) -> None:
    """Task `task` made a classification task (`evaluation`, YAML) with `rows` as its cleaned rows."""
    config = task_dir(task) / "task.yaml"
    config.write_text(config.read_text() + f"evaluation: {evaluation}\n")
    write_examples(rows, folder / "raw.parquet")
    build_deduplicated(folder / "raw.parquet", TaskLayout(task).asset("deduplicated_examples"),
                       labels=task_metrics(task_config(task).evaluation))


def test_a_correction_giving_the_served_answer_is_told_and_counted_apart_as_a_confirmation(
        tiny_task: str, tmp_path: Path) -> None:
    cleaned_classification(tiny_task, tmp_path, toy_rows(30), "{task_type: classification}")
    ids = served(tiny_task, output="Yellow ")
    assert add_feedback(tiny_task, ids[0], "yellow")[1] == CONFIRMED, "the served label, in another spelling"
    assert add_feedback(tiny_task, ids[1], "green")[1] == ADDED
    assert add_feedback(tiny_task, ids[0], "red")[1] == REPLACED, "a confirmation corrected later is a correction"
    assert add_feedback(tiny_task, ids[2], "yellow!")[1] == CONFIRMED, "punctuation makes no other label"
    assert len(corrections(tiny_task)) == 3, "a confirmation trains as any row does"
    train = TaskLayout(tiny_task).split_files[0]
    train.parent.mkdir(parents=True)
    write_examples(toy_rows(30), train)
    figures = production_report(tiny_task, train, task_config(tiny_task), tmp_path / "report")
    assert (figures["corrections"], figures["confirmations"]) == (2, 1), figures
    assert "| confirmations | 1 |" in figures["report_markdown"]


def test_a_json_answer_is_confirmed_by_its_value_and_a_changed_field_corrects_it(tiny_task: str) -> None:
    ids = served(tiny_task, output='{"color": "red", "urgent": true}')
    assert add_feedback(tiny_task, ids[0], '{"urgent": true,  "color": "red"}')[1] == CONFIRMED, "any key order"
    assert add_feedback(tiny_task, ids[1], '{"color": "Red", "urgent": true}')[1] == ADDED, "a value spelt otherwise"


def test_a_label_no_row_has_yet_is_refused_as_a_likely_typo_unless_the_correction_says_it_is_new(
        tiny_task: str, tmp_path: Path) -> None:
    cleaned_classification(tiny_task, tmp_path, toy_rows(30), "{task_type: classification}")
    ids = served(tiny_task)
    with pytest.raises(FeedbackError, match=r"^output: label 'yelow' is new to task 'toy' \(did you mean 'yellow'\?\); "
                                            r"its rows have 6 labels; send \"new_label\": true to add it as a new one$"):
        add_feedback(tiny_task, ids[0], "yelow")
    raw = task_dir(tiny_task) / "raw" / FEEDBACK_FILE
    assert not raw.exists(), "nothing written"
    assert add_feedback(tiny_task, ids[0], "Yellow")[1] == ADDED, "a known label, written another way"
    with pytest.raises(FeedbackError, match=r"\(did you mean 'yellow'\?\)"):  # as the rows write it, not "Yellow"
        add_feedback(tiny_task, ids[1], "yelow")
    assert add_feedback(tiny_task, ids[1], "gold", new_label=True)[1] == ADDED
    assert add_feedback(tiny_task, ids[2], "gold")[1] == ADDED, "a label a correction brought is known from then on"
    assert add_feedback(tiny_task, ids[2], "gold \n")[1] == UNCHANGED, "surrounding whitespace makes no new answer"
    (feedback_dir(tiny_task) / "silver.jsonl").write_text(
        json.dumps({"request_id": ids[3], "output": "silver"}) + "\n"
        + json.dumps({"request_id": ids[4], "output": "silver", "new_label": True}) + "\n")
    changed, refused = apply_dropped_feedback(tiny_task)
    assert changed == 1 and refused == ["silver.jsonl:1: output: label 'silver' is new to task 'toy'; its rows have 7 "
                                        "labels; send \"new_label\": true to add it as a new one"]
    assert [json.loads(line)["messages"][-1]["content"] for line in raw.read_text().splitlines()] == [
        "Yellow", "gold", "gold", "silver"]


def cleaned_rows(task: str, folder: Path, conversations: list[tuple[str, dict]]) -> None:
    """The cleaned rows of task `task`: a message and its JSON answer each."""
    write_examples([{"messages": [{"role": "user", "content": message},
                                  {"role": "assistant", "content": json.dumps(answer)}],
                     "id": str(number), "source": f"orders.jsonl:{number + 1}"}
                    for number, (message, answer) in enumerate(conversations)], folder / "raw.parquet")
    rows_out = build_deduplicated(folder / "raw.parquet", TaskLayout(task).asset("deduplicated_examples"))["rows_out"]
    assert rows_out == len(conversations)


def cleaned_orders(task: str, folder: Path, counted: bool) -> None:
    """24 cleaned rows of task `task` whose answers give an item, and a count when `counted`."""
    orders = [(fruit, count) for fruit in sorted(COLORS) for count in range(2, 6)][:24]
    cleaned_rows(task, folder, [(f"Order {number * 7919} asks for {count} boxes of {fruit}",
                                 {"item": fruit, **({"count": count} if counted else {})})
                                for number, (fruit, count) in enumerate(orders)])


def test_an_extraction_correction_with_a_category_no_row_gives_is_refused_as_a_likely_typo(tiny_task: str,
                                                                                           tmp_path: Path) -> None:
    config = task_dir(tiny_task) / "task.yaml"
    config.write_text(config.read_text() + "evaluation: {task_type: extraction}\n")
    issues = ["late", "broken", "double_charge", "refund"] * 10
    cleaned_rows(tiny_task, tmp_path, [(f"Order A{number * 7919} is {issue.replace('_', ' ')}, day {number}",
                                        {"order": f"A{number * 7919}", "issue": issue})
                                       for number, issue in enumerate(issues)])
    ids = served(tiny_task)
    with pytest.raises(FeedbackError, match=r"^output: issue 'dubble_charge' is new to task 'toy' \(did you mean "
                                            r"'double_charge'\?\); its rows give 4 values of issue; send "
                                            r"\"new_label\": true to add it as a new one$"):
        add_feedback(tiny_task, ids[0], '{"order": "A9", "issue": "dubble_charge"}')
    assert add_feedback(tiny_task, ids[0], '{"order": "A9", "issue": "double_charge"}')[1] == ADDED, (
        "an order id no row gives is no category")
    assert add_feedback(tiny_task, ids[0], '{"issue":"double_charge","order":"A9"}')[1] == UNCHANGED, (
        "the same answer in another key order")
    assert add_feedback(tiny_task, ids[1], '{"order": "A8", "issue": "lost"}', new_label=True)[1] == ADDED
    assert add_feedback(tiny_task, ids[2], '{"order": "A7", "issue": "lost"}')[1] == ADDED, "known from a correction"
    assert add_feedback(tiny_task, ids[3], '{"order": "A6", "issue": null}')[1] == ADDED
    with pytest.raises(FeedbackError, match=r"^output: issue 'stolen' is new to task 'toy'; its rows give 4 values"):
        add_feedback(tiny_task, ids[4], '{"order": "A5", "issue": "stolen"}')  # after a correction that gave none


def test_an_extraction_correction_in_another_form_than_the_tasks_answers_is_refused(tiny_task: str,
                                                                                     tmp_path: Path) -> None:
    config = task_dir(tiny_task) / "task.yaml"
    config.write_text(config.read_text() + "evaluation: {task_type: extraction}\n")
    cleaned_orders(tiny_task, tmp_path, counted=True)
    ids = served(tiny_task)
    with pytest.raises(FeedbackError, match=r"^output: the answer lacks the field 'count', which 24 of 24 answers give "
                                            r"\(evaluation.task_type extraction\)$"):
        add_feedback(tiny_task, ids[0], '{"item": "kiwi"}')
    with pytest.raises(FeedbackError, match=r'^output: the answer gives \'count\' as a string \("two"\), where 24 '
                                            r"of 24 answers give a number \(evaluation.task_type extraction\)$"):
        add_feedback(tiny_task, ids[1], '{"item": "kiwi", "count": "two"}')
    with pytest.raises(FeedbackError, match=r"^output: the answer has text around its JSON object \('```json' before "
                                            r"it and '```' after it\), where 24 of 24 answers are the object alone"):
        add_feedback(tiny_task, ids[1], '```json\n{"item": "kiwi", "count": 2}\n```')
    assert not (task_dir(tiny_task) / "raw" / FEEDBACK_FILE).exists(), "nothing written"
    assert add_feedback(tiny_task, ids[2], '{"item": "kiwi", "count": 2, "note": "gift"}')[1] == ADDED, (
        "a field more is the task's form still")
    cleaned_orders(tiny_task, tmp_path, counted=False)
    assert add_feedback(tiny_task, ids[0], '{"item": "kiwi"}')[1] == ADDED, "checked against the rows cleaned last"


def test_a_classification_correction_with_a_misspelt_field_is_refused_not_only_one_with_a_new_label(
        tiny_task: str, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Ticket {number * 7919}: what color is the {fruit}?"},
                          {"role": "assistant", "content": json.dumps({"color": color, "urgent": number % 2 == 0})}],
             "id": str(number), "source": f"t.jsonl:{number + 1}"}
            for number, (fruit, color) in enumerate(list(COLORS.items()) * 4)]
    cleaned_classification(tiny_task, tmp_path, rows, "{task_type: classification, label_field: color}")
    ids = served(tiny_task)
    with pytest.raises(FeedbackError, match=r"^output: the answer lacks the field 'urgent', which 24 of 24 answers "
                                            r"give \(it gives 'urgnet': misspelt\?\) \(evaluation.task_type "
                                            r"classification\)$"):
        add_feedback(tiny_task, ids[0], '{"color": "red", "urgnet": true}')
    assert add_feedback(tiny_task, ids[0], '{"color": "red", "urgent": true}')[1] == ADDED


@pytest.mark.slow
def test_dropped_corrections_become_training_rows_and_trigger_retraining(ftpipe_env: Path, tiny_task: str) -> None:
    folder = ftpipe_env / "tasks" / tiny_task
    (folder / "task.yaml").write_text((folder / "task.yaml").read_text() + "retrain: {on_data_change: true}\n")
    assets = [data.raw_examples, data.deduplicated_examples, data.heldout_split, training.base_model,
              training.lora_adapter]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [tiny_task])
        dg.materialize(assets, instance=instance, partition_key=tiny_task, resources=default_resources())
        assert isinstance(retrain_on_data_change_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)

        ids = served(tiny_task)
        feedback_dir(tiny_task).mkdir()
        lines = [{"request_id": i, "output": COLORS[fruit]} for i, fruit in zip(ids, FRUITS)]
        lines += [lines[0], {"request_id": "chatcmpl-never-served", "output": "red"}, [ids[0], "red"]]
        (feedback_dir(tiny_task) / "monday.jsonl").write_text(  # saved by an editor that writes a byte order mark
            "\ufeff" + "".join(json.dumps(line) + "\n" for line in lines)
            + '{"request_id": "chatcmpl-0", "output": red}\n', encoding="utf-8")
        (feedback_dir(tiny_task) / "tuesday.json").write_text(json.dumps(lines[1]))
        report = defs.resolve_job_def("monitoring_job").execute_in_process(instance=instance, partition_key=tiny_task)
        figures = materialization(report, "production_report")
        assert figures["feedback_rows"] == 6, "the repeated correction adds nothing and is not counted"
        assert figures["feedback_refused"] == 4 and figures["requests"] == 6 and figures["corrections"] == 6
        written = figures["report"]
        assert "## Corrections refused (4)" in written and "| monday.jsonl:10: not valid JSON" in written, written
        assert "Fix these lines and drop them again.\n" in written and "applied" not in written, "true of any file"
        refused = [r.user_message for r in instance.all_logs(report.run_id) if "correction refused" in r.user_message]
        assert any("monday.jsonl:10: not valid JSON" in line for line in refused), refused
        assert any("monday.jsonl:9: not a JSON object" in line for line in refused), refused
        assert any("tuesday.json: not a .jsonl file" in line for line in refused), refused
        assert figures["validity"] == 1.0  # a non-empty answer is a valid generation
        assert (feedback_dir(tiny_task) / "applied" / "monday.jsonl").is_file()
        assert not list(feedback_dir(tiny_task).glob("*.jsonl"))
        (feedback_dir(tiny_task) / "monday.jsonl").write_text(json.dumps(lines[1]) + "\n")  # the same name again
        report = defs.resolve_job_def("monitoring_job").execute_in_process(instance=instance, partition_key=tiny_task)
        assert materialization(report, "production_report")["feedback_rows"] == 0
        assert sorted(p.name for p in (feedback_dir(tiny_task) / "applied").iterdir()) == [
            "monday.2.jsonl", "monday.jsonl"], "an applied file is never overwritten"

        dg.materialize(assets[:3], instance=instance, partition_key=tiny_task)
        train, evaluation = (read_examples(path) for path in TaskLayout(tiny_task).split_files)
        corrected = {row["messages"][-1]["content"] for row in train + evaluation
                     if row["source"].startswith(FEEDBACK_FILE)}
        assert corrected == {COLORS[fruit] for fruit in FRUITS}
        [request] = retrain_on_data_change_sensor(dg.build_sensor_context(instance=instance))
        assert request.partition_key == tiny_task and request.tags["ftpipe/retrain"] == "data_change"
