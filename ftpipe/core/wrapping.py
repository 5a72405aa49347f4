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
Wrapping written onto a clause without punctuation ("where is my order thanks", "hi team how do I return it") is
taken off its edges: up to EDGE_WORDS words (or EDGE_CHARACTERS characters) at a clause's start or end that at least
WRAPPER_ROWS rows hold there or as a clause of their own ("Please help."), their answers spread as chance spreads
them. A clause then predicts an answer when one of its readings, with or without such edges, does.
A reading of a question typed with one word misspelt is that question's reading too.
A row is a wrapped copy when each of its clauses but the wrapping predicts its own answer and a reading that does is at
least CORE_MIN_WORDS words long: it asks what the other rows holding the shortest such readings ask. A row with a clause
of its own (a new question beside a phrase that happens to predict its answer) is no copy. Only messages of at most
SHORT_WORDS words are read: in a longer one its own words outweigh any wrapping, so word bigrams tell.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
from itertools import groupby
from typing import Any

from ftpipe.core.dedup import answer_key
from ftpipe.core.evaluation.statistics import chance_of_at_least
from ftpipe.core.similarity import WRAPPER_ROWS, misspelt_copies
from ftpipe.core.text import loose_words

CLAUSE_BREAK = re.compile(r"[.!?;:,\n…。！？；：，、–—]+|\s-+\s")
DIGIT = re.compile(r"\d+")
BREAK = "\x00"  # stands for a clause break among the words: no text holds it, and no word is made of it
CORE_SHARE = 0.8
CORE_MIN_WORDS = 4
EDGE_WORDS = 4  # the longest greeting or sign-off taken off a clause's edge...
EDGE_CHARACTERS = 12  # ...or more words while they hold no more characters (a script written without spaces)
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
    """For each wrapped copy among `rows` (see the module), the shortest readings of its clauses that predict its
    answer, each with the rows that hold it and give that answer (the copy among them); answers compare as cleaning
    compares them (a JSON object by its value, case and spacing aside)."""
    answers = [answer_key(row) for row in rows]
    shares = {answer: count / len(answers) for answer, count in Counter(answers).items()}
    held = [clauses(row["messages"]) for row in rows]
    edges = _edge_wrapping(held, answers, shares)
    each = {clause: _readings(clause, edges) for clause in set().union(*held)}
    holders: dict[str, list[int]] = {}
    for index, row_clauses in enumerate(held):
        for reading in set().union(*(each[clause] for clause in row_clauses)):
            holders.setdefault(reading, []).append(index)
    _join_misspelt(holders)
    predicts, wraps = _clause_kinds(holders, answers, shares)
    agreeing = {way: [i for i in holders[way] if answers[i] == answer] for way, answer in predicts.items()}
    core_of = cache(lambda clause, answer: _core(each[clause], predicts, answer))
    copies: dict[int, dict[str, list[int]]] = {}
    for index, row_clauses in enumerate(held):
        found = {clause: core_of(clause, answers[index]) for clause in row_clauses}
        if all(ways is not None or each[clause] & wraps for clause, ways in found.items()) and (
                core := [way for ways in found.values() if ways for way in ways]):
            copies[index] = {way: agreeing[way] for way in core}
    return copies


def _edge_wrapping(held: list[frozenset[str]], answers: list[str], shares: dict[str, float]) -> set[tuple[str, str]]:
    """The ("start" or "end", words) that wrap at clause edges: at least WRAPPER_ROWS rows hold them there, or as a
    clause of its own ("Please help." wraps "is my money protected please help"), with answers spread as chance
    spreads them."""
    at_edges: dict[tuple[str, str], set[int]] = {}
    for index, row_clauses in enumerate(held):
        for clause in row_clauses:
            words = clause.split()
            for n in range(1, min(_edge_limit(words), len(words)) + 1):
                at_edges.setdefault(("start", " ".join(words[:n])), set()).add(index)
            for n in range(1, min(_edge_limit(words[::-1]), len(words)) + 1):
                at_edges.setdefault(("end", " ".join(words[-n:])), set()).add(index)
    return {edge for edge, rows in at_edges.items()
            if len(rows) >= WRAPPER_ROWS and _as_chance(Counter(answers[i] for i in rows), len(rows), shares)}


def _readings(clause: str, edges: set[tuple[str, str]]) -> frozenset[str]:
    """`clause` and what is left of it with wrapping taken off its start, its end or both (never all of it)."""
    words = clause.split()
    starts = _stripped(words, lambda edge: ("start", " ".join(edge)) in edges)
    ends = _stripped(words[::-1], lambda edge: ("end", " ".join(reversed(edge))) in edges)
    return frozenset(" ".join(words[start:len(words) - end]) for start in starts for end in ends
                     if start + end < len(words))


def _stripped(words: list[str], wraps) -> set[int]:
    """How many words can be taken off the start of `words`, wrapping after wrapping (`wraps(edge)`: those words
    wrap), leaving one at least."""
    found, todo = {0}, [0]
    while todo:
        taken = todo.pop()
        rest = words[taken:]
        for n in range(1, min(_edge_limit(rest), len(rest) - 1) + 1):
            if taken + n not in found and wraps(rest[:n]):
                found.add(taken + n)
                todo.append(taken + n)
    return found


def _edge_limit(words: list[str]) -> int:
    """The most words an edge at the start of `words` may hold: EDGE_WORDS, or more while they hold no more than
    EDGE_CHARACTERS characters (a greeting in a script written without spaces, a character a word)."""
    size = 0
    for count, word in enumerate(words):
        size += len(word)
        if size > EDGE_CHARACTERS:
            return max(EDGE_WORDS, count)
    return max(EDGE_WORDS, len(words))


def _join_misspelt(holders: dict[str, list[int]]) -> None:
    """Give readings of at least CORE_MIN_WORDS words that are one another with one word misspelt the rows of both:
    a question typed with a slip is the same question."""
    readings = [way for way in holders if len(way.split()) >= CORE_MIN_WORDS]
    for a, b, _ in misspelt_copies(readings):
        holders[readings[a]] = holders[readings[b]] = sorted({*holders[readings[a]], *holders[readings[b]]})


def _core(readings: frozenset[str], predicts: dict[str, str], answer: str) -> tuple[str, ...] | None:
    """Of a clause's `readings` that predict `answer`, those of at least CORE_MIN_WORDS words that hold none of the
    others (the question without what else was written around it); None when none predicts it (the row's own
    content)."""
    telling = [way for way in readings if predicts.get(way) == answer]
    if not telling:
        return None
    long = [way for way in telling if len(way.split()) >= CORE_MIN_WORDS]
    return tuple(way for way in long if not any(other != way and f" {other} " in f" {way} " for other in long))


def _clause_kinds(holders: dict[str, list[int]], answers: list[str],
                  shares: dict[str, float]) -> tuple[dict[str, str], set[str]]:
    """(each clause that predicts an answer, with that answer; the clauses that wrap)."""
    predicts, wraps = {}, set()
    for clause, rows in holders.items():
        if len(rows) < 2:
            continue
        counts = Counter(answers[i] for i in rows)
        answer, count = counts.most_common(1)[0]
        if count >= CORE_SHARE * len(rows) and chance_of_at_least(count, len(rows), shares[answer]) < CHANCE:
            predicts[clause] = answer
        elif len(rows) >= WRAPPER_ROWS and _as_chance(counts, len(rows), shares):
            wraps.add(clause)
    return predicts, wraps


def _as_chance(counts: Counter, rows: int, shares: dict[str, float]) -> bool:
    """No answer is more common among `rows` rows (`counts` of each answer) than chance allows."""
    return all(chance_of_at_least(n, rows, shares[answer]) >= CHANCE / len(shares) for answer, n in counts.items())
