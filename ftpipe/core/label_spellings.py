"""One spelling per label: labels that differ only in what the evaluation ignores (case, spacing, punctuation:
`Billing`, `billing `, `billing.`) are one label there, so cleaned rows, and the answers of preference rows, are
rewritten to the spelling most of the label's answers use, and the model learns to write each label one way. The rest
of each answer, and each row's id (that of its raw row), stay as they were. A label that differs by a typo (`postive`)
is another label to the evaluation too, so it is not rewritten: `likely_misspellings` names it for a person to fix;
but where `data.label_names` declares the classes, a label it lacks that is a typo of one it names is that one."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from difflib import get_close_matches
from functools import partial
from typing import Any, Iterable

from ftpipe.core.dedup import NO_LABEL
from ftpipe.core.evaluation.metrics.classification import Classification, most_common, raw_label
from ftpipe.core.preferences import is_paired
from ftpipe.core.readable import plural
from ftpipe.core.text import canonical, label_key

COLUMNS = ["label", "respelled", "rows"]
MISSPELLING_COLUMNS = ["label", "rows", "like", "like_rows", "first"]  # and the field first, for values of a field
SHOWN = 5  # spellings named in the log line
SPELT = ("each label is trained (as data.label_names writes it, a typo of it too, else as the last cleaning or most "
         "of its answers write it)")
MISSPELLING_SIMILARITY = 0.85  # difflib's ratio of two labels' words from which the rarer may be a typo of the other
MISSPELLING_RARITY = 5  # ...when the other has at least this many times its rows
_DIGITS = re.compile(r"\d+")
PREFERENCE_ANSWERS = ("chosen", "rejected", "completion")  # a preference row's answer fields (None: not its kind)


@dataclass(frozen=True)
class Spellings:
    """The spelling each label is trained in (`chosen`, by its `label_key`): the one `data.label_names` names;
    for another label written more than one way, the one it was trained in before while answers still write it so
    (rows added later never respell the rows a model learned), else the one most answers write (the smallest of
    equally common ones); any other label, as written."""

    labels: Classification
    chosen: dict[str, str]

    @classmethod
    def of(cls, answers: Iterable[str], labels: Classification, trained: Iterable[str] = (),
           named: Iterable[str] = ()) -> Spellings:
        """The spellings of the labels of `answers`; `trained`: the answers of the rows the last cleaning kept;
        `named`: the labels of `data.label_names`."""
        found, before = cls._by_key(answers, labels), cls._by_key(trained, labels)
        chosen = {}
        for name, written in found.items():
            if len(spellings := set(written)) > 1:
                kept = spellings.intersection(before.get(name, ()))
                chosen[name] = min(kept) if kept else most_common(written)
        return cls(labels, {**chosen, **_typos_of_named(found, named), **{label_key(label): label for label in named}})

    @staticmethod
    def _by_key(answers: Iterable[str], labels: Classification) -> dict[str, list[str]]:
        """The labels of `answers` as written, by their `label_key`."""
        found: dict[str, list[str]] = {}
        for label in map(partial(raw_label, label_field=labels.config.label_field), answers):
            if label and label_key(label):
                found.setdefault(label_key(label), []).append(label)
        return found

    def label(self, answer: str) -> str | None:
        """The label of `answer` as it is trained."""
        return self._trained(raw_label(answer, self.labels.config.label_field))

    def spelt(self, answer: str) -> str:
        """`answer` with its label in its spelling."""
        found = self._respelled(answer)
        return found[0] if found else answer

    def respell(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Chat `rows` with each label in its spelling, and one entry per spelling replaced: the spelling kept
        (`label`), the one replaced (`respelled`), how many `rows`, most rows first."""
        replaced: Counter[tuple[str, str]] = Counter()
        out = []
        for row in rows:
            found = self._respelled(row["messages"][-1]["content"])
            if found:
                row = {**row, "messages": [*row["messages"][:-1], {**row["messages"][-1], "content": found[0]}]}
                replaced[found[1:]] += 1
            out.append(row)
        return out, [{"label": keep, "respelled": written, "rows": n} for (keep, written), n in replaced.most_common()]

    def respell_preferences(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Preference `rows` with each answer's label in its spelling, and how many answers were rewritten. A pair
        whose two answers would then be the same answer stays as written: the spelling is what it prefers."""
        out, count = [], 0
        for row in rows:
            answers = {field: found[0] for field in PREFERENCE_ANSWERS
                       if row[field] is not None and (found := self._respelled(row[field]))}
            respelled = {**row, **answers}
            if not (is_paired(row) and canonical(respelled["chosen"]) == canonical(respelled["rejected"])):
                row, count = respelled, count + len(answers)
            out.append(row)
        return out, count

    def _respelled(self, answer: str) -> tuple[str, str, str] | None:
        """(`answer` with its label in its spelling, that spelling, the one replaced); None when it stays, or when
        the rewritten answer would not read back as that label. A bare label is the whole answer, so spaces around it
        are replaced too."""
        field = self.labels.config.label_field
        written = raw_label(answer, field)
        keep = self._trained(written)
        replaced = written if field else answer
        if not keep or keep == replaced:
            return None
        respelled = self.labels.respelled(answer, keep)
        return (respelled, keep, replaced) if raw_label(respelled, field) == keep else None

    def _trained(self, written: str | None) -> str | None:
        return self.chosen.get(label_key(written), written) if written else written


def _typos_of_named(found: dict[str, list[str]], named: Iterable[str]) -> dict[str, str]:
    """The labels of `found` (by `label_key`) that data.label_names does not name but that look like a typo of one it
    does (`card_arival` of `card_arrival`; not `faq_13` of `faq_12`), by key, each with the label it names."""
    names = {_unaccented(label_key(name)): name for name in named}
    typos = {}
    for key, written in found.items():
        close = get_close_matches(_unaccented(key), list(names), n=1, cutoff=MISSPELLING_SIMILARITY)
        like = names[close[0]] if close else None
        if like and key != label_key(like) and not _numbered_alike(written[0], like):
            typos[key] = like
    return typos


def shown(entries: list[dict[str, Any]], fields: tuple[str, ...] = ("label", "respelled")) -> list[dict[str, Any]]:
    """`entries` with the labels of their `fields` quoted, so that a space or a case that tells two apart can be
    seen."""
    return [{**entry, **{name: _quoted(entry[name]) for name in fields}} for entry in entries]


def said(respelled: list[dict[str, Any]], preference_answers: int = 0) -> str:
    """`12 rows' and 4 preference answers' labels respelled as each label is trained (...): "billing " as "Billing"
    ×9, ...` (the chat rows' spellings, the commonest first, SHOWN of them)."""
    rows = sum(r["rows"] for r in respelled)
    counts = ((rows, "row's" if rows == 1 else "rows'"),
              (preference_answers, "preference answer's" if preference_answers == 1 else "preference answers'"))
    named = [f"{r['respelled']} as {r['label']} ×{r['rows']}" for r in shown(respelled[:SHOWN])]
    more = f" and {len(respelled) - SHOWN} other spellings" if len(respelled) > SHOWN else ""
    labels = "label" if rows + preference_answers == 1 else "labels"
    return (f"{' and '.join(f'{count} {what}' for count, what in counts if count)} {labels} respelled as {SPELT}"
            f"{': ' if named else ''}{', '.join(named)}{more}")


def likely_misspellings(counts: dict[str, int]) -> list[dict[str, Any]]:
    """The labels of `counts` (label -> rows) that look like a typo of a label with many more rows (`postive` ×2
    beside `positive` ×300), each trained as a label of its own: the label, its rows, the label it is `like` and its
    rows, the rarest first."""
    found, by_rows = [], sorted(counts.items(), key=lambda item: (item[1], item[0]))
    for label, rows in by_rows:
        if not rows or label == NO_LABEL:
            continue
        commoner = {}
        for other, many in by_rows:  # the commonest label of a key last
            if many >= MISSPELLING_RARITY * rows and other != NO_LABEL and not _numbered_alike(label, other):
                commoner[_unaccented(label_key(other))] = other
        if close := get_close_matches(_unaccented(label_key(label)), list(commoner), n=1,
                                      cutoff=MISSPELLING_SIMILARITY):
            like = commoner[close[0]]
            found.append({"label": label, "rows": rows, "like": like, "like_rows": counts[like]})
    return found


def _unaccented(key: str) -> str:
    """`key` with the accents of its Latin letters left out (`koln` for `köln`): a label written without them matches
    the one written with them, where difflib's ratio of short names one accent apart (`Koln`, `Zurich`) is under
    MISSPELLING_SIMILARITY. Other scripts' marks stay: a Japanese dakuten makes another word (`かき`, `かぎ`)."""
    kept, base = [], ""
    for char in unicodedata.normalize("NFKD", key):
        if not unicodedata.combining(char):
            base = char
        if not (unicodedata.combining(char) and base.isascii()):
            kept.append(char)
    return unicodedata.normalize("NFC", "".join(kept))


def _numbered_alike(label: str, other: str) -> bool:
    """Labels apart only in their digits (`intent_18` and `intent_14`, `E11` and `E10`): numbered classes, not a
    typo of one another."""
    return label != other and _DIGITS.sub("", label) == _DIGITS.sub("", other)


def likely_misspelt_values(categories: dict[str, Counter]) -> list[dict[str, Any]]:
    """`likely_misspellings` among the values of each field that holds categories (an extraction's `item`:
    `croisant` ×2 beside `croissant` ×60), each with its `field`."""
    return [{"field": field, **found} for field, counts in categories.items() for found in likely_misspellings(counts)]


def misspelling_columns(found: list[dict[str, Any]]) -> list[str]:
    return ["field", *MISSPELLING_COLUMNS] if found and "field" in found[0] else MISSPELLING_COLUMNS


def misspellings_said(found: list[dict[str, Any]]) -> str:
    """`2 labels look like a typo of a commoner label: "postive" ×2 (like "positive" ×300), ...; each is trained and
    scored as a label of its own: correct them in the raw files` (SHOWN of them named, the rest counted); values of a
    field (`likely_misspelt_values`) are named with it."""
    noun = "value" if found and "field" in found[0] else "label"
    named = [f"{one['field'] + ' ' if 'field' in one else ''}{_quoted(one['label'])} ×{one['rows']} "
             f"(like {_quoted(one['like'])} ×{one['like_rows']}{'; first ' + one['first'] if one.get('first') else ''})"
             for one in found[:SHOWN]]
    more = f" and {len(found) - SHOWN} more (the misspelt_labels table)" if len(found) > SHOWN else ""
    several = len(found) > 1
    return (f"{len(found)} {noun}{'s' * several} look{'s' * (not several)} like a typo of a commoner {noun}"
            f"{' of its field' if noun == 'value' else ''}: {', '.join(named)}{more}; {'each' if several else 'it'} "
            f"is trained and scored as a {noun} of its own: correct {'them' if several else 'it'} in the raw files")


def answers(rows: list[dict[str, Any]], preferences: Iterable[dict[str, Any]] = ()) -> list[str]:
    """The answers of chat `rows` and of preference rows (`preferences`): what the spellings are counted over."""
    return [*(row["messages"][-1]["content"] for row in rows),
            *(row[field] for row in preferences for field in PREFERENCE_ANSWERS if row[field] is not None)]


def unnamed_labels(counts: dict[str, int], named: Iterable[str], misspelt: list[dict[str, Any]]) -> dict[str, int]:
    """The labels of `counts` (label -> rows) that `named` (data.label_names, the task's classes) does not name, the
    commonest first; none without `named`, and not those already named as likely typos (`misspelt`)."""
    keys, typos = {label_key(name) for name in named}, {found["label"] for found in misspelt}
    if not keys:
        return {}
    return {label: rows for label, rows in sorted(counts.items(), key=lambda item: -item[1])
            if rows and label != NO_LABEL and label not in typos and label_key(label) not in keys}


def unnamed_said(unnamed: dict[str, int]) -> str:
    """One line on `unnamed_labels`."""
    named = ", ".join(f"{_quoted(label)} ×{rows}" for label, rows in list(unnamed.items())[:SHOWN])
    more = f" and {len(unnamed) - SHOWN} more" if len(unnamed) > SHOWN else ""
    several = len(unnamed) > 1
    return (f"{plural(len(unnamed), 'label')} of the rows {'are' if several else 'is'} not in data.label_names: "
            f"{named}{more}; {'each' if several else 'it'} is trained and scored as a class of its own: add "
            f"{'them' if several else 'it'} there, or correct the rows in the raw files")


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
