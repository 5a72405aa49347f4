"""What two texts alike in their words can still differ in, and cleaning must not take for one text: the terms of a
problem or a program. Words are compared without case, punctuation and spacing (`text.loose_words`); a text's
numbers, and in a formula or code its operators, string literals and indentation, are compared as written."""

from __future__ import annotations

import re

from ftpipe.core.evaluation.metrics.final_answer import NUMBER, to_number
from ftpipe.core.text import whole_json_object

Terms = tuple[frozenset[float], str]
OPERATOR = re.compile(r"!=|[-+*/%^=<>&|~()\[\]{}]")
FORMULA = re.compile(r"[+*/^=<>&|~]")  # a sign that makes a text's dashes, brackets, % and quotes code
# a string literal: 'Smith', 'O''Neil', "yes"; not the apostrophes of `can't ... it's`
QUOTED = re.compile(r"(?<![\w'])'(?:[^'\n]|''|'(?=\w))+'(?![\w'])|\"[^\"\n]*\"")
INDENT = re.compile(r"^[ \t]*(?=\S)", re.MULTILINE)
BLOCK = re.compile(r"[:{]\n[ \t]+\S")  # a line opening an indented block, as code writes it
CODE = f"{FORMULA.pattern}|{BLOCK.pattern}"  # a text without a match has no code terms (for Arrow's bulk search)


def terms(text: str) -> Terms:
    """A text's numbers, read with their signs, decimals and thousands separators (-3 is not 3, 18.0 is 18), and its
    `code_terms`."""
    return frozenset(map(to_number, NUMBER.findall(text))), code_terms(text)


def code_terms(text: str) -> str:
    """Where a text may hold a formula or code (a sign such as + or =), its operators and brackets in order
    (`(12 + 7) * 3`: `(+)*`) and its string literals as written (`= 'Smith'` is not `= 'smith'`): a dash, a bracket
    or a quotation of a sentence is punctuation, and a copy in lower case a copy. And where it indents a block as code
    does, each line's level (code in a loop or after it), however wide a level is. None of a JSON object, whose values
    are compared as the task compares them."""
    if whole_json_object(text) is not None:
        return ""
    found = [*OPERATOR.findall(text), *QUOTED.findall(text)] if FORMULA.search(text) else []
    if BLOCK.search(text):
        widths = [len(indent.expandtabs(4)) for indent in INDENT.findall(text)]
        levels = {width: level for level, width in enumerate(sorted(set(widths)))}
        found.append(" ".join(str(levels[width]) for width in widths))
    return "\x1f".join(found)
