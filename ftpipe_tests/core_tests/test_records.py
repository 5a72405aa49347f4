import csv
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftpipe.core import records, review_sample as review
from ftpipe.core.layout import REVIEW_CSV
from ftpipe.core.preferences import write_preferences
from ftpipe.core.records import FEEDBACK_FILE, FormatSpec, RawDataError, build_raw_examples, read_raw_dir
from ftpipe_tests.builders import chat, make_task


def read(folder: Path, spec: FormatSpec = FormatSpec()) -> records.ReadResult:
    return records.read_raw_dir(folder / "raw", spec)


def test_every_input_format_becomes_the_canonical_schema(ftpipe_env: Path) -> None:
    folder = make_task(ftpipe_env, "t", {
        "a.jsonl": [chat("hi", "hello", system="be nice")],
        "b.json": json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"},
                              {"instruction": "Who wrote it?", "context": "Hamlet is a play by Shakespeare.",
                               "response": "Shakespeare.", "category": "closed_qa"},  # Dolly's names
                              {"instruction": "Name a fruit.", "context": "", "response": "A pear."}]),
        "c.csv": 'prompt,completion\n"multi\nline, with comma","ok ""quoted"""\n',
    })
    pq.write_table(pa.table({"question": ["why?"], "reply": ["because"], "agent": ["x"]}), folder / "raw" / "d.parquet")
    spec = FormatSpec(columns={"prompt": "question", "completion": "reply"})
    result = read(folder, spec)
    assert result.quarantine == []
    by_source = {row["source"]: row["messages"] for row in result.examples}
    assert by_source["a.jsonl:line 1"][0] == {"role": "system", "content": "be nice"}
    assert by_source["b.json:row 1"][0] == {"role": "user", "content": "Add\n\n1 and 2"}
    assert by_source["b.json:row 2"] == [
        {"role": "user", "content": "Who wrote it?\n\nHamlet is a play by Shakespeare."},
        {"role": "assistant", "content": "Shakespeare."}]
    assert by_source["b.json:row 3"][0] == {"role": "user", "content": "Name a fruit."}
    assert by_source["c.csv:line 2"] == [
        {"role": "user", "content": "multi\nline, with comma"}, {"role": "assistant", "content": 'ok "quoted"'}]
    assert by_source["d.parquet:row 1"][-1] == {"role": "assistant", "content": "because"}
    assert all(len(row["id"]) == 16 for row in result.examples)


def test_openai_content_parts_and_the_developer_role_read_as_the_server_reads_them(ftpipe_env: Path) -> None:
    def parts(*texts: str) -> list[dict]:
        return [{"type": "text", "text": text} for text in texts]

    logged = {"messages": [{"role": "developer", "content": parts("Be brief.")},
                           {"role": "user", "content": parts("My card is lost.", "Please help.")},
                           {"role": "assistant", "content": "Blocked it."}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                      *parts("What is this?")]},
                          {"role": "assistant", "content": "A cat."}]}
    result = read(make_task(ftpipe_env, "t", {"logged.jsonl": [logged, image]}))
    assert [row["messages"] for row in result.examples] == [[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "My card is lost.\nPlease help."},
        {"role": "assistant", "content": "Blocked it."}]]
    assert [entry["reason"] for entry in result.quarantine] == [
        "field 'messages[0].content' holds a part of type image_url: only text parts are read (the models read text)"]


def test_a_conversation_written_as_json_text_in_a_csv_cell_or_a_string_column_is_read(ftpipe_env: Path) -> None:
    turns = [{"role": "user", "content": "Mein Router blinkt rot."}, {"role": "assistant", "content": "Neu starten."},
             {"role": "user", "content": "Hat geklappt, danke!"}, {"role": "assistant", "content": "Gern!"}]
    cell = json.dumps(turns, ensure_ascii=False).replace('"', '""')
    folder = make_task(ftpipe_env, "t", {"export.csv": f'messages,agent\n"{cell}",anna\n"[{{""role"": ""user""",bob\n'})
    pq.write_table(pa.table({"messages": [json.dumps(turns)]}), folder / "raw" / "export.parquet")
    result = read(folder)
    assert [row["messages"] for row in result.examples] == [turns, turns]
    [broken] = result.quarantine
    assert broken["source"] == "export.csv:line 3" and broken["reason"].startswith(
        "field 'messages' is text starting with '[' but not a JSON list: ")


def test_sharegpt_conversations_are_read_as_chats_and_a_turn_of_another_speaker_is_named(ftpipe_env: Path) -> None:
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Where is my parcel?"},
             {"from": "gpt", "value": "In Leeds."}, {"from": "Human", "value": "And now?"},
             {"from": "gpt", "value": "Delivered."}]
    lines = [{"id": "identity_0", "conversations": turns},
             {"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{}"}]},
             {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
             {"conversations": [{"from": "human", "value": "Hi"}]}]
    folder = make_task(ftpipe_env, "t", {"sharegpt.jsonl": "".join(json.dumps(line) + "\n" for line in lines)})
    pq.write_table(pa.table({"conversations": [json.dumps(turns)]}), folder / "raw" / "export.parquet")
    result = read(folder)
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my parcel?"},
                {"role": "assistant", "content": "In Leeds."}, {"role": "user", "content": "And now?"},
                {"role": "assistant", "content": "Delivered."}]
    assert [row["messages"] for row in result.examples] == [expected, expected]
    assert [(q["source"], q["reason"]) for q in result.quarantine] == [
        ("sharegpt.jsonl:line 2", "conversations[1].from is 'function_call'; expected one of human, gpt, system"),
        ("sharegpt.jsonl:line 3", "field 'conversations[1].value' is empty or only whitespace"),
        ("sharegpt.jsonl:line 4", "the conversation does not end with an assistant message")]


def test_ids_are_stable_content_hashes() -> None:
    messages = chat("a", "b")["messages"]
    assert records.example_id(messages) == records.example_id([dict(m) for m in messages])
    assert records.example_id(messages) != records.example_id(chat("a", "c")["messages"])


def test_bom_crlf_and_blank_lines(ftpipe_env: Path) -> None:
    text = "\ufeff" + json.dumps(chat("x", "y")) + "\r\n\r\n" + json.dumps(chat("p", "q")) + "\r\n"
    result = read(make_task(ftpipe_env, "t", {"a.jsonl": text.encode("utf-8")}))
    assert [r["source"] for r in result.examples] == ["a.jsonl:line 1", "a.jsonl:line 3"]
    assert result.examples[0]["messages"][0]["content"] == "x"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "does not end with an assistant"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "expected one of system, user, assistant"),
        (json.dumps({"prompt": "x", "completion": ""}), "field 'completion' is empty"),
        (json.dumps({"prompt": "x", "completion": 3}), "field 'completion' is the number 3, not text"),
        (json.dumps({"instruction": "x", "output": ["a"]}), "field 'output' must be text"),
        (json.dumps({"text": "x"}), "unrecognised row format"),
        (json.dumps({"Text": "my card is lost", "label": "lost_card"}),
         "the row has keys: Text, label; data.columns: {prompt: Text, completion: label} reads it"),
        (json.dumps({"question": "q", "answer": "a", "text": "t"}), "{prompt: question, completion: answer} reads it"),
        (json.dumps({"prompt": "q", "Completion": "a"}), "{prompt: prompt, completion: Completion} reads it"),
        (json.dumps({"Prompt": "q", "Chosen": "a", "Rejected": "b"}),
         "data.columns: {prompt: Prompt, chosen: Chosen, rejected: Rejected} reads it"),
        (json.dumps({"messages": [{"role": "user", "content": "order 5?"}, {"role": "assistant", "content": None,
                      "tool_calls": [{"id": "c1", "type": "function"}]}, {"role": "tool", "content": "shipped"},
                     {"role": "assistant", "content": "It shipped."}]}),
         "messages[1] is a tool call (tool_calls): tool use is not trained on, only text turns of the user and the "
         "assistant; leave the tool turns out of the conversation to keep it"),
        (json.dumps({"messages": [{"role": "user", "content": "order 5?"}, {"role": "tool", "content": "shipped"},
                     {"role": "assistant", "content": "It shipped."}]}), "messages[1] is a tool's result (role tool)"),
        (json.dumps(["a", "b"]), "expected an object"),
        (json.dumps({"prompt": "a\u0000b", "completion": "c"}), "NUL"),
    ],
)
def test_bad_rows_are_quarantined_with_a_reason(ftpipe_env: Path, line: str, reason: str) -> None:
    good = json.dumps(chat("fine", "ok"))
    result = read(make_task(ftpipe_env, "t", {"a.jsonl": f"{good}\n{line}\n"}))
    assert len(result.examples) == 1
    assert [q["source"] for q in result.quarantine] == ["a.jsonl:line 2"]
    assert reason in result.quarantine[0]["reason"]
    assert result.rows_read == 2


def test_an_answer_the_task_type_cannot_read_is_quarantined(ftpipe_env: Path) -> None:
    from ftpipe.config import EvaluationConfig
    from ftpipe.core.evaluation.metrics import answer_problem, answer_rule

    extraction = EvaluationConfig(task_type="extraction")
    spec = FormatSpec(answer_rule=answer_rule(extraction), answer_problem=answer_problem(extraction))
    rows = [chat("Order A-1 arrived broken.", '{"order_id": "A-1"}'), chat("Order A-2 is late.", "order A-2")]
    result = read(make_task(ftpipe_env, "t", {"a.jsonl": "".join(json.dumps(r) + "\n" for r in rows)}), spec)
    assert [r["messages"][-1]["content"] for r in result.examples] == ['{"order_id": "A-1"}']
    assert result.quarantine[0]["source"] == "a.jsonl:line 2"
    assert result.quarantine[0]["reason"] == "the answer is not a JSON object (evaluation.task_type extraction)"
    assert "function" not in repr(spec) and "extraction" in repr(spec), "the reuse key names the rule, not an address"
    assert "95% of 20+ answers" in spec.answer_rule, "and the rule of the answers' usual shape"


def test_invalid_utf8_row_is_quarantined_and_others_survive(ftpipe_env: Path) -> None:
    good = json.dumps(chat("fine", "ok")).encode()
    bad = b'{"prompt": "caf\xe9", "completion": "x"}'
    result = read(make_task(ftpipe_env, "t", {"a.jsonl": good + b"\n" + bad + b"\n"}))
    assert len(result.examples) == 1
    assert "not valid UTF-8" in result.quarantine[0]["reason"]


def test_csv_rows_with_missing_or_extra_fields(ftpipe_env: Path) -> None:
    text = "prompt,completion\na,b\nonly-one\nx,y,z\n"
    result = read(make_task(ftpipe_env, "t", {"a.csv": text}))
    assert len(result.examples) == 1
    reasons = [q["reason"] for q in result.quarantine]
    assert "fewer fields" in reasons[0] and "more field" in reasons[1]


def test_a_csv_row_that_lost_fields_to_a_quote_says_where_the_quote_is(ftpipe_env: Path) -> None:
    text = 'prompt,completion,note\nq1,a1,n1\nq2,"a2 opened,n2\nq3,a3,"n3\nq4,a4,n4\nq5,"a5,n5\n'
    result = read(make_task(ftpipe_env, "t", {"a.csv": text}))
    assert sorted(row["messages"][-1]["content"] for row in result.examples) == ["a1", "a4"]
    assert [(q["source"], q["reason"]) for q in result.quarantine] == [
        ("a.csv:line 3", "has fewer fields than the header (2 of 3): a quote opened on line 3 closes only on line 4, "
                         "so lines 3-4 were read as one row"),
        ("a.csv:line 6", "has fewer fields than the header (2 of 3): a quote on it is never closed")]


def test_unreadable_file_is_one_quarantine_entry_and_other_files_are_read(ftpipe_env: Path, tmp_path: Path) -> None:
    files = {"broken.json": "[{", "x.parquet": b"not parquet"}
    result = read(make_task(ftpipe_env, "t", {**files, "ok.jsonl": [chat("a", "b")]}))
    assert len(result.examples) == 1
    reasons = {q["source"]: q["reason"] for q in result.quarantine}
    assert "not valid JSON" in reasons["broken.json"] and "not readable as Parquet" in reasons["x.parquet"]
    with pytest.raises(RawDataError, match="no usable rows"):
        records.build_raw_examples(make_task(ftpipe_env, "u", files), tmp_path / "out", FormatSpec())


def test_link_out_of_the_task_folder_is_quarantined(ftpipe_env: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jsonl"
    outside.write_text(json.dumps(chat("a", "b")) + "\n")
    folder = make_task(ftpipe_env, "t", {"a.jsonl": [chat("x", "y")]})
    (folder / "raw" / "link.jsonl").symlink_to(outside)
    result = read(folder)
    assert len(result.examples) == 1
    assert "outside the task folder" in result.quarantine[0]["reason"]


def test_listing_order_does_not_matter_and_other_files_are_ignored(ftpipe_env: Path) -> None:
    folder = make_task(ftpipe_env, "t", {"b.jsonl": [chat("b", "1")], "a.jsonl": [chat("a", "1")], "notes.txt": "hi"})
    result = read(folder)
    assert result.files == ["a.jsonl", "b.jsonl"]
    assert result.ignored_files == ["notes.txt"]


def test_a_file_with_no_usable_row_is_named(ftpipe_env: Path, tmp_path: Path) -> None:
    files = {"a.jsonl": [chat("a", "1")], "b.jsonl": [{"prompt": "no answer"}] * 3, "c.csv": "prompt,completion\nx,y\n"}
    summary = records.build_raw_examples(make_task(ftpipe_env, "t", files), tmp_path / "out", FormatSpec())
    assert summary["unusable_files"] == ["b.jsonl"] and summary["rows_quarantined"] == 3


def test_a_raw_folder_of_unsupported_files_names_them_and_the_formats_read(ftpipe_env: Path, tmp_path: Path) -> None:
    folder = make_task(ftpipe_env, "t", {"data.tsv": "prompt\tcompletion\nx\ty\n"})
    with pytest.raises(RawDataError) as error:
        records.build_raw_examples(folder, tmp_path / "out", FormatSpec())
    assert str(error.value).endswith("no rows at all; files left out (not .jsonl, .json, .csv, .parquet): data.tsv")


def test_build_raw_examples_counts_add_up_and_zero_valid_rows_fail(ftpipe_env: Path, tmp_path: Path) -> None:
    folder = make_task(ftpipe_env, "t", {"a.jsonl": [chat("x", "y"), {"bad": 1}]})
    summary = records.build_raw_examples(folder, tmp_path / "out", FormatSpec())
    assert summary["rows_read"] == summary["rows_valid"] + summary["rows_quarantined"] == 2
    assert len(records.read_examples(tmp_path / "out" / "examples.parquet")) == 1
    assert (tmp_path / "out" / "quarantine.jsonl").read_text().count("\n") == 1
    empty = make_task(ftpipe_env, "e", {"a.jsonl": [{"bad": 1}]})
    with pytest.raises(RawDataError, match="no usable rows"):
        records.build_raw_examples(empty, tmp_path / "out2", FormatSpec())


def test_system_prompt_is_added_where_missing() -> None:
    spec = FormatSpec(system_prompt="You triage tickets.")
    assert records.to_messages(chat("a", "b"), spec)[0]["content"] == "You triage tickets."
    assert records.to_messages(chat("a", "b", system="own"), spec)[0]["content"] == "own"


def test_rows_of_which_only_some_start_with_a_system_message_are_said_so_naming_the_files_without(
        tmp_path: Path) -> None:
    system = "You are OrderBot. Reply with one JSON object with the order's id, product and city, nothing else."
    raw = tmp_path / "orders" / "raw"
    raw.mkdir(parents=True)
    (raw / "chat.jsonl").write_text("".join(json.dumps(chat(f"order A-{i}", f"A-{i}", system=system)) + "\n"
                                            for i in range(6)))
    (raw / "legacy.csv").write_text("prompt,completion\n" + "".join(f"order B-{i},B-{i}\n" for i in range(4)))
    summary = build_raw_examples(tmp_path / "orders", tmp_path / "out", FormatSpec())
    assert summary["system_prompt_mix"] == (
        "4 of 10 rows start without a system message (legacy.csv), 6 with 'You are OrderBot. Reply with one JSON "
        "o…': the model learns to answer with and without an instruction; data.system_prompt gives the rows "
        "without one that instruction")
    given = build_raw_examples(tmp_path / "orders", tmp_path / "out", FormatSpec(system_prompt=system))
    assert given["system_prompt_mix"] is None


def test_rows_whose_turns_do_not_alternate_are_kept_and_said_so_naming_the_first(tmp_path: Path) -> None:
    def turns(*pairs: tuple[str, str]) -> str:
        return json.dumps({"messages": [{"role": role, "content": text} for role, text in pairs]}) + "\n"

    raw = tmp_path / "chats" / "raw"
    raw.mkdir(parents=True)
    (raw / "a.jsonl").write_text(turns(("user", "hi"), ("assistant", "Hello!"), ("user", "order 5?"),
                                       ("assistant", "Checking."), ("assistant", "It shipped."))
                                 + turns(("user", "refund?"), ("system", "VIP customer."), ("assistant", "Sure."))
                                 + turns(("user", "hi"), ("assistant", "Hello!")))
    summary = build_raw_examples(tmp_path / "chats", tmp_path / "out", FormatSpec())
    assert summary["rows_valid"] == 3 and summary["odd_turn_orders"] == (
        "2 of 3 rows have turns that do not alternate (the first: a.jsonl:line 1, messages[3] and [4] both "
        "assistant): each is trained as written; merge a message written as two, and put a note for the model in the "
        "system prompt")
    noted = [{"role": "user", "content": "refund?"}, {"role": "system", "content": "VIP customer."}]
    assert records.prompt_text(noted) == "user: refund?\nsystem: VIP customer.", "a reviewer sees the note"
    (raw / "a.jsonl").write_text(turns(("user", "refund?"), ("system", "VIP customer."), ("assistant", "Sure.")))
    assert "the first: a.jsonl:line 1, a system message after the first turn at messages[1]" in build_raw_examples(
        tmp_path / "chats", tmp_path / "one", FormatSpec())["odd_turn_orders"]
    (raw / "a.jsonl").write_text(turns(("system", "Be brief."), ("user", "hi"), ("assistant", "Hello!")))
    assert build_raw_examples(tmp_path / "chats", tmp_path / "two", FormatSpec())["odd_turn_orders"] is None


def test_a_system_prompt_that_lists_some_of_the_label_names_is_said_to_lack_the_others(tmp_path: Path) -> None:
    raw = tmp_path / "task" / "raw"
    raw.mkdir(parents=True)
    (raw / "a.csv").write_text("text,intent\nWhere is my card?,card_arrival\nI lost my card,lost_or_stolen_card\n")
    names = ("activate_my_card", "card_arrival", "change_pin", "exchange_rate", "lost_or_stolen_card", "top_up")
    listing = "Reply with one intent: activate_my_card, card_arrival, change_pin, exchange_ra"  # cut off
    spec = FormatSpec(columns={"prompt": "text", "completion": "intent"}, label_names=names, system_prompt=listing)
    assert build_raw_examples(tmp_path / "task", tmp_path / "cut", spec)["unlisted_labels"] == (
        "the system prompt of 2 rows names 3 of the 6 labels of data.label_names, not exchange_rate, "
        "lost_or_stolen_card, top_up (it ends 'rival, change_pin, exchange_ra'): the model is told of some labels "
        "only; list them all in data.system_prompt")
    whole = replace(spec, system_prompt=f"Reply with one intent: {', '.join(names)}.")
    untold = replace(spec, system_prompt="Reply with the customer's intent; a card_arrival question is common.")
    assert [build_raw_examples(tmp_path / "task", tmp_path / name, given)["unlisted_labels"]
            for name, given in (("whole", whole), ("untold", untold))] == [None, None], "all of them, or no list"


def test_review_sample_is_seeded_and_bounded() -> None:
    rows = [{"id": f"{i:04d}", "source": "s", **chat(f"q{i}", f"a{i}")} for i in range(250)]
    first, pairs, shared = review.review_sample(rows)
    assert len(first) == 100 and pairs == [] and shared is None
    assert first == review.review_sample(list(reversed(rows)))[0]
    assert first != review.review_sample(rows, seed=1)[0]
    assert len(review.review_sample(rows[:7])[0]) == 7


def test_the_review_sample_writes_the_shared_system_prompt_once(tmp_path: Path) -> None:
    long_prompt = "You route support tickets. " * 40
    rows = [{"id": f"{i:04d}", "source": f"a.jsonl:line {i}",
             **chat(f"q{i}", f"a{i}", system=long_prompt if i % 10 else "Be brief.")} for i in range(50)]
    records.write_examples(rows, tmp_path / "examples.parquet")
    sample, _ = review.build_review_sample(tmp_path / "examples.parquet", tmp_path / "none.parquet", tmp_path / "out")
    assert (tmp_path / "out" / review.SYSTEM_PROMPT_FILE).read_text() == long_prompt
    assert [row["system"] for row in sample].count(review.SHARED) == 45
    assert {row["system"] for row in sample} == {review.SHARED, "Be brief."}, "a row's own prompt is shown"
    assert long_prompt not in (tmp_path / "out" / REVIEW_CSV).read_text()
    assert not (tmp_path / "out" / review.PREFERENCES_CSV).exists(), "no preference rows, no file for them"


def test_the_review_sample_shows_preference_rows_beside_the_chat_rows(tmp_path: Path) -> None:
    """A preference-only task gets a sample too, its long system prompt written once; paired and unpaired rows share
    one file, each with its own answer columns filled."""
    long_prompt = "You answer billing questions politely and in full sentences. " * 30
    pairs = [{"id": f"{i:04d}", "prompt": [{"role": "system", "content": long_prompt},
                                           {"role": "user", "content": f"refund {i}?"}],
              "chosen": f"Yes, refund {i} is on its way." if i % 2 else None, "rejected": "No." if i % 2 else None,
              "completion": None if i % 2 else f"Refund {i} done.", "label": None if i % 2 else i % 4 == 0,
              "source": f"p.jsonl:line {i + 1}"} for i in range(150)]
    write_preferences(pairs, tmp_path / "preferences.parquet")
    records.write_examples([], tmp_path / "examples.parquet")
    chats, sample = review.build_review_sample(tmp_path / "examples.parquet", tmp_path / "preferences.parquet",
                                               tmp_path / "out")
    assert chats == [] and len(sample) == 100
    assert (tmp_path / "out" / review.SYSTEM_PROMPT_FILE).read_text() == long_prompt
    written = list(csv.DictReader((tmp_path / "out" / review.PREFERENCES_CSV).open(encoding="utf-8")))
    assert list(written[0]) == ["id", "system", "prompt", "chosen", "rejected", "completion", "label", "source"]
    assert long_prompt not in str(written)
    assert {row["system"] for row in written} == {review.SHARED} and written[0]["prompt"].startswith("refund ")
    paired = [row for row in written if row["chosen"]]
    assert 0 < len(paired) < 100 and all(row["completion"] == row["label"] == "" for row in paired)
    assert {row["label"] for row in written if not row["chosen"]} == {"True", "False"}
    only_pairs = [row for row in sample if row["chosen"]]
    assert review.answer_columns(only_pairs) == ["chosen", "rejected"]


def test_class_ids_read_as_the_names_data_label_names_gives_them(tmp_path: Path) -> None:
    folder = tmp_path / "task"
    (folder / "raw").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["I lost my card", "Is there an age limit?", "Where is my card?", "Hi"],
                             "label": [0, 1, 2, 7]}), folder / "raw" / "train.parquet")  # as Hugging Face exports it
    (folder / "raw" / "unlabelled.jsonl").write_text('{"text": "Hello", "label": -1}\n')  # its id for "no label"
    (folder / "raw" / "more.csv").write_text("text,label\nActivate my card please,0\nWhat is this?,-1\n")
    names = ("activate_my_card", "age_limit", "card_arrival")
    result = read_raw_dir(folder / "raw", FormatSpec(columns={"prompt": "text", "completion": "label"},
                                                     label_names=names))
    assert [row["messages"][-1]["content"] for row in result.examples] == [
        "activate_my_card", "activate_my_card", "age_limit", "card_arrival"]
    assert [(entry["source"], entry["reason"]) for entry in result.quarantine] == [
        ("more.csv:line 3", "field 'label' is class id -1, which Hugging Face datasets give a row without a label (a "
                            "test split's): it has no answer to learn"),
        ("train.parquet:row 4", "field 'label' is class id 7, and data.label_names names ids 0 to 2"),
        ("unlabelled.jsonl:line 1", "field 'label' is class id -1, which Hugging Face datasets give a row without a "
                                    "label (a test split's): it has no answer to learn")]
    unnamed = read_raw_dir(folder / "raw", FormatSpec(columns={"prompt": "text", "completion": "label"}))
    assert unnamed.quarantine[0]["reason"] == (
        "field 'label' is the number 0, not text: where it is a class id, data.label_names lists the class names in "
        "id order (a Hugging Face dataset has them in features['label'].names); where the numbers are the labels "
        "(star ratings), it lists them")
    assert [row["messages"][-1]["content"] for row in unnamed.examples] == ["0", "-1"], "a CSV cell is its text"


def test_labels_that_are_numbers_are_read_as_those_numbers_where_a_file_writes_them_else_as_class_ids(
        tmp_path: Path) -> None:
    raw = tmp_path / "task" / "raw"
    raw.mkdir(parents=True)
    (raw / "reviews.csv").write_text("text,stars\nAwful.,1\nGreat!,5\nFine.,3\nNo rating,-1\n")
    (raw / "shop.jsonl").write_text('{"text": "Meh", "stars": 2}\n{"text": "Loved it", "stars": 5}\n')
    (raw / "typo.csv").write_text("text,stars\nOK,4\nBroken,0\nSuperb,5\n")  # a 0: no rating 1-5, so ids
    stars = FormatSpec(columns={"prompt": "text", "completion": "stars"}, label_names=("1", "2", "3", "4", "5"))
    read = read_raw_dir(raw, stars)
    assert {row["source"]: row["messages"][-1]["content"] for row in read.examples} == {
        "reviews.csv:line 2": "1", "reviews.csv:line 3": "5", "reviews.csv:line 4": "3",
        "shop.jsonl:line 1": "2", "shop.jsonl:line 2": "5", "typo.csv:line 2": "5", "typo.csv:line 3": "1"}
    assert {entry["source"]: entry["reason"] for entry in read.quarantine} == {
        "reviews.csv:line 5": "field 'stars' is class id -1, which Hugging Face datasets give a row without a label "
                              "(a test split's): it has no answer to learn",
        "typo.csv:line 4": "field 'stars' is class id 5, and data.label_names names ids 0 to 4 (data.label_names are "
                           "numbers, but the file's answers write a number that is none of them, so its numbers are "
                           "read as class ids)"}
    polarity = tmp_path / "polarity"  # as Hugging Face's yelp_polarity: ids 0 and 1 of the classes '1' and '2'
    polarity.mkdir()
    pq.write_table(pa.table({"stars": [0, 1], "text": ["bad", "good"]}), polarity / "train.parquet")
    sentiment = tmp_path / "sentiment"
    sentiment.mkdir()
    (sentiment / "rows.jsonl").write_text('{"text": "No", "stars": -1}\n{"text": "Yes", "stars": 1}\n')
    assert [[row["messages"][-1]["content"] for row in read_raw_dir(folder, replace(stars, label_names=names)).examples]
            for folder, names in ((polarity, ("1", "2")), (sentiment, ("-1", "0", "1")))] == [["1", "2"], ["-1", "1"]]


def test_a_mapped_column_missing_from_the_file_is_named_with_the_columns_it_has(tmp_path: Path) -> None:
    folder = tmp_path / "task"
    (folder / "raw").mkdir(parents=True)
    (folder / "raw" / "intents.csv").write_text("text,category\nHow do I activate my card,activate_my_card\n")
    spec = FormatSpec(columns={"prompt": "utterance", "completion": "category"})
    result = read_raw_dir(folder / "raw", spec)
    (entry,) = result.quarantine
    assert "mapped column 'utterance' (data.columns.prompt) is not in the file" in entry["reason"]
    assert entry["reason"].endswith("the row has keys: category, text; data.files: {'intents.csv': {columns: "
                                    "{prompt: text, completion: category}}} reads this file (its columns differ from "
                                    "those data.columns maps)")
    other = read_raw_dir(folder / "raw", FormatSpec(columns={"prompt": "customer_message", "completion": "intent"}))
    assert ("'intent' (data.columns.completion) and 'customer_message' (data.columns.prompt) are not in the file"
            in other.quarantine[0]["reason"]), "no guess from a column as unlike it as 'text'"
    assert other.quarantine[0]["reason"].endswith("data.files: {'intents.csv': {columns: {prompt: text, completion: "
                                                  "category}}} reads this file (its columns differ from those "
                                                  "data.columns maps)")
    explicit = read_raw_dir(folder / "raw", FormatSpec("columns", {"prompt": "utterance", "completion": "label"}))
    assert "'label' (data.columns.completion) and 'utterance' (data.columns.prompt)" in explicit.quarantine[0]["reason"]
    cased = read_raw_dir(folder / "raw", FormatSpec("columns", {"prompt": "Text", "completion": "categroy"}))
    assert ("'categroy' (data.columns.completion; did you mean 'category'?) and 'Text' (data.columns.prompt; did you "
            "mean 'text'?)") in cased.quarantine[0]["reason"]
    with pytest.raises(RawDataError) as failure:
        build_raw_examples(folder, tmp_path / "out", spec)
    message = str(failure.value)
    assert "\n" not in message and "[(" not in message and "(1 row)" in message


def test_files_with_their_own_columns_are_read_by_the_first_pattern_they_match(tmp_path: Path) -> None:
    raw = tmp_path / "task" / "raw"
    (raw / "legacy").mkdir(parents=True)
    (raw / "tickets.csv").write_text("customer_message,intent\nWhere is my parcel,order_status\n")
    (raw / "legacy" / "2023.csv").write_text("text,label\nI want my money back,refund\n")
    (raw / "legacy" / "2024.csv").write_text("body,tag\nCancel my order please,cancel\n")
    files = (("legacy/*.csv", "columns", {"prompt": "text", "completion": "label"}),
             ("legacy/2024.csv", None, {"prompt": "body", "completion": "tag"}),  # its own path applies first
             ("legacy/20*.csv", None, {}), ("archive/*.csv", None, {}))
    spec = FormatSpec(columns={"prompt": "customer_message", "completion": "intent"}, files=files)
    result = read_raw_dir(raw, spec)
    assert not result.quarantine and result.unused_entries == [
        "data.files 'legacy/20*.csv' applies to no file: legacy/2023.csv is read by 'legacy/*.csv', listed before it "
        "(the first pattern a file matches applies, after its own path)",
        "data.files names 'archive/*.csv', which no raw file matches (the files read: legacy/2023.csv, "
        "legacy/2024.csv, tickets.csv)"]
    assert sorted((r["messages"][0]["content"], r["messages"][1]["content"]) for r in result.examples) == [
        ("Cancel my order please", "cancel"), ("I want my money back", "refund"),
        ("Where is my parcel", "order_status")]
    (raw / "legacy" / "2025.csv").write_text("txt,label\nCharge me once,billing\n")
    (entry,) = read_raw_dir(raw, spec).quarantine
    assert entry["source"] == "legacy/2025.csv:line 2" and entry["reason"].startswith(
        "mapped column 'text' (data.files['legacy/*.csv'].columns.prompt; did you mean 'txt'?) is not in the file")
    assert repr(spec) != repr(FormatSpec(columns=spec.columns)), "the reuse key holds the files' own columns"
    (raw / "legacy" / "2025.csv").write_text("question,label\nCharge me once,billing\n")
    auto = FormatSpec(files=(("legacy/*.csv", None, {"prompt": "text", "completion": "label"}),))
    (entry,) = [row for row in read_raw_dir(raw, auto).quarantine if row["source"].startswith("legacy/2025.csv")]
    assert entry["reason"] == (
        "unrecognised row format: the mapped column 'text' (data.files['legacy/*.csv'].columns.prompt) is not in the "
        "file; the row has keys: label, question; data.files['legacy/*.csv'].columns: {prompt: question, completion: "
        "label} reads it"), "no list of every format where the file's mapping names the missing column"


def test_preference_rows_beside_mapped_chat_columns_are_read_by_their_keys(ftpipe_env: Path, tmp_path: Path) -> None:
    folder = make_task(ftpipe_env, "t", {
        "helpdesk.csv": "ticket_text,triage\nprinter broken,technical\n",
        "pairs.jsonl": [{"prompt": "refund me", "chosen": "billing", "rejected": "shipping"},
                        {"prompt": "refund me", "chosen": "billing", "rejected": ""}],
    })
    spec = FormatSpec(columns={"prompt": "ticket_text", "completion": "triage"}, system_prompt="Triage.")
    summary = build_raw_examples(folder, tmp_path / "out", spec)
    assert (summary["rows_read"], summary["rows_valid"], summary["rows_quarantined"]) == (3, 2, 1)
    assert summary["preference_rows"] == 1
    assert summary["quarantine_reasons"] == {"field 'rejected' is empty or only whitespace": 1}
    (example,) = records.read_examples(tmp_path / "out" / "examples.parquet")
    assert example["messages"][-1]["content"] == "technical"
    (preference,) = pq.read_table(tmp_path / "out" / "preferences.parquet").to_pylist()
    assert preference["prompt"] == [{"role": "system", "content": "Triage."}, {"role": "user", "content": "refund me"}]
    assert preference["source"] == "pairs.jsonl:line 1"


def test_corrections_and_teacher_rows_are_chat_rows_whatever_format_the_users_files_have(ftpipe_env: Path,
                                                                                          tmp_path: Path) -> None:
    correction = {**chat("printer broken again", "technical", "Triage."), "feedback_for": "chatcmpl-1"}
    folder = make_task(ftpipe_env, "t", {"helpdesk.csv": "ticket_text,triage\nrefund me,billing\n",
                                         FEEDBACK_FILE: [correction], "sub/feedback.jsonl": [correction]})
    (tmp_path / "teacher.jsonl").write_text(json.dumps(chat("where is my parcel", "shipping")) + "\n")
    spec = FormatSpec("columns", {"prompt": "ticket_text", "completion": "triage"}, system_prompt="Triage.")
    summary = build_raw_examples(folder, tmp_path / "out", spec, ((tmp_path / "teacher.jsonl", "teacher t"),))
    assert [q["source"] for q in summary["quarantine"]] == ["sub/feedback.jsonl:line 1"], "only ftpipe's own file"
    answers = {row["source"]: row["messages"] for row in records.read_examples(tmp_path / "out" / "examples.parquet")}
    assert answers[f"{FEEDBACK_FILE}:line 1"] == correction["messages"]
    assert answers["teacher t:line 1"][0] == {"role": "system", "content": "Triage."}
    assert [m[-1]["content"] for source, m in answers.items() if source.startswith("helpdesk.csv")] == ["billing"]


def test_one_fault_at_different_messages_is_one_quarantine_reason(ftpipe_env: Path, tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]
    folder = make_task(ftpipe_env, "t", {"chats.jsonl": [
        {"messages": [{"role": "bot", "content": "Hello."}, *turns]},
        {"messages": [*turns, *turns[:1], {"role": "bot", "content": "Hello again."}]},
        {"messages": turns}]})
    summary = build_raw_examples(folder, tmp_path / "out", FormatSpec())
    assert summary["quarantine_reasons"] == {
        "messages[n].role is 'bot'; expected one of system, user, assistant": 2}


def test_the_review_sample_shows_a_multi_turn_rows_earlier_turns_and_a_single_turn_rows_message_alone() -> None:
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My router is red."},
             {"role": "assistant", "content": "Restart it, please."}, {"role": "user", "content": "ok will do"},
             {"role": "assistant", "content": "Sounds good."}]
    rows = [{"id": "1", "source": "s", "messages": turns}, {"id": "2", "source": "s", **chat("q", "a", "Be brief.")}]
    sample, _, _ = review.review_sample(rows)
    assert [row["prompt"] for row in sample] == [
        "user: My router is red.\nassistant: Restart it, please.\nuser: ok will do", "q"]


def test_an_answer_of_another_form_than_the_others_is_quarantined_with_its_row_as_the_file_holds_it(
        tmp_path: Path) -> None:
    from ftpipe.config import EvaluationConfig
    from ftpipe.core.evaluation.metrics import shape_problems

    raw = tmp_path / "task" / "raw"
    raw.mkdir(parents=True)
    rows = [{"ticket_id": f"T-{i}", "body": f"Order A-{i} arrived broken, refund please.",
             "extracted": json.dumps({"order_id": f"A-{i}", "refund": i != 7 and i % 2 == 0})} for i in range(30)]
    rows[7]["extracted"] = '{"order_id": "A-7", "refund": "no"}'
    with (raw / "export.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = FormatSpec(columns={"prompt": "body", "completion": "extracted"}, system_prompt="Extract the order.",
                      shape_problems=shape_problems(EvaluationConfig(task_type="extraction")))
    [quarantined] = build_raw_examples(tmp_path / "task", tmp_path / "out", spec)["quarantine"]
    assert quarantined["source"] == "export.csv:line 9" and json.loads(quarantined["raw"]) == {
        "answer": rows[7]["extracted"], "row": rows[7]}, "the answer, then the CSV row with its columns, no system"
