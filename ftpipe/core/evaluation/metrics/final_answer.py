"""Checkable final answers of generation tasks: the answer a regex group or a JSON field picks out of a longer text
(e.g. `#### 42` closing a worked solution), compared as numbers when both are numbers."""

from __future__ import annotations

import json
import re

from ftpipe.core.evaluation.metrics.base import first_json_object
from ftpipe.core.text import loose

NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")  # thousands separators allowed, `.5` too
CURRENCY = "$€£¥₹"


def to_number(text: str) -> float:
    """A NUMBER match as a float (`1,000` -> 1000.0)."""
    return float(text.replace(",", ""))


def extract_answer(text: str, pattern: str | None = None, field: str | None = None) -> str | None:
    """The final answer in `text`: group 1 of the first match of `pattern`, else JSON field `field` of the first
    JSON object (a non-string value as JSON); None when there is none."""
    if pattern:
        found = re.search(pattern, text)
        return found.group(1).strip() if found and found.group(1) is not None else None
    value = (first_json_object(text) or {}).get(field)
    return value if isinstance(value, str) or value is None else json.dumps(value)


def last_number(text: str) -> str | None:
    """The last number written in `text`, None when it has none."""
    found = NUMBER.findall(text)
    return found[-1] if found else None


def spaced_freely(pattern: str) -> str:
    """`pattern` with each space made any whitespace or none (`#### (\\S+)` -> `####\\s*(\\S+)`)."""
    return pattern.replace(" ", r"\s*")


def as_number(answer: str) -> float | None:
    """The answer as a number when the whole of it is one (a trailing full stop and a currency sign aside), else
    None."""
    text = answer.strip().removesuffix(".").strip(CURRENCY)
    return to_number(text) if NUMBER.fullmatch(text) else None


def uncomputed_final_answer(answer: str, pattern: str) -> tuple[str, str] | None:
    """(the final answer, the last number before it) where `answer`'s final answer (group 1 of `pattern`'s first match)
    is a number its working writes nowhere, though the working writes numbers (`... = 6150. #### 6160`); None
    otherwise."""
    found = re.search(pattern, answer)
    value = as_number(found.group(1)) if found and found.group(1) is not None else None
    written = NUMBER.findall(answer[:found.start()]) if value is not None else []
    if not written or value in map(to_number, written):
        return None
    return found.group(1), written[-1]


def comparable_final_answer(answer: str) -> str:
    """A final answer as `same_answer` compares it: a number by its value (`1,000`, `1000.0` and `$1000` are one),
    else its loose text."""
    number = as_number(answer)
    return f"{number:g}" if number is not None else loose(answer)


def same_answer(answer: str | None, reference: str) -> bool:
    """Whether two final answers agree: as numbers when both are numbers (`1,000` == `1000` == `1000.0`), else as
    loose text (case, punctuation and spacing aside)."""
    if answer is None:
        return False
    got, want = as_number(answer), as_number(reference)
    if got is not None and want is not None:
        return got == want
    return loose(answer) == loose(reference)


def uncomputed_said(count: int, first: str) -> str:
    """The warning on worked solutions whose final answer their working never writes (`first`: the first, as
    `source: final answer after last number`)."""
    many = count > 1
    return (f"{count} worked solution{'s end' if many else ' ends'} with a final answer {'their' if many else 'its'} "
            f"working never writes (the first: {first}): the model learns to end its reasoning with another number; "
            f"check {'them' if many else 'it'} against {'their' if many else 'its'} steps")
