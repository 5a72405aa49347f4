"""Held-out split stratified by answer, with near-duplicate prompts and paraphrases kept together.

Near-duplicate prompts (short ones with one word misspelt too), rows giving the same distinctive answer, and rows
asking one question in other wrapping (`wrapping`) form a group, which takes one side. Groups are taken in the order
of a stable hash of their prompt (and the seed) and held out while their label's held-out rows stay within its share
of the label (answers no other group gives, as a generation task's, count as one label; an extraction's label is the
value of its answer's field of categories with the fewest values, such as an `issue`, as every answer is an object of
its own); what is left of the eval share of all rows goes to the labels furthest below theirs, each keeping a train
group while others can fill it.
Sides recorded by an earlier split are kept, so adding rows never moves an existing row between train and eval.
Near-duplicate prompts are those cleaning compares (`similarity`, leaving out the same shared text), and the leakage
check uses the same tests. Preference rows are split with the chat examples, by their prompts: near-identical prompts
of either kind share a side, so all the rows of one prompt are on one side."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from ftpipe.core import similarity, wrapping
from ftpipe.core.dedup import SHARED_TEXT_KEY, answer_key, comparable_answer, prompt_key
from ftpipe.core.evaluation.metrics.base import first_json_object
from ftpipe.core.layout import (
    EVAL as EVAL_FILE, EVAL_PREFERENCES, PREFERENCES, SPLIT_RECORD, TRAIN as TRAIN_FILE, TRAIN_PREFERENCES,
)
from ftpipe.core.preferences import as_chat, is_paired, read_preferences, write_preferences
from ftpipe.core.records import (
    common_system_prompt, examples_metadata, read_examples, with_system_prompt, write_examples,
)
from ftpipe.core.results import Result, reuse_key
from ftpipe.core.storage import atomic_dir, file_sha256
from ftpipe.core.text import canonical, cell, loose_words, unspaced

TRAIN, EVAL = "train", "eval"
# The same answer word for word (as `loose` reads it), of at least this many words and given by at most this many
# rows, makes rows paraphrases of one question (a worked solution under each rewording); a shorter or more common
# answer is a label or a stock reply many questions share.
ANSWER_MIN_WORDS = 6
ANSWER_MAX_ROWS = 5
HELD_CANDIDATES = 100  # a conversation whose every exchange more rows hold is not looked for inside longer ones
# The leakage check's pass, saying what it looked for.
NO_LEAKS = ("no leakage: no eval row duplicates a train prompt (or is one with a word misspelt), asks a train row's "
            "question in other wrapping, gives a train row's answer word for word or is held whole by a train "
            "conversation; paraphrases in other words and with other answers are not looked for")
STOCK_ANSWER_SHARE, STOCK_ANSWER_ROWS = 0.2, 5  # one final answer of this share of the train rows, this many at least


def hash_position(prompt: str, seed: int) -> float:
    """A prompt's place in [0, 1), stable for the prompt and the seed."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _similar_prompts(rows: list[dict[str, Any]], settings: similarity.Settings,
                     shared: np.ndarray | None) -> list[tuple[int, int, float]]:
    prompts, _ = similarity.prompt_shingles(rows, settings.shingle_words, shared)
    answers = pd.factorize(pd.Series([answer_key(row) for row in rows]))[0]
    return similarity.prompt_pairs(prompts, lambda i: similarity.prompt_words(rows[i]["messages"]), settings, answers)


def _misspelt_copies(rows: list[dict[str, Any]], settings: similarity.Settings) -> list[tuple[int, int, str]]:
    """(i, j, "'word j' for 'word i'"), i < j, for the short prompts that are one another with one word misspelt."""
    texts = [similarity.prompt_text(row["messages"]) for row in rows]
    return [(a, b, f"'{loose_words(texts[b])[at]}' for '{loose_words(texts[a])[at]}'")
            for a, b, at in similarity.misspelt_copies(texts, settings)]


def _same_answers(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(i, j), i < j, linking the rows that give the same distinctive answer (see ANSWER_MIN_WORDS; a JSON object by
    its value, so the words of a compact one are not run together)."""
    by_answer: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        words = loose_words(comparable_answer(row["messages"][-1]["content"]))
        if len(words) >= ANSWER_MIN_WORDS:
            by_answer.setdefault(" ".join(words), []).append(index)
    return [(group[0], other) for group in by_answer.values() if len(group) <= ANSWER_MAX_ROWS for other in group[1:]]


def _held_conversations(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(i, j) where row i's whole conversation (its turns but system messages, normalised) is a run of turns of the
    longer row j: a conversation and its continuation, or a question and answer another conversation holds; only where
    at most ANSWER_MAX_ROWS rows hold it (a greeting exchange many conversations open with is no such copy)."""
    turns = [tuple((m["role"], canonical(m["content"])) for m in row["messages"] if m["role"] != "system")
             for row in rows]
    holders: dict[tuple, list[int]] = {}  # each exchange (a turn and the next) -> the rows holding it
    for index, held in enumerate(turns):
        for exchange in set(zip(held, held[1:])):
            holders.setdefault(exchange, []).append(index)
    links = []
    for index, own in enumerate(turns):
        anchor = min((holders[exchange] for exchange in zip(own, own[1:])), key=len, default=[])
        if len(anchor) > HELD_CANDIDATES:  # only exchanges many rows hold: too common to tell a copy
            continue
        longer = [other for other in anchor if len(turns[other]) > len(own)
                  and any(turns[other][at:at + len(own)] == own for at in range(len(turns[other]) - len(own) + 1))]
        if len(longer) <= ANSWER_MAX_ROWS:
            links += [(index, other) for other in longer]
    return links


def _wrapped_links(copies: dict[int, dict[str, list[int]]]) -> list[tuple[int, int, float]]:
    """Links keeping each wrapped copy (`wrapping`) with the rows holding its question."""
    groups = {id(group): group for held in copies.values() for group in held.values()}
    return [(group[0], other, 1.0) for group in groups.values() for other in group[1:]]


def assign_sides(
    rows: list[dict[str, Any]],
    *,
    eval_fraction: float,
    seed: int,
    previous: dict[str, str] | None = None,
    settings: similarity.Settings = similarity.Settings(),
    shared: np.ndarray | None = None,
    labelled: bool = False,
    kinds: list[str] | None = None,
    strata: list[str] = (),
) -> dict[str, str]:
    """Map each row id to "train" or "eval".

    Rows with near-duplicate prompts (or short ones with one word misspelt), the same distinctive answer, one
    question in other wrapping or one conversation held whole by the other form groups (connected, so no pair of
    them is split); a group takes the side recorded for any of its rows in `previous` (an earlier split with the
    same fraction and seed), else a side stratified by the answer most of its rows give (`_stratified_sides`), the
    groups taken in the hash order of their smallest prompts. `shared`: the shared shingles cleaning left out (found
    anew if None). `labelled`: the answers are labels of a classification, so an answer no other group gives is a
    label of its own (else they are one label).
    `kinds`: each row's kind (chat rows, preference prompts), whose labels are held out apart, each in its share.
    `strata`: fields of the answers' JSON objects that hold categories, whose values stand for the answer (every
    extraction is an answer of its own, so its whole answer would stratify nothing).
    """
    previous = previous or {}
    groups = question_groups(rows, settings, shared)
    answers = [(kind, _stratum(row, strata)) for kind, row in zip(kinds or [""] * len(rows), rows)]
    pinned = [min((previous[rows[i]["id"]] for i in group if rows[i]["id"] in previous), default=None)
              for group in groups]
    group_sides = _stratified_sides(
        [len(group) for group in groups], _labels([[answers[i] for i in group] for group in groups], labelled), pinned,
        group_positions(rows, groups, seed), eval_fraction)
    return {rows[i]["id"]: previous.get(rows[i]["id"], side) for group, side in zip(groups, group_sides) for i in group}


def question_groups(rows: list[dict[str, Any]], settings: similarity.Settings = similarity.Settings(),
                    shared: np.ndarray | None = None) -> list[list[int]]:
    """The indices of the rows that must share a side, group by group (see `assign_sides`)."""
    links = (_similar_prompts(rows, settings, shared) + _misspelt_copies(rows, settings)
             + [(i, j, 1.0) for i, j in _same_answers(rows) + _held_conversations(rows)]
             + _wrapped_links(wrapping.wrapped_copies(rows)))
    members: dict[int, list[int]] = {}
    for index, root in enumerate(similarity.components(len(rows), links)):
        members.setdefault(root, []).append(index)
    return list(members.values())


def _stratum(row: dict[str, Any], strata: list[str]) -> str:
    """What a row is stratified by: its answer as cleaning compares it, or the values of its answer's `strata`."""
    if not strata:
        return answer_key(row)
    found = first_json_object(row["messages"][-1]["content"]) or {}
    return json.dumps([found.get(field) for field in strata], ensure_ascii=False)


def group_positions(rows: list[dict[str, Any]], groups: list[list[int]], seed: int) -> list[float]:
    """Each group's place in the split's order: the `hash_position` of its smallest prompt."""
    prompts = [prompt_key(row["messages"]) for row in rows]
    return [hash_position(min(prompts[i] for i in group), seed) for group in groups]


def _labels(answers: list[list[tuple[str, str]]], labelled: bool) -> list[tuple[str, str | None]]:
    """Each group's label: the kinds of its rows (`answers`: each row's kind and answer) and the answer most of them
    give (the smallest of a tie), or, unless the answers are `labelled`, None for an answer no other group of those
    kinds gives: one label for all such (a generation task's answers)."""
    given = []
    for group in answers:
        counts = Counter(answer for _, answer in group)
        kinds = "+".join(sorted({kind for kind, _ in group}))
        given.append((kinds, min(counts, key=lambda answer: (-counts[answer], answer))))
    groups = Counter(given)
    return [(kind, answer if labelled or groups[kind, answer] > 1 else None) for kind, answer in given]


def _stratified_sides(sizes: list[int], labels: list[tuple[str, str | None]], pinned: list[str | None],
                      positions: list[float], eval_fraction: float) -> list[str]:
    """Each group's side: a `pinned` one keeps its side. The others, by `positions`, are held out while their label's
    held-out rows stay within `eval_fraction` of its rows (labels of at least 1 / `eval_fraction` rows); then, while
    that brings all held-out rows nearer `eval_fraction` of all rows, the groups left (`_fill_order`, `_fill`); the
    rest train."""
    sides = list(pinned)
    by_label: dict[tuple[str, str | None], list[int]] = {}
    for group in sorted(range(len(sizes)), key=positions.__getitem__):
        by_label.setdefault(labels[group], []).append(group)
    order: dict[int, tuple] = {}
    for groups in by_label.values():
        room = _room(groups, sizes, sides, eval_fraction)
        if eval_fraction * sum(sizes[g] for g in groups) >= 1:
            room = _hold_out(groups, sizes, sides, room, lambda size, left: size <= left)
        order |= _fill_order(groups, sizes, sides, room, positions)
    _fill(sorted(order, key=order.__getitem__), sizes, labels, sides, eval_fraction)
    return [side or TRAIN for side in sides]


def _fill(order: list[int], sizes: list[int], labels: list[tuple[str, str | None]], sides: list[str | None],
          eval_fraction: float) -> None:
    """Hold out the groups of `order`, in order, while each brings all held-out rows nearer `eval_fraction` of all
    rows and leaves its label as many rows to learn from as it holds out (a row held out at least): a small label's
    one question is not held out whole to make up the others' share (a label of 4 rows trained on 1)."""
    rows, held = Counter(), Counter()
    for group, label in enumerate(labels):
        rows[label] += sizes[group]
        held[label] += sizes[group] if sides[group] == EVAL else 0
    left = eval_fraction * sum(sizes) - sum(held.values())
    for group in order:
        label = labels[group]
        if sizes[group] / 2 < left and held[label] + sizes[group] <= max(1.0, rows[label] / 2):
            sides[group], left, held[label] = EVAL, left - sizes[group], held[label] + sizes[group]


def _fill_order(groups: list[int], sizes: list[int], sides: list[str | None], room: float,
                positions: list[float]) -> dict[int, tuple]:
    """The keys ordering one label's undecided `groups` (`room` rows short of its share) for the eval share of all
    rows: first the first group bringing the label nearer its share, then one group of each label in turn, the labels
    furthest below their share (of their rows) first, and last a label's only train group, which it keeps while other
    labels can fill the share (a classification label's only row cannot be scored once it is not trained)."""
    undecided = [g for g in groups if sides[g] is None]
    spare = undecided if TRAIN in map(sides.__getitem__, groups) else undecided[:-1]
    order = {group: (2, 0, 0.0, positions[group]) for group in undecided}
    nearer = next((g for g in spare if sizes[g] / 2 < room), None)
    if nearer is not None:
        order[nearer], room = (0, 0, 0.0, positions[nearer]), room - sizes[nearer]
    rows = sum(sizes[g] for g in groups)
    for turn, group in enumerate(g for g in spare if g != nearer):
        order[group] = (1, turn, -room / rows, positions[group])
    return order


def _room(groups: Iterable[int], sizes: list[int], sides: list[str | None], eval_fraction: float) -> float:
    """How many rows the held-out rows of `groups` are short of `eval_fraction` of their rows."""
    groups = list(groups)
    return eval_fraction * sum(sizes[g] for g in groups) - sum(sizes[g] for g in groups if sides[g] == EVAL)


def _hold_out(groups: list[int], sizes: list[int], sides: list[str | None], room: float,
              fits: Callable[[int, float], bool]) -> float:
    """Hold out each undecided group of `groups`, in order, whose size `fits` the `room` left; the room then left."""
    for group in groups:
        if sides[group] is None and fits(sizes[group], room):
            sides[group], room = EVAL, room - sizes[group]
    return room


def find_leaks(
    train: list[dict[str, Any]], evaluation: list[dict[str, Any]], *,
    settings: similarity.Settings = similarity.Settings(), shared: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Eval rows whose prompt is a near (or exact) duplicate of a train prompt, each with its closest train row, eval
    rows giving a train row's distinctive answer (a paraphrase), each with that row and the answer, short eval
    prompts that are a train prompt with one word misspelt, each with that row and the word, and eval rows asking a
    train row's question in other wrapping, each with that row and the question's longest clause, and eval rows whose
    whole conversation a train row holds, answer and all (a conversation and its continuation)."""
    n_train, rows = len(train), train + evaluation
    leaks: dict[int, dict[str, Any]] = {}
    for a, b in _same_answers(rows):
        if a < n_train <= b:
            leaks[b - n_train] = {**_leak(rows[b], rows[a]), "same_answer": cell(rows[a]["messages"][-1]["content"], 80)}
    for a, b, score in _similar_prompts(rows, settings, shared):
        if a < n_train <= b and score > leaks.get(b - n_train, {}).get("similarity", -1.0):
            leaks[b - n_train] = {**_leak(rows[b], rows[a]), "similarity": round(score, 3)}
    for short, long in _held_conversations(rows):
        if long < n_train <= short and short - n_train not in leaks:
            leaks[short - n_train] = {**_leak(rows[short], rows[long]), "held_by_train_row": True}
    for a, b, misspelt in _misspelt_copies(rows, settings):
        if a < n_train <= b and b - n_train not in leaks:
            leaks[b - n_train] = {**_leak(rows[b], rows[a]), "misspelt": misspelt}
    for copy, held in wrapping.wrapped_copies(rows).items():
        trained = sorted((-len(clause), clause, group[0]) for clause, group in held.items() if group[0] < n_train)
        if copy >= n_train and trained and copy - n_train not in leaks:
            leaks[copy - n_train] = {**_leak(rows[copy], rows[trained[0][2]]),
                                     "same_question": unspaced(trained[0][1])}
    return [leaks[j] for j in sorted(leaks)]


def _leak(evaluated: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    return {"eval_id": evaluated["id"], "eval_source": evaluated["source"], "train_id": trained["id"],
            "train_source": trained["source"]}


def leak_line(leaks: list[dict[str, Any]]) -> str:
    """The leakage check's verdict in one line, naming the first leak's rows by source."""
    if not leaks:
        return NO_LEAKS
    first = leaks[0]
    evaluated, trained = f"eval row {first['eval_source']}", f"train row {first['train_source']}"
    example = (f"{evaluated} near-identical (Jaccard {first['similarity']:.2f}) to {trained}" if "similarity" in first
               else f"{evaluated} is {trained} with one word misspelt ({first['misspelt']})" if "misspelt" in first
               else f"{evaluated} asks the question of {trained} in other wrapping ('{first['same_question']}')"
               if "same_question" in first else f"{evaluated} is held whole, answer and all, by {trained}"
               if "held_by_train_row" in first else f"{evaluated} gives the answer word for word of {trained}")
    return (f"{len(leaks)} eval row(s) duplicate a train prompt, ask a train row's question in other wrapping, give "
            f"a train row's answer word for word or are held whole by a train conversation, e.g. "
            f"{example}; a new `split.seed` splits again")


def split_leaks(folder: Path, settings: similarity.Settings) -> list[dict[str, Any]]:
    """The leaks of a split written by `build_split` into `folder`, judged as cleaning and the split judged: eval rows
    and eval preference prompts near a train row's or a train preference row's prompt."""
    train_path = folder / TRAIN_FILE
    train_pairs, eval_pairs = ([as_chat(row) for row in read_preferences(folder / name)]
                               for name in (TRAIN_PREFERENCES, EVAL_PREFERENCES))
    shared = _shared_text(train_path)
    if shared is not None:
        shared = _with_preference_text(shared, train_pairs + eval_pairs, settings)
    return find_leaks(read_examples(train_path) + train_pairs, read_examples(folder / EVAL_FILE) + eval_pairs,
                      settings=settings, shared=shared)


def _shared_text(path: Path) -> np.ndarray | None:
    """The shared shingles recorded in an examples file (None when it records none)."""
    recorded = examples_metadata(path).get(SHARED_TEXT_KEY)
    return None if recorded is None else similarity.decode_shared(recorded)


def _with_preference_text(shared: np.ndarray, prompts: list[dict[str, Any]],
                          settings: similarity.Settings) -> np.ndarray:
    """`shared` and the text shared by the preference `prompts` (found among them as among the chat rows)."""
    if not prompts:
        return shared
    return np.union1d(shared, similarity.prompt_shingles(prompts, settings.shingle_words)[1])


def _previous_sides(path: Path, eval_fraction: float, seed: int) -> dict[str, str]:
    """Sides recorded by an earlier split with the same fraction and seed (else none)."""
    if not path.exists():
        return {}
    recorded = json.loads(path.read_text(encoding="utf-8"))
    same = recorded.get("eval_fraction") == eval_fraction and recorded.get("seed") == seed
    return recorded["sides"] if same else {}


def changes_said(summary: dict[str, Any]) -> str:
    """What changed since the last split (`build_split`'s summary), as a clause after its sizes ("" when nothing)."""
    said = ""
    if new := summary["new_train_rows"] + summary["new_eval_rows"]:
        said += (f"; {new} new since the last split ({summary['new_train_rows']} train, {summary['new_eval_rows']} "
                 "eval), the others on their sides")
    if gone := summary["gone_train_rows"] + summary["gone_eval_rows"]:
        said += (f"; {gone} of the last split's rows left it ({summary['gone_train_rows']} train, "
                 f"{summary['gone_eval_rows']} eval): cleaning removed them, or the raw files no longer hold them")
    return said


def stock_answer(rows: list[dict[str, Any]], every_turn: bool = False) -> str | None:
    """Said when one answer ends STOCK_ANSWER_SHARE of the train `rows` or more (at least STOCK_ANSWER_ROWS), or with
    `every_turn` (every assistant turn learnt) is that share of their assistant turns: in a generation task a closing
    "You are welcome." or a greeting would be most of what is learnt; else None."""
    answers = [m["content"] for row in rows for m in (row["messages"] if every_turn else row["messages"][-1:])
               if m["role"] == "assistant"]
    counts = Counter(map(canonical, answers))
    answer, count = counts.most_common(1)[0] if counts else ("", 0)
    if count < max(STOCK_ANSWER_ROWS, STOCK_ANSWER_SHARE * len(answers)):
        return None
    written = next(text for text in answers if canonical(text) == answer)
    quoted = f"({written[:60]!r}{'...' if len(written) > 60 else ''})"
    if every_turn:
        return (f"{count} of the {len(answers)} assistant turns the train rows teach ({count / len(answers):.0%}) are "
                f"the same answer {quoted}: with training.every_turn every assistant turn is learnt, so this answer "
                "is much of what the model learns; take such turns out of the rows, or learn final turns only "
                "(training.every_turn: false) where those vary more")
    ending = [row for row in rows if canonical(row["messages"][-1]["content"]) == answer]
    multi_turn = any(sum(m["role"] == "assistant" for m in row["messages"]) > 1 for row in ending)
    advice = ("only a row's final assistant message is learnt, so this answer is much of what the model learns; learn "
              "every assistant turn of multi-turn rows (training.every_turn: true), or give each turn worth learning a "
              "row of its own" if multi_turn else "the model learns to give it to much of what it is asked; keep as "
              "many of these rows as there are questions it is the right reply to, or leave them out")
    return (f"{count} of {len(answers)} train rows ({count / len(answers):.0%}) end with the same answer {quoted}: "
            f"{advice}")


def with_default_system_prompt(preferences: list[dict[str, Any]],
                               train: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(the preference rows, those whose prompt starts without a system message given the one more than half the chat
    train rows start with: the task's default, which serving adds too; how many got it)."""
    default = common_system_prompt([row["messages"] for row in train])[0] if train else None
    bare = [row["prompt"][0]["role"] != "system" for row in preferences]
    if default is None or not any(bare):
        return preferences, 0
    return [{**row, "prompt": with_system_prompt(row["prompt"], default)} for row in preferences], sum(bare)


def build_split(examples_path: Path, out_dir: Path, *, eval_fraction: float, seed: int,
                settings: similarity.Settings = similarity.Settings(), labelled: bool = False,
                categories: Callable[[list[str]], dict[str, Counter]] | None = None) -> dict[str, Any]:
    """Write `train.parquet`, `eval.parquet`, `train_preferences.parquet`, `eval_preferences.parquet` (the rows of
    `preferences.parquet` beside `examples_path`, none without it) and `split.json` (every id's side) into `out_dir`.

    The shared text cleaning left out (recorded in the examples file) is left out here too, and recorded again
    in both halves for the leakage check; preference prompts are compared leaving out their own shared text too.
    `labelled`: the answers are a classification's labels (see `assign_sides`). `categories`: the task type's fields
    of categories in the answers (`TaskMetrics.categories`): the one of the fewest values stratifies the split in
    place of the whole answers (several would cut it into strata too small to hold out in their share).
    """
    rows = sorted(read_examples(examples_path), key=lambda r: (r["id"], r["source"]))
    fields = categories([row["messages"][-1]["content"] for row in rows]) if categories else {}
    strata = [min(fields, key=lambda field: (len(fields[field]), field))] if fields else []  # the coarsest
    preferences_path = examples_path.parent / PREFERENCES
    pairs = sorted(read_preferences(preferences_path), key=lambda r: (r["id"], r["source"]))
    shared = _shared_text(examples_path)
    if shared is None:
        shared = similarity.prompt_shingles(rows, settings.shingle_words)[1]
    metadata = {SHARED_TEXT_KEY: similarity.encode_shared(shared)}
    previous = _previous_sides(out_dir / SPLIT_RECORD, eval_fraction, seed)
    prompts = [as_chat(row) for row in pairs]
    sides = assign_sides(rows + prompts, eval_fraction=eval_fraction, seed=seed, previous=previous, settings=settings,
                         shared=_with_preference_text(shared, prompts, settings), labelled=labelled,
                         kinds=["chat"] * len(rows) + ["preference"] * len(prompts), strata=strata)
    train, evaluation = ([row for row in rows if sides[row["id"]] == side] for side in (TRAIN, EVAL))
    pairs, given = with_default_system_prompt(pairs, train)
    train_pairs, eval_pairs = ([row for row in pairs if sides[row["id"]] == side] for side in (TRAIN, EVAL))
    new = [sides[row["id"]] for row in rows + pairs if row["id"] not in previous] if previous else []
    gone = [side for row_id, side in previous.items() if row_id not in sides]
    summary = {"train_rows": len(train), "eval_rows": len(evaluation),
               "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
               "unpaired_train_rows": sum(not is_paired(row) for row in train_pairs),
               "unpaired_eval_rows": sum(not is_paired(row) for row in eval_pairs),
               "preference_rows_given_system_prompt": given,
               "new_train_rows": new.count(TRAIN), "new_eval_rows": new.count(EVAL),
               "gone_train_rows": gone.count(TRAIN), "gone_eval_rows": gone.count(EVAL)}
    inputs = {"deduplicated_examples": file_sha256(examples_path)[:16], "eval_fraction": eval_fraction, "seed": seed,
              **({"labelled": True} if labelled else {}), **({"strata": strata} if strata else {}),
              "deduplicated_preferences": file_sha256(preferences_path)[:16] if preferences_path.is_file() else None,
              "preference_system_prompt": "the chat train rows' default where a prompt has none"}
    record = {"eval_fraction": eval_fraction, "seed": seed,
              "sides": {row["id"]: sides[row["id"]] for row in rows + pairs}}
    produced = {"train": TRAIN_FILE, "eval": EVAL_FILE, "train_preferences": TRAIN_PREFERENCES,
                "eval_preferences": EVAL_PREFERENCES, "sides": SPLIT_RECORD}
    with atomic_dir(out_dir) as tmp:
        write_examples(train, tmp / TRAIN_FILE, metadata)
        write_examples(evaluation, tmp / EVAL_FILE, metadata)
        write_preferences(train_pairs, tmp / TRAIN_PREFERENCES)
        write_preferences(eval_pairs, tmp / EVAL_PREFERENCES)
        (tmp / SPLIT_RECORD).write_text(json.dumps(record, indent=0, sort_keys=True), encoding="utf-8")
        Result("heldout_split", reuse_key(inputs, settings), produced, inputs, summary).write(tmp)
    return summary
