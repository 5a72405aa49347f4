"""A corpus of bad raw inputs: the pipeline never crashes, every bad row is quarantined with a reason
naming its file and line/row, every usable row survives, and the counts add up end to end."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftpipe.core import dedup, records, split
from ftpipe.core.records import FormatSpec
from ftpipe_tests.builders import chat, make_task

Pair = tuple[str, str]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Path], None]  # writes into (raw dir, a folder outside the task)
    good: list[Pair]  # (prompt, answer) of every row that must survive
    bad: list[tuple[str, str]]  # (source, words the quarantine reason must contain)
    ignored: tuple[str, ...] = ()


def pairs(tag: str, n: int = 2) -> list[Pair]:
    return [(f"{tag} question {i}", f"{tag} answer {i}") for i in range(n)]


def good_rows(tag: str, n: int = 2) -> list[dict]:
    return [chat(p, a) for p, a in pairs(tag, n)]


def lines(*rows: dict | str) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def csv_text(tag: str, *bad: str, header: str = "prompt,completion", sep: str = ",") -> str:
    first, second = (sep.join(p) for p in pairs(tag))
    return "\n".join([header, first, *bad, second]) + "\n"


def parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def files(content: dict[str, str | bytes]) -> Callable[[Path, Path], None]:
    def build(raw: Path, outside: Path) -> None:
        for name, data in content.items():
            (raw / name).parent.mkdir(parents=True, exist_ok=True)
            (raw / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return build


def jsonl_case(name: str, *bad: tuple[dict | str, str]) -> Case:
    """a.jsonl: a good row, the bad rows (lines 2, 3, ...), another good row."""
    first, second = good_rows(name)
    text = lines(first, *(row for row, _ in bad), second)
    return Case(name, files({"a.jsonl": text}), pairs(name), [(f"a.jsonl:line {i + 2}", w) for i, (_, w) in enumerate(bad)])


def msgs(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def with_good_file(name: str, content: dict[str, str | bytes], bad: list[tuple[str, str]], build=None) -> Case:
    """Bad files beside ok.jsonl, which holds good rows."""
    def both(raw: Path, outside: Path) -> None:
        files({**content, "ok.jsonl": lines(*good_rows(name))})(raw, outside)
        if build:
            build(raw, outside)
    return Case(name, both, pairs(name), bad)


# -- builders that need more than bytes --------------------------------------------------------

def _utf16(bom: bytes, codec: str, cut: int = 0) -> Callable[[Path, Path], None]:
    def build(raw: Path, outside: Path) -> None:
        first, second = good_rows(f"utf16 {codec} {bom.hex()}")
        data = bom + lines(first, "{broken", second).encode(codec)
        (raw / "a.jsonl").write_bytes(data[: len(data) - cut])
    return build


def _utf16_case(name: str, bom: bytes, codec: str) -> Case:
    return Case(name, _utf16(bom, codec), pairs(f"utf16 {codec} {bom.hex()}"), [("a.jsonl:line 2", "not valid JSON")])


def _truncated_utf16(raw: Path, outside: Path) -> None:
    text = lines(*good_rows("utf16 cut")) + '{"prompt": "cut off in the mid'
    (raw / "a.jsonl").write_bytes(b"\xff\xfe" + text.encode("utf-16-le") + b"d")  # odd length: half a character


def _parquet_files(raw: Path, outside: Path) -> None:
    parquet(raw / "a.parquet", [{"prompt": p, "completion": a} for p, a in pairs("parquet ok")])
    parquet(raw / "b.parquet", [{"prompt": "x", "completion": "y"}] * 50)
    data = (raw / "b.parquet").read_bytes()
    (raw / "b.parquet").write_bytes(data[: len(data) // 2])
    (raw / "c.parquet").write_bytes(b"")
    (raw / "d.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")


def _parquet_schemas(raw: Path, outside: Path) -> None:
    ok = [{"prompt": p, "completion": a} for p, a in pairs("parquet schema")]
    parquet(raw / "a.parquet", ok + [{"prompt": "no answer", "completion": None}])
    parquet(raw / "b.parquet", [{"messages": "user: hi / assistant: hello"}])
    parquet(raw / "c.parquet", [{"prompt": b"bytes", "completion": b"not text"}])
    ints = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())])))])
    parquet(raw / "d.parquet", [{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": 2}]}], ints)
    parquet(raw / "e.parquet", [{"messages": None}])


def _csv_quoting(raw: Path, outside: Path) -> None:
    text = 'prompt,completion\r\n"multi\r\nline, with comma","say ""hi"""\r\n"a ""quote""","x, y"\r\n'
    (raw / "a.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())


def _csv_delimiters(raw: Path, outside: Path) -> None:
    for name, sep in (("semicolon.csv", ";"), ("tab.csv", "\t"), ("pipe.csv", "|")):
        (raw / name).write_text(f"prompt{sep}completion\n{name}, with comma{sep}fine, thanks\n")


def _fifty_mb(raw: Path, outside: Path) -> None:
    head, tail = '{"prompt": "', '", "completion": "huge"}'
    big = head + "x" * (50 * 1024 * 1024 - len(head) - len(tail)) + tail
    first, second = good_rows("fifty mb")
    (raw / "a.jsonl").write_text(json.dumps(first) + "\n" + big + "\n" + json.dumps(second) + "\n")


def _links_out(raw: Path, outside: Path) -> None:
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.jsonl").write_text(lines(chat("secret", "leaked")))
    (raw / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (raw / "linkdir").symlink_to(outside, target_is_directory=True)


def _bad_links(raw: Path, outside: Path) -> None:
    (raw / "dangling.jsonl").symlink_to(raw / "missing.jsonl")
    (raw / "loop.jsonl").symlink_to(raw / "loop.jsonl")


def _non_utf8_name(raw: Path, outside: Path) -> None:
    (raw / os.fsdecode(b"caf\xe9.jsonl")).write_text(lines(*good_rows("latin-1 name")))


_MIXED = lines(
    chat("mixed question 0", "mixed answer 0"),
    {"instruction": "mixed question 1", "input": " ", "output": "mixed answer 1"},
    {"prompt": "mixed question 2", "completion": "mixed answer 2"},
    "mixed question 3,a CSV line in a JSON Lines file",
)
_GARBAGE = b"\x89PNG" + bytes(b for b in random.Random(0).randbytes(3000) if b != 10)
_LATIN1 = b'{"prompt": "caf\xe9", "completion": "x"}\n{"prompt": \xff}\n'
_CRLF = (b"\xef\xbb\xbf" + lines(*good_rows("crlf")).replace("\n", "\r\n\r\n").encode()
         + b"\xef\xbb\xbf" + json.dumps(chat("crlf question 2", "crlf answer 2")).encode())
_SEPARATORS = [("line\u2028separator", "next\x85line"), ("para\u2029graph", "ok")]
_EMPTY = {"empty.jsonl": b"", "blank.json": " \n\n", "header.csv": "prompt,completion\n", "none.json": "[]"}
_STRAY_QUOTES = ('"Order 55 is late,"{""category"": ""billing"", ""priority"": ""low""}"',  # two fields, garbled
                 '"Order 56 is late,"{""category"": ""billing""}"')  # one field
_DEEP = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "x"}'

CASES = [
    jsonl_case("broken_json_line", ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2")),
    jsonl_case("scalar_and_array_rows", ('["a", "b"]', "expected an object/record, got list"), ("42", "got int"),
               ('"text"', "got str"), ("null", "got null")),
    jsonl_case("messages_wrong_shape", ({"messages": "hi"}, "'messages' must be a list"), ({"messages": []}, "empty list"),
               ({"messages": ["hi"]}, "messages[0] must be an object"), ({"messages": None}, "'messages' is missing")),
    jsonl_case("message_missing_content", ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
                                           "'messages[1].content' is missing")),
    jsonl_case("content_wrong_type", (msgs(("user", "q"), ("assistant", 3)), "messages[1].content' must be text, got int"),
               (msgs(("user", ["q"]), ("assistant", "a")), "got list"),
               (msgs(("user", {"text": "q"}), ("assistant", "a")), "got dict")),
    jsonl_case("empty_fields", ({"prompt": "", "completion": "x"}, "field 'prompt' is empty"),
               (msgs(("user", " \n\t"), ("assistant", "a")), "only whitespace"),
               ({"instruction": "x", "output": " "}, "field 'output' is empty"),
               ({"instruction": "x", "context": "c", "response": ""}, "field 'response' is empty")),
    jsonl_case("missing_fields", ({"prompt": "x"}, "unrecognised row format"), ({"instruction": "x"}, "keys: instruction"),
               ({}, "keys: none")),
    jsonl_case("not_ending_with_assistant", (msgs(("user", "q")), "does not end with an assistant"),
               (msgs(("user", "q"), ("assistant", "a"), ("user", "again")), "does not end with an assistant")),
    jsonl_case("no_user_message", (msgs(("system", "s"), ("assistant", "a")), "no user message")),
    jsonl_case("unknown_roles", (msgs(("bot", "q"), ("assistant", "a")), "'bot'; expected one of system, user, assistant"),
               (msgs(("user", "q"), ("tool", "a")), "messages[1] is a tool's result (role tool)"),
               ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "role is None")),
    jsonl_case("sharegpt_rows", (msgs(("human", "q"), ("gpt", "a")), "role is 'human'"),
               ({"conversations": [{"from": "human", "value": "q"}]}, "does not end with an assistant"),
               ({"conversations": [{"from": "tool", "value": "q"}]}, "conversations[0].from is 'tool'")),
    jsonl_case("wrong_types", ({"prompt": 1, "completion": "x"}, "field 'prompt' must be text, got int"),
               ({"instruction": "x", "input": 5, "output": "y"}, "field 'input' must be text, got int"),
               ({"prompt": "x", "completion": True}, "got bool")),
    jsonl_case("nan_and_infinity", ('{"prompt": NaN, "completion": "x"}', "must be text, got NaN"),
               ('{"prompt": "x", "completion": Infinity}', "must be text, got float")),
    jsonl_case("huge_integer", ('{"prompt": ' + "1" * 5000 + ', "completion": "x"}', "integer string conversion")),
    jsonl_case("deeply_nested_json", (_DEEP, "nested too deeply")),
    jsonl_case("lone_surrogates", ('{"prompt": "a\\ud800b", "completion": "x"}', "lone surrogate (U+D800)"),
               ('{"prompt": "x", "completion": "\\udfff"}', "lone surrogate (U+DFFF)")),
    jsonl_case("nul_bytes", ('{"prompt": "a\x00b", "completion": "x"}', "contains NUL bytes"),
               ('{"prompt": "a\\u0000b", "completion": "x"}', "field 'prompt' contains NUL bytes")),
    Case("capitalised_roles", files({"a.jsonl": lines(msgs(("USER", "caps question"), (" Assistant ", "caps answer")))}),
         [("caps question", "caps answer")], []),
    Case("truncated_jsonl", files({"a.jsonl": lines(*good_rows("cut")) + '{"prompt": "the file ends in the mid'}),
         pairs("cut"), [("a.jsonl:line 3", "cut off")]),
    Case("invalid_utf8", files({"a.jsonl": lines(*good_rows("utf8")).encode() + _LATIN1}), pairs("utf8"),
         [("a.jsonl:line 3", "not valid UTF-8 (0xE9)"), ("a.jsonl:line 4", "bytes that are not valid UTF-8")]),
    Case("crlf_bom_and_blank_lines", files({"a.jsonl": _CRLF}), pairs("crlf", 3), []),
    Case("line_separators_in_text", files({"a.jsonl": lines(*(json.dumps(chat(*p), ensure_ascii=False) for p in _SEPARATORS))}),
         _SEPARATORS, []),
    _utf16_case("utf16_le_with_bom", b"\xff\xfe", "utf-16-le"),
    _utf16_case("utf16_be_with_bom", b"\xfe\xff", "utf-16-be"),
    _utf16_case("utf16_without_bom", b"", "utf-16-le"),
    Case("utf16_truncated", _truncated_utf16, pairs("utf16 cut"), [("a.jsonl:line 3", "cut off")]),
    with_good_file("binary_garbage", {"garbage.jsonl": _GARBAGE}, [("garbage.jsonl:line 1", "not valid JSON")]),
    with_good_file("empty_files", _EMPTY, [(name, "file contains no rows") for name in _EMPTY]),
    Case("mixed_formats_in_one_file", files({"a.jsonl": _MIXED}), pairs("mixed", 3), [("a.jsonl:line 4", "not valid JSON")]),
    Case("json_file_holding_json_lines", files({"a.json": lines(good_rows("jl")[0], "{broken", good_rows("jl")[1])}),
         pairs("jl"), [("a.json:line 2", "not valid JSON")]),
    Case("json_lines_file_broken_on_its_first_line",
         files({"a.json": lines('{"prompt": "the first line ends in the mid', *good_rows("jl first"))}),
         pairs("jl first"), [("a.json:line 1", "cut off")]),
    with_good_file("truncated_json_array", {"a.json": json.dumps(good_rows("lost"))[:-20]}, [("a.json", "cut off")]),
    with_good_file("pretty_printed_json_missing_a_comma",
                   {"a.json": json.dumps({"data": good_rows("pretty")}, indent=2).replace('",\n', '"\n', 1)},
                   [("a.json", "file is not valid JSON (Expecting ',' delimiter")]),
    with_good_file("invalid_json_file", {"a.json": "{'single': 'quotes'}"},
                   [("a.json", "file is not valid JSON (Expecting property")]),
    Case("json_wrappers", files({"a.json": json.dumps({"version": 1, "data": good_rows("wrap")}),
                                 "b.json": json.dumps(chat("single question", "single answer")), "c.json": '"just text"'}),
         pairs("wrap") + [("single question", "single answer")], [("c.json:row 1", "expected an object/record, got str")]),
    Case("broken_parquet_files", _parquet_files, pairs("parquet ok"),
         [(name, "not readable as Parquet") for name in ("b.parquet", "c.parquet", "d.parquet")]),
    Case("parquet_wrong_schema", _parquet_schemas, pairs("parquet schema"),
         [("a.parquet:row 3", "field 'completion' is missing or null"), ("b.parquet:row 1", "'messages' must be a list"),
          ("c.parquet:row 1", "must be text, got bytes"), ("d.parquet:row 1", "must be text, got int"),
          ("e.parquet:row 1", "'messages' is missing or null")]),
    Case("csv_quoting_bom_crlf", _csv_quoting, [("multi\r\nline, with comma", 'say "hi"'), ('a "quote"', "x, y")], []),
    Case("csv_field_counts", files({"a.csv": csv_text("csv count", "one,two,three", "lonely")}), pairs("csv count"),
         [("a.csv:line 3", "1 more field(s) than the header"), ("a.csv:line 4", "fewer fields than the header")]),
    Case("csv_unclosed_quote", files({"a.csv": csv_text("csv quote", 'bad,"never closed', "csv quote later,still read")}),
         pairs("csv quote") + [("csv quote later", "still read")],
         [("a.csv:line 3", "unclosed quote starting on line 3 swallows the rest of the file")]),
    Case("csv_stray_quote", files({"a.csv": csv_text("csv stray", *_STRAY_QUOTES)}), pairs("csv stray"),
         [(f"a.csv:line {line}", "not valid CSV (',' expected after '\"'): a quoted field ends at its closing quote")
          for line in (3, 4)]),
    Case("csv_other_delimiters", _csv_delimiters,
         [(f"{name}, with comma", "fine, thanks") for name in ("pipe.csv", "semicolon.csv", "tab.csv")], []),
    Case("csv_nul_and_empty_fields", files({"a.csv": csv_text("csv nul", "a\x00b,x", "question,")}), pairs("csv nul"),
         [("a.csv:line 3", "field 'prompt' contains NUL bytes"), ("a.csv:line 4", "field 'completion' is empty")]),
    Case("csv_unmapped_header", files({"a.csv": "question,answer\nq,a\n", "ok.csv": csv_text("csv header")}),
         pairs("csv header"), [("a.csv:line 2", "unrecognised row format")]),
    Case("csv_oversized_field", files({"a.csv": csv_text("csv big", "q," + "y" * 1_200_000), "b.csv": "h" * 1_200_000 + "\nx\n"}),
         pairs("csv big"), [("a.csv:line 3", "row has 1,200,003 characters, more than the 1,000,000 limit"),
                            ("b.csv", "the CSV header line cannot be read (field larger than field limit")]),
    Case("single_row_50mb", _fifty_mb, pairs("fifty mb"),
         [("a.jsonl:line 2", "row has 52,428,800 characters, more than the 1,000,000 limit")]),
    Case("oversized_json_row", files({"a.json": json.dumps(good_rows("big json") + [chat("q" * 1_500_000, "a")])}),
         pairs("big json"), [("a.json:row 3", "row has 1,500,001 characters")]),
    with_good_file("links_out_of_the_task", {}, [("link.jsonl", "link to a file outside the task folder"),
                                                 ("linkdir", "link to a folder outside the task folder")], _links_out),
    with_good_file("broken_and_looping_links", {}, [("dangling.jsonl", "link to a missing file"),
                                                    ("loop.jsonl", "a loop of links")], _bad_links),
    Case("hidden_and_unsupported_files",
         files({"a.jsonl": lines(*good_rows("hidden")), ".hidden.jsonl": "{bad", ".cache/b.jsonl": "{bad", "notes.txt": "hi",
                "data.xlsx": b"PK\x03\x04", "README": "read me"}),
         pairs("hidden"), [], (".cache/b.jsonl", ".hidden.jsonl", "README", "data.xlsx", "notes.txt")),
    Case("non_utf8_file_name", _non_utf8_name, pairs("latin-1 name"), []),
]


def test_the_corpus_has_at_least_30_kinds_with_unique_names() -> None:
    assert len({case.name for case in CASES}) == len(CASES) >= 30


def kept_pairs(path: Path) -> list[Pair]:
    return sorted((row["messages"][-2]["content"], row["messages"][-1]["content"]) for row in records.read_examples(path))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_is_quarantined_and_good_rows_survive(case: Case, ftpipe_env: Path, tmp_path: Path) -> None:
    folder = make_task(ftpipe_env, "t", {})
    case.build(folder / "raw", tmp_path / "outside")
    summary = records.build_raw_examples(folder, tmp_path / "out", FormatSpec())
    assert kept_pairs(tmp_path / "out" / "examples.parquet") == sorted(case.good)
    reasons = {entry["source"]: entry["reason"] for entry in summary["quarantine"]}
    assert len(reasons) == len(summary["quarantine"]) == len(case.bad)
    for source, words in case.bad:
        assert words in reasons.get(source, f"<nothing quarantined from {source}: {reasons}>")
    assert summary["rows_read"] == summary["rows_valid"] + summary["rows_quarantined"] == len(case.good) + len(case.bad)
    assert summary["ignored_files"] == sorted(case.ignored)
    assert (tmp_path / "out" / "quarantine.jsonl").read_text(encoding="utf-8").count("\n") == len(case.bad)


def test_the_whole_corpus_flows_through_raw_dedup_and_split(ftpipe_env: Path, tmp_path: Path) -> None:
    folder = make_task(ftpipe_env, "all", {})
    for case in CASES:
        (folder / "raw" / case.name).mkdir()
        case.build(folder / "raw" / case.name, tmp_path / "outside" / case.name)
    raw = records.build_raw_examples(folder, tmp_path / "raw", FormatSpec())
    assert raw["rows_valid"] == sum(len(case.good) for case in CASES)
    assert raw["rows_quarantined"] == sum(len(case.bad) for case in CASES)
    assert raw["rows_read"] == raw["rows_valid"] + raw["rows_quarantined"]
    deduplicated = dedup.build_deduplicated(
        tmp_path / "raw" / "examples.parquet", tmp_path / "dedup")
    assert deduplicated["rows_in"] == raw["rows_valid"]
    assert deduplicated["rows_in"] == deduplicated["rows_out"] + len(deduplicated["removed"])
    sides = split.build_split(tmp_path / "dedup" / "examples.parquet", tmp_path / "split", eval_fraction=0.2, seed=0)
    assert sides["train_rows"] + sides["eval_rows"] == deduplicated["rows_out"]
    train, evaluation = (records.read_examples(tmp_path / "split" / name) for name in ("train.parquet", "eval.parquet"))
    assert not {row["id"] for row in train} & {row["id"] for row in evaluation}
