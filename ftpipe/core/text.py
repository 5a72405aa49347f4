"""Text helpers shared by cleaning, evaluation and reports: the two normal forms of text, and Markdown tables."""

from __future__ import annotations

import json
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import regex

CELL_CHARS = 160
# zero-width spaces and joiners, soft hyphens, byte order marks, variation selectors: invisible, and dropped by
# Unicode's NFKC_Casefold, so a pasted "U+200B" does not make two texts differ
_INVISIBLE = regex.compile(r"\p{Default_Ignorable_Code_Point}+")
# a character (with its combining marks) of a script written without spaces between words, which is a word of its
# own: Chinese, Japanese, Thai... texts then share words as they share characters, not only as whole sentences
_UNSPACED_SCRIPTS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
_UNSPACED = regex.compile(rf"(?=[{_UNSPACED_SCRIPTS}])\X")
_IN_UNSPACED_WORDS = rf"[{_UNSPACED_SCRIPTS}ー々]"  # and the marks they share with other scripts (the long vowel mark)
_BETWEEN_UNSPACED = regex.compile(rf"(?<={_IN_UNSPACED_WORDS}\p{{M}}*) (?={_IN_UNSPACED_WORDS})")


def _is_punctuation(code: int) -> bool:
    return unicodedata.category(chr(code)).startswith("P")


_ASCII_PUNCTUATION = dict.fromkeys(filter(_is_punctuation, range(128)))
_JOINED_WORDS = regex.compile(r"[\p{P}\p{S}]|(?<=\p{Ll})(?=\p{Lu})")  # snake_case, CamelCase, r['price']


@cache
def _punctuation() -> dict[int, None]:
    """Every Unicode punctuation code point, mapped to None for `str.translate` (built on first need)."""
    return dict.fromkeys(filter(_is_punctuation, range(sys.maxunicode + 1)))


def _folded(text: str) -> str:
    """Unicode NFKC_Casefold: NFKC, case-folded, invisible characters dropped (ASCII text is already NFKC and has
    none, and its casefold is lower(): the fast path)."""
    if text.isascii():
        return text.lower()
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text).casefold())


def canonical(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: what makes two rows the same row (cleaning, split)."""
    folded = _folded(text)
    return folded if _single_spaced(folded) else " ".join(folded.split())


def canonical_codes(texts: list[str]) -> np.ndarray:
    """An integer per text, equal exactly when the texts' `canonical` forms are equal, numbered in order of first
    appearance. Printable ASCII texts (most) are normalised by Arrow in bulk, any other by `canonical`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = pa.array(texts, type=pa.large_string())
    plain = pc.and_(pc.string_is_ascii(array), pc.ascii_is_printable(array))
    folded = pc.utf8_trim(pc.replace_substring_regex(pc.ascii_lower(array), " {2,}", " "), " ")
    others = np.flatnonzero(~plain.to_numpy(zero_copy_only=False))
    if len(others):
        fixed = folded.to_pylist()
        for index in others.tolist():
            fixed[index] = canonical(texts[index])
        folded = pa.array(fixed, type=pa.large_string())
    return pc.dictionary_encode(folded).indices.to_numpy().astype(np.int64)


def _single_spaced(text: str) -> bool:
    """Whether `text` is its own whitespace-collapsed form, found without building a list of its words: printable
    ASCII (no tabs, newlines or other control characters) with no double, leading or trailing space."""
    return text.isascii() and text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " "


def loose_words(text: str) -> list[str]:
    """The words of `canonical(text)` with punctuation removed; in scripts written without spaces (Chinese,
    Japanese, Thai...) each character is a word."""
    folded = _folded(text)
    if folded.isascii():
        return folded.translate(_ASCII_PUNCTUATION).split()
    return _UNSPACED.sub(r" \g<0> ", folded).translate(_punctuation()).split()


def text_parts(content: list) -> str | None:
    """OpenAI's content parts (`[{"type": "text", "text": …}, …]`) as one text, joined by newlines; None when a part
    is not text (an image, audio)."""
    if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
        return None
    return "\n".join(str(part.get("text", "")) for part in content)


def loose(text: str) -> str:
    """`canonical` with punctuation removed: what makes two answers the same answer (metrics, labels)."""
    return " ".join(loose_words(text))


def unspaced(words: str) -> str:
    """`words` (`loose_words` joined by spaces) as a script written without spaces writes them: パスワード, not
    パ ス ワ ー ド."""
    return _BETWEEN_UNSPACED.sub("", words)


def word_parts(text: str) -> list[str]:
    """`loose_words` with words joined by punctuation, a symbol or case apart, as prose writes them: `cancel_order`,
    `cancel-order` and `CancelOrder` are the words cancel and order, `r['price']` is r and price."""
    return loose_words(_JOINED_WORDS.sub(" ", text))


def label_key(text: str) -> str:
    """`loose` without spaces: what makes two labels one label (`Order Status`, `order_status`, `ORDER-STATUS`)."""
    return "".join(loose_words(text))


def clipped(text: str, limit: int) -> str:
    """`text`, or its first `limit` - 1 characters and "…" when it is longer than `limit`."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def counted(counts: Counter, shown: int, chars: int, noun: str, name: Callable[[str], str] = str) -> str:
    """`thing ×count, …` for the `shown` most frequent of `counts` (each `name`d, cut to `chars`), most first, and
    how many more there were ("and 3 other `noun`")."""
    common = counts.most_common(shown)
    more = len(counts) - len(common)
    return ", ".join(f"{clipped(name(key), chars)} ×{n}" for key, n in common) + (
        f" and {more} other {noun}" if more else "")


def cell(value: Any, limit: int = CELL_CHARS) -> str:
    """One Markdown table cell: on one line, at most `limit` characters, pipes escaped."""
    return clipped(" ".join(str(value).split()), limit).replace("|", "\\|")


def clipped_start(text: str, limit: int = CELL_CHARS) -> str:
    """`text` on one line, or "…" and its last `limit` - 1 characters where it is longer: for text whose end matters
    most, such as a conversation, whose last turn is the one answered."""
    line = " ".join(text.split())
    return line if len(line) <= limit else "…" + line[1 - limit:]


def markdown_table(header: list[str], rows: list[list[Any]], limit: int = CELL_CHARS) -> str:
    """A Markdown table of `rows` under `header`, cells shortened to `limit` characters."""
    lines = ["| " + " | ".join(cell(h, limit) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v, limit) for v in row) + " |" for row in rows])


def whole_json_object(text: str) -> dict | None:
    """The JSON object `text` is, whitespace aside (what `json.loads` reads as an object), else None."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
