"""Cleaning of preference rows, with the reasons, records and counts of the chat examples' cleaning (`dedup`).

Rows are compared on their normalised text (`text.canonical`), a prompt without a system message as it is trained:
with the chat rows' system prompt (`split.with_default_system_prompt`). For one prompt, a pair and its reverse (A
over B and B over A), or one completion labelled both desirable and undesirable, contradict each other: the
strict-majority direction's rows stay, otherwise the whole group goes. Of identical rows the first stays (exact
duplicates). A row whose prompt is near-identical (`similarity`, on what varies between the prompts) to a kept
earlier row's, with the same answers, goes too, naming that row (near-duplicates; nothing chains).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ftpipe.core import similarity
from ftpipe.core.dedup import answer_key, comparable_answer, removal
from ftpipe.core.layout import PREFERENCES
from ftpipe.core.preferences import as_chat, is_paired, write_preferences
from ftpipe.core.readable import plural
from ftpipe.core.records import source_order, with_system_prompt
from ftpipe.core.text import canonical, loose

if TYPE_CHECKING:
    from ftpipe.core.label_spellings import Spellings

COUNTS = {"exact_duplicate": "exact_duplicates", "near_duplicate": "near_duplicates", "contradiction": "contradictions"}
WHOLE_SHARE = 0.8  # chosen answers this share of which end whole: one that ends otherwise was likely cut off...
WHOLE_MIN_PAIRS = 10  # ...among at least this many pairs
SIGN_OFF_SHARE = 0.05  # a last word this share of the chosen answers end on, two at least, ends them whole (a sign-off)
ANSWERS = {True: "chosen and rejected", False: "completion and label"}  # by whether the row is paired
OPPOSED = {True: "the reverse pair appears for the same prompt",
           False: "the same prompt and completion also carry the opposite label"}


class Key(NamedTuple):
    """What a row says, normalised: its prompt, its answers without their order, and their order (the label)."""

    prompt: tuple[tuple[str, str], ...]
    answers: tuple[str, ...]  # paired: both answers, sorted; unpaired: the completion
    direction: bool  # paired: whether the chosen answer sorts first; unpaired: the label

    @classmethod
    def of(cls, row: dict[str, Any], system_prompt: str | None = None) -> Key:
        """The key of `row`, its prompt given `system_prompt` when it starts without a system message."""
        prompt = prompt_key(row["prompt"], system_prompt)
        if not is_paired(row):
            return cls(prompt, (canonical(row["completion"]),), row["label"])
        chosen, rejected = canonical(row["chosen"]), canonical(row["rejected"])
        return cls(prompt, (min(chosen, rejected), max(chosen, rejected)), chosen < rejected)


def prompt_key(messages: list[dict[str, str]], system_prompt: str | None) -> tuple[tuple[str, str], ...]:
    """A prompt's messages, normalised, given `system_prompt` when they start without a system message."""
    return tuple((m["role"], canonical(m["content"])) for m in with_system_prompt(messages, system_prompt))


def _resolve_contradictions(rows: list[dict[str, Any]], keys: list[Key], removed: list[dict[str, Any]]) -> list[int]:
    """The same prompt and answers in both directions: the strict-majority direction's rows stay, else the group
    goes, each removed row naming the first of the other direction. Returns the indices that stay."""
    groups: dict[tuple, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault((key.prompt, key.answers), []).append(index)
    alive = [True] * len(rows)
    for members in groups.values():
        votes = Counter(keys[i].direction for i in members)
        if len(votes) < 2:
            continue
        (winner, top), (_, other) = votes.most_common()
        vote = (f"the majority ({top} of {len(members)} rows) is the other way" if top > other else
                f"no strict majority ({top} against {other}): the whole group goes")
        for index in members:
            if top == other or keys[index].direction != winner:
                named = next(i for i in members if keys[i].direction != keys[index].direction)
                detail = f"{OPPOSED[is_paired(rows[index])]}; {vote}"
                removed.append(removal(rows[index], "contradiction", rows[named], detail))
                alive[index] = False
    return [index for index, keep in enumerate(alive) if keep]


def _remove_exact(rows: list[dict[str, Any]], keys: list[Key], indices: list[int],
                  removed: list[dict[str, Any]]) -> list[int]:
    """The first of identical rows stays; returns the indices that stay."""
    first: dict[Key, int] = {}
    kept = []
    for index in indices:
        original = first.setdefault(keys[index], index)
        if original == index:
            kept.append(index)
        else:
            detail = f"same prompt, {ANSWERS[is_paired(rows[index])]} after normalisation"
            removed.append(removal(rows[index], "exact_duplicate", rows[original], detail))
    return kept


def _remove_near(rows: list[dict[str, Any]], keys: list[Key], removed: list[dict[str, Any]],
                 settings: similarity.Settings) -> list[dict[str, Any]]:
    """A row whose prompt is near-identical to a kept earlier row's, with the same answers, goes, naming the most
    alike such row. Returns the rows that stay."""
    chats = [as_chat(row) for row in rows]
    prompts, _ = similarity.prompt_shingles(chats, settings.shingle_words)
    similar = similarity.neighbours(len(rows), similarity.prompt_pairs(
        prompts, lambda index: similarity.prompt_words(chats[index]["messages"]), settings))
    alive = [True] * len(rows)
    for index, neighbours in enumerate(similar):
        matches = [(score, other) for other, score in neighbours.items()
                   if other < index and alive[other] and keys[other][1:] == keys[index][1:]]
        if matches:
            score, other = max(matches, key=lambda match: (match[0], -match[1]))  # most alike, then first
            detail = f"prompt Jaccard {score:.2f}, same {ANSWERS[is_paired(rows[index])]}"
            removed.append(removal(rows[index], "near_duplicate", rows[other], detail))
            alive[index] = False
    return [row for row, keep in zip(rows, alive) if keep]


def clean_preferences(rows: list[dict[str, Any]], settings: similarity.Settings = similarity.Settings(),
                      system_prompt: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, removed) preference rows: contradictions resolved, then exact and near-duplicates removed; removed
    rows carry `reason`, `duplicate_of`, `duplicate_of_source` and `detail`. Rows are taken in the order of the
    task's files (`records.source_order`), so the first written stays whatever the order of the input. A prompt
    without a system message compares as if it started with `system_prompt` (the chat rows' own)."""
    ordered = sorted(rows, key=source_order)
    keys = [Key.of(row, system_prompt) for row in ordered]
    removed: list[dict[str, Any]] = []
    remaining = _remove_exact(ordered, keys, _resolve_contradictions(ordered, keys, removed), removed)
    kept = _remove_near([ordered[i] for i in remaining], [keys[i] for i in remaining], removed, settings)
    return kept, removed


def build_clean_preferences(rows: list[dict[str, Any]], out_dir: Path,
                            settings: similarity.Settings = similarity.Settings(),
                            spellings: Spellings | None = None, system_prompt: str | None = None,
                            chats: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """Clean preference `rows` (`clean_preferences`) into `out_dir/preferences.parquet`, the kept rows' labels in
    their `spellings`; return `preference_rows_in`, `preference_rows_out`, the counts by reason under `dedup`'s
    names, `preference_answers_respelled`, the kept pairs whose answers differ only in punctuation
    (`punctuation_only_pairs`), reject what the kept `chats` teach (`rejected_taught_answers`) or prefer an answer cut
    off (`cut_off_chosen`), and `removed`."""
    kept, removed = clean_preferences(rows, settings, system_prompt)
    kept, respelled = spellings.respell_preferences(kept) if spellings else (kept, 0)
    write_preferences(kept, out_dir / PREFERENCES)
    reasons = Counter(row["reason"] for row in removed)
    return {"preference_rows_in": len(rows), "preference_rows_out": len(kept),
            **{name: reasons[reason] for reason, name in COUNTS.items()}, "preference_answers_respelled": respelled,
            **punctuation_only_pairs(kept), **rejected_taught_answers(kept, chats, system_prompt),
            **cut_off_chosen(kept), "removed": removed}


def punctuation_only_pairs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many of `rows` are pairs whose answers differ only in punctuation, case and spacing (`Yes.` and `yes`),
    and the source of the first: kept, as a JSON answer's brace can be the point of a pair, but what such a pair
    teaches is that difference."""
    found = [row["source"] for row in rows if is_paired(row) and loose(row["chosen"]) == loose(row["rejected"])]
    return {"pairs_differing_in_punctuation": len(found),
            "first_pair_differing_in_punctuation": found[0] if found else None}



def cut_off_chosen(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many of the pairs of `rows` have a chosen answer that ends inside a sentence, where WHOLE_SHARE of their
    chosen answers or more end whole (on punctuation, a name that signs it, or a last word SIGN_OFF_SHARE of them end
    on), and the first with its end: cut off, so a preference stage teaches the model to prefer an answer stopped
    mid-sentence."""
    chosen = [(row["source"], row["chosen"].rstrip()) for row in rows if is_paired(row)]
    last = [(text.split() or [""])[-1] for _, text in chosen]
    sign_offs = {word for word, count in Counter(last).items() if count >= max(2, SIGN_OFF_SHARE * len(chosen))}
    open_ = [text[-1:].isalnum() and not word[:1].isupper() and word not in sign_offs
             for (_, text), word in zip(chosen, last)]  # a capitalised last word: a name signing the answer
    found = [f"{source}, ending {' '.join(text.split()[-5:])!r}" for (source, text), cut in zip(chosen, open_) if cut]
    if len(chosen) < WHOLE_MIN_PAIRS or len(found) > (1 - WHOLE_SHARE) * len(chosen):
        found = []
    return {"cut_off_chosen_answers": len(found), "first_cut_off_chosen_answer": found[0] if found else None}


def cut_off_chosen_said(summary: dict[str, Any]) -> str:
    """The warning on pairs whose chosen answer looks cut off (`cut_off_chosen` in `summary`)."""
    count = summary["cut_off_chosen_answers"]
    return (f"{plural(count, 'preference pair')} {'has' if count == 1 else 'have'} a chosen answer that ends "
            f"mid-sentence where the others end whole (the first: {summary['first_cut_off_chosen_answer']}): a "
            "preference stage teaches the model to prefer the cut-off text; complete the answer or drop the pair")


def rejected_taught_answers(pairs: list[dict[str, Any]], chats: list[dict[str, Any]],
                            system_prompt: str | None = None) -> dict[str, Any]:
    """How many `pairs` reject the answer a chat row gives the same prompt, and the first with that chat row: the
    supervised stage teaches the answer and the preference stage then trains away from it. Answers compare as
    cleaning compares them (`dedup.answer_key`), prompts without a system message as given `system_prompt`."""
    taught: dict[tuple, str] = {}
    for chat in chats:
        key = prompt_key(chat["messages"][:-1], system_prompt), answer_key(chat)
        taught.setdefault(key, chat["source"])
    found = [f"{row['source']}, against {chat}" for row in pairs if is_paired(row) and (chat := taught.get(
        (prompt_key(row["prompt"], system_prompt), canonical(comparable_answer(row["rejected"])))))]
    return {"pairs_rejecting_taught_answers": len(found),
            "first_pair_rejecting_taught_answer": found[0] if found else None}


def taught_answers_rejected_said(summary: dict[str, Any]) -> str:
    """The warning on pairs that reject a chat row's answer (`rejected_taught_answers` in `summary`)."""
    count = summary["pairs_rejecting_taught_answers"]
    return (f"{plural(count, 'preference pair')} {'rejects' if count == 1 else 'reject'} the answer a chat row gives "
            f"the same prompt (the first: {summary['first_pair_rejecting_taught_answer']}): the supervised stage "
            "teaches that answer and the preference stage trains away from it; mend the pair or the chat row")
