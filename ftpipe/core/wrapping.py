"""Rows that ask another row's question in other wrapping: the held-out split keeps them together.

Short messages are often one core question inside text that goes with any answer ("Hi, I forgot my password. I'm on
the mobile app. Regards, Tom"). Word bigrams (`similarity`) miss such copies: in a short message the wrapping's
bigrams outweigh the core's. So a row's messages are cut into clauses at punctuation (digits masked), and across all
rows a clause
- predicts an answer when at least CORE_SHARE of the rows holding it give that answer, more than chance would at the
  answer's share of all rows;
- wraps when at least WRAPPER_ROWS rows hold it and none of their answers is more common among them than chance
  allows (a greeting, a sign-off, context any question may come with);
- is otherwise the row's own content.
A row is a wrapped copy when each of its clauses but the wrapping predicts its own answer and one of them is at least
CORE_MIN_WORDS words long: it asks what the other rows holding those clauses ask. A row with a clause of its own (a
new question beside a phrase that happens to predict its answer) is no copy. Only messages of at most SHORT_WORDS words
are read: in a longer one its own words outweigh any wrapping, so word bigrams tell.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import groupby
from typing import Any

from ftpipe.core.dedup import comparable_answer
from ftpipe.core.evaluation.statistics import chance_of_at_least
from ftpipe.core.similarity import WRAPPER_ROWS
from ftpipe.core.text import canonical, loose_words

CLAUSE_BREAK = re.compile(r"[.!?;:,\n…。！？；：，、]+")
DIGIT = re.compile(r"\d+")
BREAK = "\x00"  # stands for a clause break among the words: no text holds it, and no word is made of it
CORE_SHARE = 0.8
CORE_MIN_WORDS = 4
CHANCE = 0.01  # less likely than this by chance is more than chance
SHORT_WORDS = 120  # longer messages are not cut into clauses: their own words outweigh any wrapping


def clauses(messages: list[dict[str, str]]) -> frozenset[str]:
    """The clauses of a row's user messages (its answer aside), as loose words with digits masked; none past
    SHORT_WORDS words."""
    text = "\n".join(m["content"] for m in messages[:-1] if m["role"] == "user")
    if len(text.split()) > SHORT_WORDS:
        return frozenset()
    words = loose_words(CLAUSE_BREAK.sub(f" {BREAK} ", DIGIT.sub("0", text)))
    return frozenset(" ".join(group) for is_break, group in groupby(words, BREAK.__eq__) if not is_break)


def wrapped_copies(rows: list[dict[str, Any]]) -> dict[int, dict[str, list[int]]]:
    """For each wrapped copy among `rows` (see the module), its clauses that predict its answer, each with the rows
    that hold it and give that answer (the copy among them); answers compare as cleaning compares them (a JSON object
    by its value, case and spacing aside)."""
    answers = [canonical(comparable_answer(row["messages"][-1]["content"])) for row in rows]
    held = [clauses(row["messages"]) for row in rows]
    holders: dict[str, list[int]] = {}
    for index, row_clauses in enumerate(held):
        for clause in row_clauses:
            holders.setdefault(clause, []).append(index)
    predicts, wraps = _clause_kinds(holders, answers)
    agreeing = {clause: [i for i in holders[clause] if answers[i] == answer] for clause, answer in predicts.items()}
    copies: dict[int, dict[str, list[int]]] = {}
    for index, row_clauses in enumerate(held):
        own = row_clauses - wraps
        if own and all(predicts.get(clause) == answers[index] for clause in own) and any(
                len(clause.split()) >= CORE_MIN_WORDS for clause in own):
            copies[index] = {clause: agreeing[clause] for clause in own}
    return copies


def _clause_kinds(holders: dict[str, list[int]], answers: list[str]) -> tuple[dict[str, str], set[str]]:
    """(each clause that predicts an answer, with that answer; the clauses that wrap)."""
    shares = {answer: count / len(answers) for answer, count in Counter(answers).items()}
    predicts, wraps = {}, set()
    for clause, rows in holders.items():
        if len(rows) < 2:
            continue
        counts = Counter(answers[i] for i in rows).most_common()
        answer, count = counts[0]
        if count >= CORE_SHARE * len(rows) and chance_of_at_least(count, len(rows), shares[answer]) < CHANCE:
            predicts[clause] = answer
        elif len(rows) >= WRAPPER_ROWS and all(
                chance_of_at_least(n, len(rows), shares[a]) >= CHANCE / len(shares) for a, n in counts):
            wraps.add(clause)
    return predicts, wraps
