import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftpipe.core import preference_cleaning, records, similarity
from ftpipe.core.preferences import (
    as_chat, missing_preference_rows, missing_split_rows, read_preferences, to_preference, write_preferences,
)
from ftpipe.core.records import FormatSpec, RawDataError
from ftpipe.core.results import read_result
from ftpipe_tests.builders import chat, make_task
from ftpipe_tests.rows import sentence

SYSTEM = "You triage tickets."


def pair(prompt: str, chosen: str, rejected: str, source: str = "p.jsonl:line 1") -> dict:
    return to_preference({"prompt": prompt, "chosen": chosen, "rejected": rejected}, FormatSpec(), source)


def single(prompt: str, completion: str, label: bool, source: str = "k.jsonl:line 1") -> dict:
    return to_preference({"prompt": prompt, "completion": completion, "label": label}, FormatSpec(), source)


def read(folder: Path, spec: FormatSpec = FormatSpec()) -> records.ReadResult:
    return records.read_raw_dir(folder / "raw", spec)


def test_every_preference_format_becomes_the_canonical_row(ftpipe_env: Path) -> None:
    conversational = {"prompt": [{"role": "system", "content": "own"}, {"role": "user", "content": "q2"}],
                      "chosen": [{"role": "assistant", "content": "good"}],
                      "rejected": {"role": "assistant", "content": "bad"}}
    folder = make_task(ftpipe_env, "t", {
        "pairs.jsonl": [{"prompt": "q1", "chosen": "yes", "rejected": "no"}, conversational],
        "kto.json": json.dumps([{"prompt": "q3", "completion": "fine", "label": True},
                                {"prompt": "q4", "completion": "rude", "label": 0}]),
        "kto.csv": "prompt,completion,label\nq5,nice,true\nq6,mean,FALSE\n",
        "sft.jsonl": [chat("q7", "answer"), {"prompt": "q8", "completion": "no label: an SFT row"}],
    })
    pq.write_table(pa.table({"ticket": ["q9"], "good": ["a"], "bad": ["b"]}), folder / "raw" / "mapped.parquet")
    result = read(folder, FormatSpec(columns={"prompt": "ticket", "chosen": "good", "rejected": "bad"},
                                     system_prompt=SYSTEM))
    assert result.quarantine == [] and len(result.examples) == 2
    rows = {row["source"]: row for row in result.preferences}
    assert rows["pairs.jsonl:line 1"]["prompt"] == [{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": "q1"}]
    assert (rows["pairs.jsonl:line 1"]["chosen"], rows["pairs.jsonl:line 1"]["rejected"]) == ("yes", "no")
    assert rows["pairs.jsonl:line 2"]["prompt"][0] == {"role": "system", "content": "own"}
    assert (rows["pairs.jsonl:line 2"]["chosen"], rows["pairs.jsonl:line 2"]["rejected"]) == ("good", "bad")
    labels = {row["prompt"][-1]["content"]: row["label"] for row in result.preferences if row["chosen"] is None}
    assert labels == {"q3": True, "q4": False, "q5": True, "q6": False}
    assert (rows["mapped.parquet:row 1"]["chosen"], rows["mapped.parquet:row 1"]["completion"]) == ("a", None)
    assert len({row["id"] for row in result.preferences}) == len(result.preferences) == 7


def test_pairs_of_whole_conversations_read_their_shared_start_as_the_prompt(ftpipe_env: Path) -> None:
    def turns(*texts: str) -> list[dict]:
        return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(texts)]

    ultrafeedback = {"prompt": "Name a prime.", "prompt_id": "9f2", "chosen": turns("Name a prime.", "7"),
                     "rejected": turns("Name a prime.", "8"), "messages": turns("Name a prime.", "7"),
                     "score_chosen": 8.5, "score_rejected": 2.0}
    folder = make_task(ftpipe_env, "t", {"implicit.jsonl": [  # TRL's implicit prompt, over several turns
        {"chosen": turns("Hi", "Hello!", "Name a color."), "rejected": turns("Hi", "Hello!", "Name a colour.")},
        {"chosen": turns("Hi", "Hello!", "Name a color.", "Red."),
         "rejected": turns("Hi", "Hello!", "Name a color.", "Seven.")}]})
    (folder / "raw" / "hh.jsonl").write_text(json.dumps({  # Anthropic HH-RLHF's transcripts
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: Red.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: Seven."}) + "\n")
    pq.write_table(pa.Table.from_pylist([ultrafeedback]), folder / "raw" / "ultrafeedback.parquet")
    result = read(folder, FormatSpec(system_prompt=SYSTEM))
    assert [entry["reason"] for entry in result.quarantine] == [
        "field 'chosen' holds a conversation, which must end with a user message and the assistant's answer"]
    rows = {row["source"]: row for row in result.preferences}
    ultra = rows["ultrafeedback.parquet:row 1"]
    assert ultra["prompt"] == [{"role": "system", "content": SYSTEM}, *turns("Name a prime.")]
    assert (ultra["chosen"], ultra["rejected"]) == ("7", "8")
    assert rows["implicit.jsonl:line 2"]["prompt"][1:] == turns("Hi", "Hello!", "Name a color.")
    assert (rows["implicit.jsonl:line 2"]["chosen"], rows["implicit.jsonl:line 2"]["rejected"]) == ("Red.", "Seven.")
    assert {key: rows["hh.jsonl:line 1"][key] for key in ("prompt", "chosen", "rejected")} == {
        key: rows["implicit.jsonl:line 2"][key] for key in ("prompt", "chosen", "rejected")}
    plain = {"prompt": "Name a prime.", "chosen": "7", "rejected": "8"}
    assert ultra["id"] == to_preference(plain, FormatSpec(system_prompt=SYSTEM), "")["id"]


def test_a_pair_whose_own_ratings_tie_or_favour_the_rejected_answer_is_quarantined(ftpipe_env: Path) -> None:
    """UltraFeedback rates both answers of a pair; where the ratings tie, the pair states no preference."""
    rated = [{"prompt": f"q{n}", "chosen": "a", "rejected": "b", "score_chosen": chosen, "score_rejected": rejected}
             for n, (chosen, rejected) in enumerate([(8.5, 2.0), (7.0, 7.0), (3.0, 6.5), (None, 4.0)])]
    folder = make_task(ftpipe_env, "t", {"rated.csv": "prompt,chosen,rejected,score_chosen,score_rejected\n"
                                                      "q4,a,b,5,5.0\nq5,a,b,9,1\n"})
    pq.write_table(pa.Table.from_pylist(rated), folder / "raw" / "rated.parquet")
    result = read(folder)
    assert sorted(row["prompt"][-1]["content"] for row in result.preferences) == ["q0", "q3", "q5"]
    assert [(entry["source"], entry["reason"]) for entry in result.quarantine] == [
        ("rated.csv:line 2", "fields 'score_chosen' and 'score_rejected' are equal: a tie states no preference"),
        ("rated.parquet:row 2", "fields 'score_chosen' and 'score_rejected' are equal: a tie states no preference"),
        ("rated.parquet:row 3", "field 'score_rejected' is above 'score_chosen': the pair prefers its rejected "
                                "answer (swap them, or leave the pair out)")]


def test_unpaired_rows_a_paired_objective_leaves_out_are_said() -> None:
    from ftpipe.core.preferences import unpaired_left_out

    assert unpaired_left_out("dpo", 36, 16) == (
        "52 preference rows (16 held out) are unpaired (a completion and a label): dpo trains and is evaluated on "
        "pairs (chosen and rejected) only, so it leaves them out; kto trains on both kinds")
    assert unpaired_left_out("orpo", 1, 0).startswith("1 preference row (0 held out) is unpaired")
    assert unpaired_left_out("kto", 36, 16) is None and unpaired_left_out("dpo", 0, 0) is None
    assert unpaired_left_out(None, 36, 16) is None, "no preference stage: nothing is left out by one"


def test_a_split_that_held_no_pair_out_is_named_as_the_reason_a_paired_objective_cannot_run(tmp_path: Path) -> None:
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "completion": None,
            "label": None, "source": "p.jsonl:line 1"}
    single = {**pair, "chosen": None, "rejected": None, "completion": "c", "label": True}
    train, held_out, nothing = tmp_path / "train.parquet", tmp_path / "eval.parquet", tmp_path / "empty.parquet"
    write_preferences([{**pair, "id": str(n)} for n in range(3)] + [{**single, "id": "s"}], train)
    write_preferences([], nothing)
    assert missing_split_rows("dpo", train, nothing, 0.15) == (
        "dpo is evaluated on held-out pairs, and the split held none out: all 3 pairs landed in train "
        "(split.eval_fraction 0.15 holds out that share of rows by their content hash, so a few can all land in "
        "train); add pairs, raise split.eval_fraction or change split.seed")
    assert missing_split_rows("kto", train, nothing, 0.2).startswith(
        "kto is evaluated on held-out preference rows, and the split held none out: all 4 preference rows landed")
    write_preferences([{**single, "id": "t"}], held_out)
    assert missing_split_rows("kto", train, held_out, 0.15) is None
    assert missing_split_rows("dpo", train, held_out, 0.15).startswith("dpo is evaluated on held-out pairs")
    assert missing_split_rows("dpo", nothing, held_out, 0.15) == missing_preference_rows("dpo", nothing), (
        "a train file without pairs is the problem named first")


def test_mapped_columns_make_unpaired_rows(ftpipe_env: Path) -> None:
    folder = make_task(ftpipe_env, "t", {})
    table = pa.table({"ticket": ["q", "r", "s"], "reply": ["c", "d", "e"], "ok": [1.0, 0.0, None]})  # pandas' ints
    pq.write_table(table, folder / "raw" / "k.parquet")
    result = read(folder, FormatSpec(columns={"prompt": "ticket", "completion": "reply", "label": "ok"}))
    assert result.examples == [] and [q["reason"] for q in result.quarantine] == [
        "field 'ok' must be a boolean (true or false), got null"]
    assert [(row["completion"], row["label"]) for row in result.preferences] == [("c", True), ("d", False)]
    spellings = pa.table({"ticket": ["t", "u"], "reply": ["f", "g"], "ok": ["1", "false"]})
    pq.write_table(spellings, folder / "raw" / "k.parquet")
    spelled = read(folder, FormatSpec(columns={"prompt": "ticket", "completion": "reply", "label": "ok"}))
    assert [row["label"] for row in spelled.preferences] == [True, False], "a CSV's or a text column's spellings"


def test_a_file_of_pairs_and_unpaired_rows_with_every_column_reads_both(ftpipe_env: Path, tmp_path: Path) -> None:
    """Pairs and unpaired rows in one table (a pandas export, ftpipe's own preferences file): each row leaves the
    other kind's columns null, or empty in a CSV."""
    rows = [{"prompt": "delete my account", "chosen": "account", "rejected": "billing", "completion": None,
             "label": None},
            {"prompt": "add dark mode", "chosen": None, "rejected": None, "completion": "feature", "label": True}]
    csv = "prompt,chosen,rejected,completion,label\nrefund me,billing,account,,\nit crashes,,,bug,false\n"
    folder = make_task(ftpipe_env, "t", {"a.jsonl": rows, "b.csv": csv})
    result = read(folder)
    assert result.quarantine == [] and len(result.preferences) == 4
    write_preferences(result.preferences, tmp_path / "own.parquet")
    (folder / "raw" / "own.parquet").write_bytes((tmp_path / "own.parquet").read_bytes())
    again = read(folder)
    assert again.quarantine == [] and len(again.preferences) == 8, "ftpipe's own preferences file reads back"
    unpaired = [row["label"] for row in again.preferences if row["chosen"] is None]
    assert sorted(unpaired) == [False, False, True, True], "each file's unpaired row, read twice"
    assert all(row["rejected"] and row["label"] is None for row in again.preferences if row["chosen"])


def test_a_mapped_preference_column_missing_from_a_file_is_named_as_the_mapping(ftpipe_env: Path) -> None:
    folder = make_task(ftpipe_env, "t", {"prefs.csv": "ticket,good\nclose my account,account\n",
                                         "own.jsonl": [{"prompt": "q", "chosen": "a", "rejected": "b"}]})
    result = read(folder, FormatSpec(columns={"prompt": "ticket", "completion": "reply", "chosen": "good",
                                              "rejected": "bad"}))
    assert [row["prompt"][-1]["content"] for row in result.preferences] == ["q"], "own keys need no mapping"
    assert [(q["source"], q["reason"]) for q in result.quarantine] == [
        ("prefs.csv:line 2", "mapped column 'bad' (data.columns.rejected) is not in the file; its columns are: good, "
                             "ticket")]


def test_the_mapping_a_misspelt_column_hint_names_reads_the_file(ftpipe_env: Path) -> None:
    folder = make_task(ftpipe_env, "t", {"export.jsonl": [{"prompt": "q1", "chosen": "a", "rejcted": "b"},
                                                          {"prompt": "q2", "chosen": "c", "rejected": "d"}]})
    result = read(folder, FormatSpec(columns={"rejected": "rejcted"}))
    assert [(row["prompt"][-1]["content"], row["rejected"]) for row in result.preferences] == [("q1", "b"), ("q2", "d")]
    assert result.quarantine == []


def test_the_mapping_the_hint_names_for_capitalised_pair_columns_reads_them(ftpipe_env: Path) -> None:
    folder = make_task(ftpipe_env, "t", {"export.csv": "Prompt,Chosen,Rejected\nis it free?,Yes.,No idea.\n"})
    (entry,) = read(folder).quarantine
    assert entry["reason"].endswith("; data.columns: {prompt: Prompt, chosen: Chosen, rejected: Rejected} reads it")
    result = read(folder, FormatSpec(columns={"prompt": "Prompt", "chosen": "Chosen", "rejected": "Rejected"}))
    assert [(row["chosen"], row["rejected"]) for row in result.preferences] == [("Yes.", "No idea.")]


def test_a_mapped_sft_answer_column_named_label_stays_an_sft_row(ftpipe_env: Path) -> None:
    folder = make_task(ftpipe_env, "t", {"intents.csv": "text,label\nmy card is lost,lost_card\n",
                                         "pairs.jsonl": [{"prompt": "q", "chosen": "a", "rejected": "b"}]})
    result = read(folder, FormatSpec(columns={"prompt": "text", "completion": "label"}))
    assert [row["messages"][-1]["content"] for row in result.examples] == ["lost_card"]
    assert [row["prompt"][-1]["content"] for row in result.preferences] == ["q"]


def test_a_thumbs_down_file_with_its_label_column_misspelt_is_quarantined_not_trained_on(ftpipe_env: Path) -> None:
    files = {"feedback.csv": "prompt,completion,lable\nreset my password,Send me your password.,false\n",
             "tags.csv": "prompt,completion,labels\nwhere is my parcel,It ships today.,shipping\n"}
    result = read(make_task(ftpipe_env, "t", files))
    assert [row["messages"][-1]["content"] for row in result.examples] == ["It ships today."], "a tag column: SFT"
    assert [(q["source"], q["reason"]) for q in result.quarantine] == [
        ("feedback.csv:line 2", "field 'label' is missing, and the row has 'lable' ('false'): misspelt? "
                                "(data.columns: {label: lable} reads it as an unpaired preference row)")]
    fixed = read(ftpipe_env / "tasks" / "t", FormatSpec(columns={"label": "lable"}))
    assert [(row["completion"], row["label"]) for row in fixed.preferences] == [("Send me your password.", False)]


@pytest.mark.parametrize(("row", "reason"), [
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "field 'rejected' is empty"),
    ({"prompt": "q", "chosen": "a"}, "field 'rejected' is missing"),
    ({"prompt": "q", "chosen": "a", "rejcted": "b"},
     "field 'rejected' is missing, and the row has 'rejcted': misspelt? (data.columns: {rejected: rejcted} reads it)"),
    ({"chosen": "a", "rejected": "b"}, "field 'prompt' is missing"),
    ({"prompt": "q", "chosen": "Same  answer", "rejected": "same answer"},
     "fields 'chosen' and 'rejected' are the same answer after normalisation"),
    ({"prompt": "q", "chosen": "It ships today.", "rejected": "It ships\u200b today.\ufeff"},
     "fields 'chosen' and 'rejected' are the same answer after normalisation"),
    ({"prompt": "q", "completion": "a", "label": "yes"},
     "field 'label' must be a boolean (true or false), got str 'yes'"),
    ({"prompt": "q", "completion": "a", "label": 2}, "field 'label' must be a boolean"),
    ({"prompt": "q", "completion": "a", "label": None}, "field 'label' must be a boolean (true or false), got null"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "field 'prompt' must end with a user message, but its last message has role 'assistant'"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "field 'chosen' must be an assistant message, but it has role 'user'"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}] * 2, "rejected": "b"},
     "field 'chosen' holds a conversation, which must end with a user message and the assistant's answer"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "b"}]},
     "fields 'chosen' and 'rejected' hold conversations that differ before their answers: a pair answers one prompt"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"},
     "field 'rejected' holds a transcript whose turn 2 of 2 (Assistant:) is empty"),
    ({"chosen": "\n\nHuman: \n\nAssistant: a\n\nHuman: q\n\nAssistant: b",
      "rejected": "\n\nHuman: q\n\nAssistant: c"},
     "field 'chosen' holds a transcript whose turn 1 of 4 (Human:) is empty"),
    ({"prompt": "not q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     "field 'prompt' is neither the conversation in 'chosen' and 'rejected' before their answers nor its last user "
     "message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "prompt": "q",
      "chosen": "a", "rejected": "b"}, "holds a preference pair and 'messages' too: one row is one example; write each "
                                       "as a row of its own"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "completion": "c", "label": True},
     "holds a preference pair and 'completion' too"),
])
def test_bad_preference_rows_are_quarantined_with_a_reason(ftpipe_env: Path, row: dict, reason: str) -> None:
    good = {"prompt": "fine", "chosen": "ok", "rejected": "not ok"}
    result = read(make_task(ftpipe_env, "t", {"a.jsonl": [good, row]}))
    assert len(result.preferences) == 1
    (entry,) = result.quarantine
    assert entry["source"] == "a.jsonl:line 2" and reason in entry["reason"] and "\n" not in entry["reason"]


def test_a_task_of_preference_rows_only_builds_and_its_counts_add_up(ftpipe_env: Path, tmp_path: Path) -> None:
    folder = make_task(ftpipe_env, "t", {"a.jsonl": [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                    {"prompt": "q", "completion": "a", "label": "maybe"},
                                                    {"prompt": "r", "completion": "a", "label": False}]})
    summary = records.build_raw_examples(folder, tmp_path / "out", FormatSpec())
    assert (summary["rows_read"], summary["rows_valid"], summary["rows_quarantined"]) == (3, 2, 1)
    assert summary["preference_rows"] == 2
    assert records.read_examples(tmp_path / "out" / "examples.parquet") == []
    assert len(read_preferences(tmp_path / "out" / "preferences.parquet")) == 2
    assert read_result(tmp_path / "out").produced["preferences"] == "preferences.parquet"
    with pytest.raises(RawDataError, match="no usable rows"):
        records.build_raw_examples(make_task(ftpipe_env, "u", {"a.jsonl": [{"prompt": "q", "chosen": "a"}]}),
                                   tmp_path / "none", FormatSpec())


def test_identical_pairs_after_normalisation_keep_one() -> None:
    first, copy = pair("Reset my password", "Done.", "No."), pair("reset  my PASSWORD", "done.", " no.", "b:line 9")
    other = pair("Reset my password", "Done.", "Maybe.")
    kept, removed = preference_cleaning.clean_preferences([copy, other, first])
    assert len(kept) == 2 and other in kept
    (gone,) = removed
    assert gone["reason"] == "exact_duplicate"
    assert {gone["id"], gone["duplicate_of"]} == {first["id"], copy["id"]}
    assert gone["duplicate_of_source"] in {first["source"], copy["source"]} and "after normalisation" in gone["detail"]


def test_a_pair_without_the_system_prompt_is_a_copy_of_the_same_pair_with_it() -> None:
    bare = pair("Reset my password", "Done.", "No.", "export.jsonl:line 11")
    with_system = to_preference({"prompt": [{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": "Reset my password"}],
                                 "chosen": "Done.", "rejected": "No."}, FormatSpec(), "conv.jsonl:line 31")
    reverse = to_preference({**{key: with_system[key] for key in ("prompt",)}, "chosen": "No.", "rejected": "Done."},
                            FormatSpec(), "conv.jsonl:line 32")
    kept, removed = preference_cleaning.clean_preferences([bare, with_system], system_prompt=SYSTEM)
    assert kept == [with_system] and [row["reason"] for row in removed] == ["exact_duplicate"], \
        "trained with the chat rows' system prompt, the bare pair is the same pair"
    kept, removed = preference_cleaning.clean_preferences([bare, with_system, reverse], system_prompt=SYSTEM)
    assert kept == [with_system] and sorted(row["reason"] for row in removed) == ["contradiction", "exact_duplicate"]
    kept, _ = preference_cleaning.clean_preferences([bare, with_system], system_prompt="Another instruction.")
    assert len(kept) == 2, "another system prompt: two prompts"


def prompt_jaccard(a: dict, b: dict) -> float:
    prompts, _ = similarity.prompt_shingles([as_chat(a), as_chat(b)], 2, np.zeros(0, dtype=np.uint64))
    return prompts.jaccard(0, 1)


def test_near_duplicate_prompts_with_the_same_answers_keep_one_without_chaining() -> None:
    """A ~ B and B ~ C, but A and C are not alike: each removed row names a kept row it is itself alike to."""
    rng = random.Random(0)
    a = sentence(rng, 60).split()
    b = a[:56] + ["b1", "b2", "b3", "b4"]
    c = b[:50] + ["c1", "c2", "c3", "c4"] + b[54:]
    chain = [pair(" ".join(words), "good", "bad", f"p:line {i}") for i, words in enumerate((a, b, c))]
    assert prompt_jaccard(chain[0], chain[1]) >= 0.8 and prompt_jaccard(chain[1], chain[2]) >= 0.8
    assert prompt_jaccard(chain[0], chain[2]) < 0.8
    other_answers = pair(" ".join(a), "bad", "worse")
    unrelated = [pair(sentence(rng, 60), "good", "bad", f"u:line {i}") for i in range(5)]
    kept, removed = preference_cleaning.clean_preferences(chain + [other_answers] + unrelated)
    assert other_answers in kept and all(row in kept for row in unrelated)
    assert removed and {row["reason"] for row in removed} == {"near_duplicate"}
    kept_by_id = {row["id"]: row for row in kept}
    for gone in removed:
        assert prompt_jaccard(gone, kept_by_id[gone["duplicate_of"]]) >= 0.8
        assert gone["detail"].startswith("prompt Jaccard 0.") and gone["detail"].endswith("same chosen and rejected")
    assert len(kept) + len(removed) == 9


def test_a_reversed_pair_is_a_contradiction_resolved_by_strict_majority() -> None:
    a_over_b = [pair("Which is right?", "A", "B", f"x:line {i}") for i in range(2)]
    b_over_a = pair("Which is right?", "B", "A", "y:line 1")
    kept, removed = preference_cleaning.clean_preferences([b_over_a, *a_over_b])
    assert kept == [min(a_over_b, key=lambda r: r["source"])]
    reasons = {row["source"]: row["reason"] for row in removed}
    assert reasons == {"y:line 1": "contradiction", "x:line 1": "exact_duplicate"}
    contradiction = next(row for row in removed if row["reason"] == "contradiction")
    assert contradiction["duplicate_of"] == a_over_b[0]["id"]
    assert "reverse pair" in contradiction["detail"] and "2 of 3" in contradiction["detail"]


def test_a_reversed_pair_without_a_majority_drops_the_group() -> None:
    rows = [pair("Which is right?", "A", "B"), pair("which is RIGHT?", "B", "A", "y:line 1")]
    keep = pair("Which is right?", "A", "C")
    kept, removed = preference_cleaning.clean_preferences([*rows, keep])
    assert kept == [keep]
    assert [row["reason"] for row in removed] == ["contradiction"] * 2
    assert all("no strict majority (1 against 1)" in row["detail"] for row in removed)
    assert {row["duplicate_of"] for row in removed} == {row["id"] for row in rows}


def test_unpaired_rows_opposite_labels_are_contradictions_and_copies_duplicates() -> None:
    good = [single("Greet me", "Hello!", True, f"k:line {i}") for i in range(3)]
    bad = single("Greet me", "hello!", False, "k:line 9")
    tie = [single("Bye", "Ciao", True), single("Bye", "Ciao", False)]
    kept, removed = preference_cleaning.clean_preferences([*good, bad, *tie])
    assert kept == [good[0]]
    assert sorted(row["reason"] for row in removed) == ["contradiction"] * 3 + ["exact_duplicate"] * 2
    (lost,) = [row for row in removed if row["source"] == "k:line 9"]
    assert lost["reason"] == "contradiction" and "opposite label" in lost["detail"] and "3 of 4" in lost["detail"]


def test_cleaning_does_not_depend_on_the_order_of_the_rows() -> None:
    rng = random.Random(4)
    rows = [pair(sentence(rng, 12), rng.choice("ab"), rng.choice("cd"), f"f:line {i}") for i in range(30)]
    rows += [dict(row, source="g:line 1") for row in rows[:5]] + [pair(rows[6]["prompt"][-1]["content"],
                                                                       rows[6]["rejected"], rows[6]["chosen"])]
    forward, backward = (preference_cleaning.clean_preferences(order) for order in (rows, rows[::-1]))
    assert forward == backward and len(forward[1]) == 7


def test_a_chosen_answer_cut_off_mid_sentence_is_counted_where_the_others_end_whole() -> None:
    rng = random.Random(5)
    signed = [pair(sentence(rng, 10), f"Hi Ana, {sentence(rng, 8)}. Best, Nova", "No idea.", f"p.jsonl:line {i}")
              for i in range(20)]
    ended = [pair(sentence(rng, 10), f"{sentence(rng, 8)}.", "No idea.", f"q.jsonl:line {i}") for i in range(6)]
    cut = [pair("My light keeps dropping off", "Hi Ana, reinstall the app. If it s", "No idea.", "c.jsonl:line 2"),
           pair("How do I pair the hub", "Hi Ana, open the app and then add it ag", "No idea.", "c.jsonl:line 5")]
    assert preference_cleaning.cut_off_chosen(signed + ended + cut) == {
        "cut_off_chosen_answers": 2, "first_cut_off_chosen_answer": "c.jsonl:line 2, ending 'the app. If it s'"}
    assert preference_cleaning.cut_off_chosen(signed[:7] + cut)["cut_off_chosen_answers"] == 0, "too few pairs"
    unsigned = [pair(sentence(rng, 10), sentence(rng, 8), "No idea.", f"u.jsonl:line {i}") for i in range(26)]
    assert preference_cleaning.cut_off_chosen(unsigned + cut)["cut_off_chosen_answers"] == 0, (
        "answers that mostly end without punctuation say nothing of a cut")


def test_build_clean_preferences_writes_the_kept_rows_and_counts_by_reason(tmp_path: Path) -> None:
    rows = [pair("q", "a", "b"), pair("Q", "a", "b", "g:line 2"), pair("q", "b", "a", "h:line 3"),
            single("r", "c", True)]
    summary = preference_cleaning.build_clean_preferences(rows, tmp_path)
    removed = summary.pop("removed")
    assert summary == {"preference_rows_in": 4, "preference_rows_out": 2, "exact_duplicates": 1,
                       "near_duplicates": 0, "contradictions": 1, "preference_answers_respelled": 0,
                       "pairs_differing_in_punctuation": 0, "first_pair_differing_in_punctuation": None,
                       "pairs_rejecting_taught_answers": 0, "first_pair_rejecting_taught_answer": None,
                       "cut_off_chosen_answers": 0, "first_cut_off_chosen_answer": None}
    assert len(removed) == 2 and all(row["reason"] in ("exact_duplicate", "contradiction") for row in removed)
    assert len(read_preferences(tmp_path / "preferences.parquet")) == 2
    empty = preference_cleaning.build_clean_preferences([], tmp_path)
    assert empty["preference_rows_in"] == 0 and read_preferences(tmp_path / "preferences.parquet") == []
