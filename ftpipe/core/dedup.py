"""Exact-duplicate, contradiction and near-duplicate removal, every removed row kept with its reason.

Exact stages compare the canonical text (`text.canonical`) of whole prompts and conversations. The near stage
compares what varies between rows (`similarity`): rows whose prompts are near-identical either agree on the
answer (near-duplicates: the later row goes, naming a kept row it is itself similar to, so nothing chains) or
disagree (a contradiction: the strict-majority answer stays, otherwise the whole group goes; in a free-text task,
where two answers can both be right, the first row written stays instead). Two rows whose answers
differ only in words their own prompts have and the other's has not (an order number, a date, the word that decides
the label; or a form of it, `cancelled` for cancel; a name a reply greets aside), or whose answers each take up the
words setting their prompts apart, are two examples of one rule: neither duplicates nor a contradiction, both stay.
So are two rows whose near-identical prompts differ in a number (a price, a quantity: a template's problems, numbers
read with their signs and decimals) or an operator (`12 + 7`, `12 * 7`; `a // b`, `a / b`) and whose answers differ,
however alike their words where the answers differ in a number or an operator too; and two rows whose prompts hold
their words in another order (from Boston to Denver, from Denver to Boston) and whose answers differ at all.
Exact-prompt answers are compared as `loose` text, so `#### 325.` and `#### 325` are one answer (and the near stage
finds the second row a near-duplicate of the first). Answers alike in their words are still two where their `terms`
differ: a number, or in code an operator (`= 3057`, `!= 3057`), a string literal or a block's indentation. Only the
rows asking the same thing vote in a contradiction, not a template's other problems beside it. An answer that is a
JSON object is compared by its value, so two that differ only in key order or spacing are one answer and two that
differ in one field's value are two (however alike their text); so is a label written two ways that is one label
(`Order Status`, `order_status`). The rows keep their answers as written.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import regex

from ftpipe.core import similarity
from ftpipe.core.evaluation.metrics.base import first_json_object
from ftpipe.core.evaluation.metrics.final_answer import comparable_final_answer
from ftpipe.core.evaluation.statistics import chance_of_at_least
from ftpipe.core.records import (
    common_system_prompt, read_examples, source_order, user_message, write_examples, write_jsonl,
)
from ftpipe.core.results import Result, read_result, reuse_key
from ftpipe.core.layout import EXAMPLES, PREFERENCES, REMOVED
from ftpipe.core.storage import atomic_dir, file_sha256
from ftpipe.core.terms import CODE, Terms, code_terms, terms
from ftpipe.core.text import canonical, canonical_codes, loose, loose_words, whole_json_object, word_parts

if TYPE_CHECKING:
    from ftpipe.core.evaluation.metrics.base import TaskMetrics

SHARED_TEXT_KEY = "ftpipe.shared_shingles"  # parquet metadata: the shared shingles the near stage left out
MATCH_EXAMPLES = 3  # of each label (and in all, without labels)
UNEVEN_REMOVAL = 0.01  # a label's removals are named when chance would take as many less often than this
NO_LABEL = "(no label)"  # the label of a row whose answer gives none, in the counts by label
MATCH_COLUMNS = ("label", "reason", "removed_message", "removed_answer", "matched_message", "matched_answer", "detail")
COUNTS = ("rows_in", "rows_out", "exact_duplicates", "near_duplicates", "contradictions")


def prompt_key(messages: list[dict[str, str]]) -> str:
    """The normalised conversation up to (not including) the final answer: one `role: canonical text` line per
    message."""
    return "\n".join(f"{m['role']}: {canonical(m['content'])}" for m in messages[:-1])


@dataclass(frozen=True)
class ExactKeys:
    """Per row, an id of its normalised prompt and of its normalised answer (`_written_codes`): equal ids, equal
    texts."""

    prompt: np.ndarray
    answer: np.ndarray

    @classmethod
    def of(cls, rows: list[dict[str, Any]], prompts: similarity.Messages) -> ExactKeys:
        """The keys of `rows`, whose prompt messages are `prompts` (each distinct message normalised once)."""
        roles = pd.factorize(np.array([role for role, _ in prompts.distinct], dtype=object))[0]
        texts = _written_codes([text for _, text in prompts.distinct])
        message_ids = texts * (int(roles.max(initial=0)) + 1) + roles
        return cls(prompts.row_ids(message_ids), _written_codes([row["messages"][-1]["content"] for row in rows]))

    def conversation(self) -> np.ndarray:
        return self.prompt * (int(self.answer.max(initial=0)) + 1) + self.answer


def _written_codes(texts: list[str]) -> np.ndarray:
    """`canonical_codes`, texts apart in their `code_terms` as written (`= 'Smith'`, `= 'smith'`) apart too (Arrow
    finds the texts that may have any in bulk)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    coded = pc.match_substring_regex(pa.array(texts, type=pa.large_string()), CODE).to_numpy(zero_copy_only=False)
    written = pd.factorize(pd.Series([code_terms(text) if code else "" for text, code in zip(texts, coded)],
                                     dtype=object))[0]
    return canonical_codes(texts) * (int(written.max(initial=0)) + 1) + written


@dataclass
class DedupResult:
    kept: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    shared: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))  # shingles left out

    def count(self, reason: str) -> int:
        return sum(1 for row in self.removed if row["reason"] == reason)


def removal(row: dict[str, Any], reason: str, of: dict[str, Any], detail: str) -> dict[str, Any]:
    return {**row, "reason": reason, "duplicate_of": of["id"], "duplicate_of_source": of["source"], "detail": detail}


NAME = regex.compile(r"(?<=\p{L}[^\S\n]*[,;]?[^\S\n]+)\p{Lu}\p{Ll}+")  # capitalised after a word: no sentence start
FORM_STEM = 4  # a word starting with a word of this many letters or more may be a form of it (`renewed`, `renew`)
FIRST_WORDING = "a free-text task keeps the first row written"
LABEL_SPELLINGS = "a label's spelling"  # what answers compared as their labels leave aside
FINAL_ANSWERS = "a worked solution's steps: its final answer compared"  # ...and as their final answers


def _contradiction(row: dict[str, Any], answer: str, group: list[tuple[dict[str, Any], str]], votes: Counter,
                   free_text: bool):
    """The removal record for `row` if its answer loses in its prompt group (in file order), else None."""
    (winner, top), = votes.most_common(1)
    majority = top * 2 > len(group)
    tie = f"{len(votes)} different answers to the same prompt, none with a strict majority"
    if not majority and not free_text:
        return removal(row, "contradiction", next(r for r, a in group if a != answer), tie)
    winner = winner if majority else group[0][1]
    if answer == winner:
        return None
    detail = f"answer differs from the majority ({top} of {len(group)} rows)" if majority else f"{tie}: {FIRST_WORDING}"
    return removal(row, "contradiction", next(r for r, a in group if a == winner), detail)


def _resolve_contradictions(rows: list[dict[str, Any]], keys: ExactKeys, removed: list[dict[str, Any]],
                            free_text: bool) -> np.ndarray:
    """Same prompt, different answers (as `loose` and `terms` compare them: `#### 325.` and `#### 325` are one answer,
    `= 3` and `!= 3` two): keep the strict-majority answer's rows, else drop the group (`free_text`: keep its first
    row). Returns the indices of the rows that stay."""
    alive = np.ones(len(rows), dtype=bool)
    grouped = np.flatnonzero(np.bincount(keys.prompt)[keys.prompt] > 1)  # rows whose prompt another row has too
    order = grouped[np.argsort(keys.prompt[grouped], kind="stable")]
    for members in np.split(order, np.flatnonzero(np.diff(keys.prompt[order])) + 1):
        if len(set(keys.answer[members].tolist())) < 2:
            continue
        group = [(rows[i], (loose(answer), terms(answer))) for i in members
                 for answer in [rows[i]["messages"][-1]["content"]]]
        votes = Counter(answer for _, answer in group)
        for index, (row, answer) in zip(members, group):
            removal = _contradiction(row, answer, group, votes, free_text)
            if removal:
                removed.append(removal)
                alive[index] = False
    return np.flatnonzero(alive)


def _remove_exact(rows: list[dict[str, Any]], keys: ExactKeys, alive: np.ndarray, removed: list[dict[str, Any]],
                  normalised: str) -> np.ndarray:
    """The first of rows with the same conversation stays (`normalised`: what may differ, for the removal's detail);
    returns the indices that stay."""
    conversation = keys.conversation()[alive]
    _, first = np.unique(conversation, return_index=True)
    is_first = np.zeros(len(alive), dtype=bool)
    is_first[first] = True
    first_of = dict(zip(conversation[first].tolist(), alive[first].tolist()))
    for index, conv in zip(alive[~is_first].tolist(), conversation[~is_first].tolist()):
        kept = rows[first_of[conv]]
        removed.append(removal(rows[index], "exact_duplicate", kept, "the same conversation, character for character "
                               "(so the same id)" if kept["id"] == rows[index]["id"] else "the same conversation after "
                               f"normalisation ({normalised})"))
    return alive[is_first]


class NearRows:
    """The rows of the near stage: which prompts are near-identical (on what varies) and how alike their answers are."""

    def __init__(self, rows: list[dict[str, Any]], prompts: similarity.Shingles, answers: np.ndarray,
                 settings: similarity.Settings, as_written: dict[str, list[dict]] | None = None):
        self.rows = rows
        self.as_written = as_written or {}  # the messages of rows whose answers are compared otherwise written
        self.answers = answers  # equal ids: equal normalised answers
        self.settings = settings
        pairs = similarity.prompt_pairs(prompts, lambda index: similarity.prompt_words(rows[index]["messages"]),
                                        settings, answers)
        self.similar = similarity.neighbours(len(rows), [pair for pair in pairs if self.turn_for_turn(*pair[:2])])
        self._word_sets: dict[int, tuple[set[str], set[str]]] = {}
        self._prompt_words: dict[int, list[str]] = {}
        self._answer_names: dict[int, set[str]] = {}
        self._objects: dict[int, bool] = {}
        self._term_sets: dict[int, tuple[Terms, Terms]] = {}
        self._compared_terms: dict[int, Terms] = {}

    def turn_for_turn(self, a: int, b: int) -> bool:
        """Conversations of several user turns are near-identical only turn for turn: as many messages (system
        messages aside), and last user messages (what the answer answers) near-identical in their words too; shared
        earlier turns are not enough."""
        first, second = self.rows[a]["messages"], self.rows[b]["messages"]
        if sum(m["role"] == "user" for m in first) == sum(m["role"] == "user" for m in second) == 1:
            return True
        if sum(m["role"] != "system" for m in first) != sum(m["role"] != "system" for m in second):
            return False
        words = [set(loose_words(user_message(messages))) for messages in (first, second)]
        return len(words[0] & words[1]) >= self.settings.threshold * max(len(words[0] | words[1]), 1)

    @cached_property
    def _answer_shingles(self) -> tuple[dict[int, int], similarity.Shingles]:
        """The answers' shingles of the rows with a near-identical prompt (only theirs are compared), and where
        each row's are."""
        paired = [index for index, similar in enumerate(self.similar) if similar]
        position = {index: at for at, index in enumerate(paired)}
        return position, similarity.answer_shingles([self.rows[i] for i in paired], self.settings.shingle_words)

    def answer_jaccard(self, a: int, b: int) -> float:
        if self.answers[a] == self.answers[b]:
            return 1.0
        position, shingles = self._answer_shingles
        return shingles.jaccard(position[a], position[b])

    def same_answer(self, a: int, b: int) -> bool:
        """Near-identical answers with the same terms (`= 3057` is not `!= 3057`); JSON objects only when equal by
        value (one field changed is another answer)."""
        if self.answers[a] == self.answers[b]:
            return True
        if self._is_object(a) or self._is_object(b) or self._answer_terms(a) != self._answer_terms(b):
            return False
        return self.answer_jaccard(a, b) >= self.settings.threshold

    def _answer_terms(self, index: int) -> Terms:
        """The `terms` of a row's answer as compared."""
        if index not in self._compared_terms:
            self._compared_terms[index] = terms(self.rows[index]["messages"][-1]["content"])
        return self._compared_terms[index]

    def _is_object(self, index: int) -> bool:
        if index not in self._objects:
            self._objects[index] = whole_json_object(self.rows[index]["messages"][-1]["content"]) is not None
        return self._objects[index]

    def answers_follow_prompts(self, a: int, b: int) -> bool:
        """The answers differ, and only in words of their own prompt that the other prompt lacks (or a form of such a
        word: `cancelled` for `cancel`), the names a reply greets aside (`Hi Hugo,`)."""
        if self.answers[a] == self.answers[b]:
            return False
        (answer_a, prompt_a), (answer_b, prompt_b) = self._words(a), self._words(b)
        own_a, own_b = answer_a - answer_b - self._names(a), answer_b - answer_a - self._names(b)
        return bool(own_a or own_b) and _forms_of(own_a, prompt_a - prompt_b) and _forms_of(own_b, prompt_b - prompt_a)

    def answers_take_up_differences(self, a: int, b: int) -> bool:
        """Each prompt has words the other lacks, and its own answer holds each of them or a form of it: the answers
        take up what sets the prompts apart (`please cancel my subscription`: `I have cancelled…`; `please renew my
        subscription`: `I have renewed…`), however else they differ."""
        (answer_a, prompt_a), (answer_b, prompt_b) = self._words(a), self._words(b)
        own_a, own_b = prompt_a - prompt_b, prompt_b - prompt_a
        return bool(own_a) and bool(own_b) and _held(own_a, answer_a) and _held(own_b, answer_b)

    def answered_apart(self, a: int, b: int) -> bool:
        """The answers differ as the prompts do (`answers_follow_prompts`, `answers_take_up_differences`)."""
        return self.answers_follow_prompts(a, b) or (self.answers[a] != self.answers[b]
                                                      and self.answers_take_up_differences(a, b))

    def _names(self, index: int) -> set[str]:
        """The words a row's answer writes as names within a sentence that its prompt lacks: a customer a reply greets
        or signs to (`Hi Hugo,`), whom another row's reply to the same question names otherwise."""
        if index not in self._answer_names:
            answer = self.rows[index]["messages"][-1]["content"]
            self._answer_names[index] = {name.lower() for name in NAME.findall(answer)} - self._words(index)[1]
        return self._answer_names[index]

    def _words(self, index: int) -> tuple[set[str], set[str]]:
        """(the words of a row's answer, of its prompt but the system message)."""
        if index not in self._word_sets:
            self._word_sets[index] = (set(word_parts(self.rows[index]["messages"][-1]["content"])),
                                      set(self._prompt_order(index)))
        return self._word_sets[index]

    def _prompt_order(self, index: int) -> list[str]:
        """The words of a row's prompt but the system message, in order."""
        if index not in self._prompt_words:
            self._prompt_words[index] = word_parts(similarity.prompt_text(self.rows[index]["messages"]))
        return self._prompt_words[index]

    def prompts_reordered(self, a: int, b: int) -> bool:
        """The prompts hold the words they share in another order (`from largest to smallest`, `from smallest to
        largest`; `a minus b`, `b minus a`): the order can decide the answer."""
        shared = set(self._prompt_order(a)) & set(self._prompt_order(b))
        first, second = ([word for word in self._prompt_order(index) if word in shared] for index in (a, b))
        return first != second and sorted(first) == sorted(second)

    def _terms(self, index: int) -> tuple[Terms, Terms]:
        """(the `terms` of a row's answer as written, of its prompt but the system message)."""
        if index not in self._term_sets:
            messages = self.as_written.get(self.rows[index]["id"], self.rows[index]["messages"])
            self._term_sets[index] = terms(messages[-1]["content"]), terms(similarity.prompt_text(messages))
        return self._term_sets[index]

    def prompts_differ_in_a_term(self, a: int, b: int) -> bool:
        """The prompts differ in a number or an operator: a price, a quantity or `12 * 7` for `12 + 7` can decide the
        answer."""
        return self._terms(a)[1] != self._terms(b)[1]

    def terms_follow_prompts(self, a: int, b: int) -> bool:
        """The prompts differ in a term and so do the answers: a template's problems, each with its own result."""
        return self.prompts_differ_in_a_term(a, b) and self._terms(a)[0] != self._terms(b)[0]

    def prompts_apart(self, a: int, b: int) -> bool:
        """The prompts differ in a term or in the order of their words: either can decide the answer."""
        return self.prompts_differ_in_a_term(a, b) or self.prompts_reordered(a, b)

    def same_problem(self, a: int, b: int) -> bool:
        """Near-identical prompts asking one thing: not apart (`prompts_apart`), nor answered apart where they
        differ."""
        return not self.prompts_apart(a, b) and not self.answered_apart(a, b)

    def consistent(self, a: int, b: int) -> bool:
        """The answers agree, differ only where the prompts do, or may differ because the prompts are apart."""
        return self.same_answer(a, b) or self.answered_apart(a, b) or self.prompts_apart(a, b)

    def repeats(self, a: int, b: int) -> bool:
        """Row `b` repeats row `a`: near-identical answers, which differ neither where the prompts do, nor in a term
        where the prompts differ in one, nor at all where the prompts hold their words in another order."""
        return (self.same_answer(a, b) and not self.answered_apart(a, b) and not self.terms_follow_prompts(a, b)
                and (self.answers[a] == self.answers[b] or not self.prompts_reordered(a, b)))

    def answer_camps(self, group: list[int]) -> list[list[int]]:
        """`group` split by answer: each row joins the first camp whose first answer is consistent with its own."""
        camps: list[list[int]] = []
        for index in group:
            camp = next((c for c in camps if self.consistent(c[0], index)), None)
            camps.append([index]) if camp is None else camp.append(index)
        return camps


def _forms_of(words: set[str], given: set[str]) -> bool:
    """Every word of `words` is one of `given` or a form of one (`cancelled` of `cancel`: it starts with a word of
    FORM_STEM letters or more)."""
    return all(word in given or any(len(stem) >= FORM_STEM and word.startswith(stem) for stem in given)
               for word in words)


def _held(words: set[str], given: set[str]) -> bool:
    """Every word of `words` is one of `given` or has a form among them (`cancel`: `cancelled`)."""
    return all(word in given or len(word) >= FORM_STEM and any(found.startswith(word) for found in given)
               for word in words)


def _resolve_near_contradictions(near: NearRows, alive: list[bool], removed: list[dict[str, Any]],
                                  free_text: bool) -> None:
    """Near-identical prompts, different answers: around each row in turn, the rows whose prompts are directly
    near-identical to its own and ask the same (`NearRows.same_problem`) vote; the strict-majority answer's rows stay,
    otherwise all of them go (`free_text`: the rows with the answer of the first row written stay)."""
    for center, similar in enumerate(near.similar):
        if not alive[center] or not similar:
            continue
        camps = near.answer_camps([center, *sorted(i for i in similar if alive[i] and near.same_problem(center, i))])
        if len(camps) < 2:
            continue
        size = sum(map(len, camps))
        top = max(camps, key=len)
        majority = len(top) * 2 > size
        winner = top if majority else min(camps, key=min) if free_text else None
        vote = (f"answer differs from the majority ({len(top)} of {size} rows)" if majority else
                f"{len(camps)} different answers to near-identical prompts, none with a strict majority"
                + (f": {FIRST_WORDING}" if free_text else ""))
        camp_of = {index: number for number, camp in enumerate(camps) for index in camp}
        for camp in camps:
            for index in [] if camp is winner else camp:
                removed.append(_near_contradiction(near, index, center, camp_of, camps.index(winner or top), vote))
                alive[index] = False


def _near_contradiction(near: NearRows, index: int, center: int, camp_of: dict[int, int], top: int, vote: str):
    """The removal record of `index`, naming a row with another answer whose prompt is directly near-identical to
    its own (one of the majority first); a row agreeing with the center that has none such names the center."""
    others = sorted((i for i in near.similar[index] if camp_of.get(i, camp_of[index]) != camp_of[index]),
                    key=lambda i: (camp_of[i] != top, i))
    if others:
        detail = f"prompt near-identical (Jaccard {near.similar[index][others[0]]:.2f}) to one with another answer; "
        return removal(near.rows[index], "contradiction", near.rows[others[0]], detail + vote)
    detail = f"agrees with a near-identical prompt (Jaccard {near.similar[index][center]:.2f}) whose group "
    return removal(near.rows[index], "contradiction", near.rows[center], detail + vote)


def _remove_near_duplicates(near: NearRows, alive: list[bool], removed: list[dict[str, Any]]) -> None:
    """A row whose prompt and answer are both near-identical to a kept earlier row's goes, naming that row, unless
    the answers differ where the prompts do (`NearRows.repeats`)."""
    for index, similar in enumerate(near.similar):
        if not alive[index]:
            continue
        matches = [(score, other) for other, score in similar.items() if other < index and alive[other]
                   and near.repeats(other, index)]
        if matches:
            score, other = max(matches, key=lambda match: (match[0], -match[1]))  # most alike, then first
            detail = f"prompt Jaccard {score:.2f}, answer Jaccard {near.answer_jaccard(other, index):.2f}"
            removed.append(removal(near.rows[index], "near_duplicate", near.rows[other], detail))
            alive[index] = False


def _remove_near(rows: list[dict[str, Any]], prompts: similarity.Shingles, answers: np.ndarray,
                 removed: list[dict[str, Any]], settings: similarity.Settings, free_text: bool,
                 as_written: dict[str, list[dict]]) -> list[dict[str, Any]]:
    near = NearRows(rows, prompts, answers, settings, as_written)
    alive = [True] * len(rows)
    _resolve_near_contradictions(near, alive, removed, free_text)
    _remove_near_duplicates(near, alive, removed)
    return [row for row, keep in zip(rows, alive) if keep]


def deduplicate(rows: list[dict[str, Any]], settings: similarity.Settings = similarity.Settings(),
                free_text: bool = False, spelt: Callable[[str], str] | None = None,
                kept_before: frozenset[str] = frozenset(), spelt_aside: str = LABEL_SPELLINGS) -> DedupResult:
    """Remove exact-prompt contradictions, then exact duplicates, then near-prompt contradictions and
    near-duplicates. In a `free_text` task (answers in the user's own words) two different answers to one prompt can
    both be right: a group without a majority keeps its first row written instead of none. Answers are compared as
    `spelt` writes them (a label in the one spelling it is trained in, a worked solution as its final answer: what
    `spelt_aside` says it leaves aside), the rows kept and removed as written.

    Rows are processed in the order of the task's files (`records.source_order`), the rows of `kept_before` (ids the
    last cleaning kept) first, and the first row of each group is kept: a row kept before stays (a new file's copy of
    it never takes its place, nor its side of the split), else the row a user wrote first, and the result does not
    depend on the order of the input.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived strings; the collector alone costs a third of the time
    try:
        return _deduplicate(rows, settings, free_text, spelt, kept_before, spelt_aside)
    finally:
        if gc_was_enabled:
            gc.enable()


def _deduplicate(rows: list[dict[str, Any]], settings: similarity.Settings, free_text: bool,
                 spelt: Callable[[str], str] | None, kept_before: frozenset[str], spelt_aside: str) -> DedupResult:
    """Shared text is judged on every row (the most evidence); the near stage compares the rows the exact stages
    left, on what varies."""
    as_written = {}
    ordered = [_comparable(row, as_written, spelt)
               for row in sorted(rows, key=lambda row: (row["id"] not in kept_before, source_order(row)))]
    messages = similarity.Messages.of([similarity.prompt_parts(row["messages"]) for row in ordered],
                                      settings.shingle_words)
    result = DedupResult(shared=messages.shared(similarity.source_files(ordered)))
    keys = ExactKeys.of(ordered, messages)
    stay = _resolve_contradictions(ordered, keys, result.removed, free_text)
    normalised = "Unicode forms, case, spacing, JSON key order" + (f", {spelt_aside}" if spelt else "")
    remaining = _remove_exact(ordered, keys, stay, result.removed, normalised)
    prompts = messages.rows(result.shared, remaining)
    result.kept = _remove_near([ordered[i] for i in remaining.tolist()], prompts, keys.answer[remaining],
                               result.removed, settings, free_text, as_written)
    if as_written:
        result.kept, result.removed = ([{**row, "messages": as_written.get(row["id"], row["messages"])}
                                        for row in found] for found in (result.kept, result.removed))
    return result


def comparable_answer(answer: str) -> str:
    """An answer that is a JSON object written as its value sorted by key, so key order and spacing do not make two
    answers differ; any other answer as it is."""
    value = whole_json_object(answer)
    return answer if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False)


def answer_key(row: dict[str, Any]) -> str:
    """A row's answer as cleaning compares answers: a JSON object by its value, case and spacing aside."""
    return canonical(comparable_answer(row["messages"][-1]["content"]))


def _comparable(row: dict[str, Any], as_written: dict[str, list[dict]],
                spelt: Callable[[str], str] | None) -> dict[str, Any]:
    """`row` with the `comparable_answer` of its answer as `spelt` writes it, its messages as written kept in
    `as_written` by row id when that changed its answer."""
    answer = row["messages"][-1]["content"]
    compared = comparable_answer(spelt(answer) if spelt else answer)
    if compared == answer:
        return row
    as_written[row["id"]] = row["messages"]
    return {**row, "messages": [*row["messages"][:-1], {**row["messages"][-1], "content": compared}]}


def _final_answer(task: TaskMetrics, answer: str) -> str:
    """An answer as cleaning compares it in a task that checks final answers: its final answer (the whole answer
    where it has none)."""
    final = task.final_answer(answer)
    return answer if final is None else comparable_final_answer(final)


def _label(row: dict[str, Any], label_of: Callable[[str], str | None] | None) -> str:
    return (label_of(row["messages"][-1]["content"]) or NO_LABEL) if label_of else ""


def removed_by_label(rows: list[dict[str, Any]], removed: list[dict[str, Any]],
                     label_of: Callable[[str], str | None]) -> dict[str, dict[str, int]]:
    """For each label (of the rows' answers), how many rows came in and how many cleaning removed."""
    totals = Counter(_label(row, label_of) for row in rows)
    gone = Counter(_label(row, label_of) for row in removed)
    return {name: {"rows_in": totals[name], "removed": gone[name]} for name in sorted(totals)}


def matched_examples(rows: list[dict[str, Any]], removed: list[dict[str, Any]],
                     label_of: Callable[[str], str | None] | None = None,
                     per_label: int = MATCH_EXAMPLES) -> list[dict[str, str]]:
    """Removed near-duplicates and contradictions next to the rows they matched (user message, answer), up to
    `per_label` of each label (of `per_label` in all without labels)."""
    by_id = {row["id"]: row for row in rows}
    shown: Counter = Counter()
    found = []
    for r in (r for r in removed if r["reason"] != "exact_duplicate"):
        label = _label(r, label_of)
        if shown[label] < per_label:
            shown[label] += 1
            matched = by_id[r["duplicate_of"]]["messages"]
            found.append(dict(zip(MATCH_COLUMNS, (
                label, r["reason"], user_message(r["messages"]), r["messages"][-1]["content"], user_message(matched),
                matched[-1]["content"], r["detail"]))))
    return found


def match_columns(summary: dict[str, Any]) -> list[str]:
    """The columns of a build summary's `matched_examples` worth showing: no label column for a task without labels."""
    return list(MATCH_COLUMNS if summary["removed_by_label"] else MATCH_COLUMNS[1:])


def build_deduplicated(examples_path: Path, out_dir: Path, settings: similarity.Settings = similarity.Settings(),
                       free_text: bool = False, labels: TaskMetrics | None = None,
                       label_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """Deduplicate `examples_path` into `out_dir/examples.parquet`, and the preference rows beside it into
    `out_dir/preferences.parquet`, every removed row of either kind into `out_dir/removed.jsonl` (with a result);
    return the counts (`rows_in`, `rows_out`: chat rows; the removals of both kinds). For a task type with labels
    (`labels`), the labels of the kept rows and preference rows are written one way each (`label_spellings`: as
    `label_names` writes them, else as the last cleaning in `out_dir` did where rows still write them so), the
    removals are counted by label, so written, and the kept labels that look like typos of commoner ones are named
    (for an extraction, the values of its fields that hold categories)."""
    from ftpipe.core.label_spellings import (
        Spellings, answers, likely_misspellings, likely_misspelt_values, unnamed_labels,
    )
    from ftpipe.core.preference_cleaning import build_clean_preferences
    from ftpipe.core.preferences import read_preferences

    rows, preferences = read_examples(examples_path), examples_path.parent / PREFERENCES
    pairs = read_preferences(preferences)
    last = _last_kept(out_dir)
    spellings = (Spellings.of(answers(rows, pairs), labels, [row["messages"][-1]["content"] for row in last],
                              label_names) if labels and labels.labelled else None)
    finals = labels is not None and labels.checks_answers
    compared = spellings.spelt if spellings else partial(_final_answer, labels) if finals else None
    result = deduplicate(rows, settings, free_text and not finals, compared, frozenset(row["id"] for row in last),
                         FINAL_ANSWERS if finals else LABEL_SPELLINGS)
    label_of = spellings.label if spellings else None
    kept, respelled = spellings.respell(result.kept) if spellings else (result.kept, [])
    summary = {
        "rows_in": len(rows),
        "rows_out": len(result.kept),
        "exact_duplicates": result.count("exact_duplicate"),
        "near_duplicates": result.count("near_duplicate"),
        "contradictions": result.count("contradiction"),
        "shared_text_shingles": len(result.shared),
        "removed_by_label": removed_by_label(rows, result.removed, label_of) if label_of else {},
        "matched_examples": matched_examples(rows, result.removed, label_of),
        "label_spellings": respelled,
    }
    kept_answers = [row["messages"][-1]["content"] for row in kept]
    categories = labels.categories(kept_answers) if labels else {}
    summary["type_slips"] = [{**slip, "first": f"{kept[slip['first'][0]]['source']}: "
                                               f"{json.dumps(slip['first'][1], ensure_ascii=False)}"}
                             for slip in (labels.type_slips(kept_answers) if labels else [])]
    uncomputed = labels.uncomputed_final_answers(kept_answers) if labels else []
    summary["uncomputed_final_answers"] = len(uncomputed)
    summary["first_uncomputed_final_answer"] = (f"{kept[uncomputed[0][0]]['source']}: {uncomputed[0][1]!r} after "
                                                f"{uncomputed[0][2]!r}" if uncomputed else None)
    kept_labels = {label: counts["rows_in"] - counts["removed"]
                   for label, counts in summary["removed_by_label"].items()}
    summary["likely_misspellings"] = _with_first_rows(
        likely_misspelt_values(categories) if categories else likely_misspellings(kept_labels), kept, label_of)
    summary["labels_not_named"] = unnamed_labels(kept_labels, label_names, summary["likely_misspellings"])
    inputs = {"raw_examples": file_sha256(examples_path)[:16], "json_answers": "compared by value",
              "multi_turn": "near-identical turn for turn", "terms": "numbers, operators, string literals, blocks",
              "raw_preferences": file_sha256(preferences)[:16] if preferences.is_file() else None,
              "preference_prompts": "compared with the chat rows' system prompt where they have none",
              **({"free_text": True} if free_text else {}), **({"compared": FINAL_ANSWERS} if finals else {}),
              **({"labels": {"label_field": labels.config.label_field, "respelled": "chat and preference answers",
                            "compared": "respelled",
                            **({"named": list(label_names), "typos": "respelled as named"} if label_names else {})}}
                 if spellings else {})}
    key = reuse_key(inputs, settings)
    with atomic_dir(out_dir) as tmp:
        system_prompt = common_system_prompt([row["messages"] for row in kept])[0]  # the one the split gives them
        cleaned = build_clean_preferences(pairs, tmp, settings, spellings, system_prompt, kept)
        removed = result.removed + cleaned.pop("removed")
        summary.update({name: summary[name] + cleaned.pop(name) for name in COUNTS[2:]}, **cleaned)
        write_examples(kept, tmp / EXAMPLES,
                       metadata={SHARED_TEXT_KEY: similarity.encode_shared(result.shared)})
        write_jsonl(removed, tmp / REMOVED)
        Result("deduplicated_examples", key, {"examples": EXAMPLES, "preferences": PREFERENCES, "removed": REMOVED},
               inputs, summary).write(tmp)
    return {**summary, "removed": removed}


def _with_first_rows(found: list[dict[str, Any]], kept: list[dict[str, Any]],
                     label_of: Callable[[str], str | None] | None) -> list[dict[str, Any]]:
    """Each likely typo of `found` (a label, or a value of a `field`) with the source of the `first` kept row that
    writes it, so it can be found in the raw files."""
    def writes(row: dict[str, Any], one: dict[str, Any]) -> bool:
        answer = row["messages"][-1]["content"]
        if "field" in one:
            return (first_json_object(answer) or {}).get(one["field"]) == one["label"]
        return label_of is not None and label_of(answer) == one["label"]

    return [{**one, "first": next((row["source"] for row in kept if writes(row, one)), None)} for one in found]


def _last_kept(out_dir: Path) -> list[dict[str, Any]]:
    """The rows the last cleaning in `out_dir` kept (none before the first)."""
    path = out_dir / EXAMPLES
    return read_examples(path) if path.is_file() else []


PREFERENCE_ROWS = "\0preference rows"  # `heavy_removals`' key of the preference rows: no label is written so


def likely_typos(out_dir: Path) -> dict[str, str]:
    """The labels the cleaning in `out_dir` named as likely typos, each with the commoner label it looks like (none
    when there is no cleaning there)."""
    result = read_result(out_dir, "deduplicated_examples")
    found = result.metadata.get("likely_misspellings", []) if result else []
    return {one["label"]: one["like"] for one in found if "field" not in one}


def heavy_removals(summary: dict[str, Any], limit: float) -> dict[str | None, str]:
    """Where cleaning removed more than `limit` of the rows (of a build summary), said in one line each, keyed by
    label (None: all chat rows; PREFERENCE_ROWS: the preference rows). A label counts when cleaning took all its rows,
    or more of them than chance would: a chance under `UNEVEN_REMOVAL` at the share it took of all chat rows. In a
    label of a few rows, one duplicate goes over any limit and says nothing."""
    pairs = summary.get("preference_rows_in", 0)
    preference = ({PREFERENCE_ROWS: {"rows_in": pairs, "removed": pairs - summary["preference_rows_out"]}}
                  if pairs else {})
    chat = {"rows_in": summary["rows_in"], "removed": summary["rows_in"] - summary["rows_out"]}
    overall = chat["removed"] / max(chat["rows_in"], 1)
    names = {None: "chat rows" if pairs else "all rows", PREFERENCE_ROWS: "preference rows"}
    found = {}
    for label, counts in {None: chat, **preference, **summary.get("removed_by_label", {})}.items():
        removed, rows = counts["removed"], counts["rows_in"]
        share = removed / max(rows, 1)
        if share > limit and (label in names or share == 1
                              or chance_of_at_least(removed, rows, overall) < UNEVEN_REMOVAL):
            found[label] = f"{names.get(label, f'label {label!r}')}: {share:.0%} removed ({removed} of {rows})"
    return found
