"""Task settings given on the command line (`--set training.max_steps=10`), as the overrides YAML the Dagster
launchpad takes."""

from __future__ import annotations

import re
from typing import Any

import yaml

from ftpipe.config import TaskConfigError

SETTING_KEY_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
QUOTED = r"""("[^"]*"|'[^']*')"""  # a quoted text, matched whole so that nothing inside it is found
SETTING_SEPARATOR_RE = re.compile(QUOTED + r"|[,\s]+(?=[A-Za-z_][\w.]*=)")  # a comma or space before the next `key=`
COMMENT_RE = re.compile(QUOTED + r"|(?:^|(?<=\s))#")  # a `#` that starts a YAML comment (first, or after a space)


def _pairs(settings: str) -> list[str]:
    """The `key=value` texts of `settings`, split at a comma or space before a `key=` outside quotes (a quoted text
    is matched whole, so no separator is found inside it)."""
    pairs, start = [], 0
    for match in SETTING_SEPARATOR_RE.finditer(settings):
        if match.group(1) is None:
            pairs.append(settings[start:match.start()])
            start = match.end()
    return [pair for pair in [*pairs, settings[start:]] if pair]


def settings_overrides(settings: str) -> str:
    """`key.path=value` pairs (separated by spaces or commas; each value read as YAML, so a quoted value may hold
    commas, spaces and `=`) as an overrides snippet for `parse_task_config`; TaskConfigError naming the first pair
    that is not `key=value`, or that sets a key an earlier pair set."""
    values: dict[str, Any] = {}
    for pair in _pairs(settings.strip()):
        key, equals, value = pair.partition("=")
        if not equals or not SETTING_KEY_RE.fullmatch(key):
            raise TaskConfigError(f"--set {pair!r}: expected key=value, e.g. training.max_steps=10")
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TaskConfigError(f"--set {pair!r}: {part} is set to a value already")
        if any(match.group(1) is None for match in COMMENT_RE.finditer(value)):
            raise TaskConfigError(f"--set {pair!r}: YAML reads a '#' at the start or after a space as a comment, which "
                                  f"would cut the value there: quote it ({key}=\"...\")")
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TaskConfigError(f"--set {pair!r}: the value is not valid YAML") from None
        _put(node, leaf, loaded, pair, key)
    return yaml.safe_dump(values, sort_keys=False) if values else ""


def _put(node: dict[str, Any], leaf: str, value: Any, pair: str, key: str) -> None:
    """Set `node[leaf]`; a mapping merges into one an earlier pair set, in either order; TaskConfigError for a key set
    twice."""
    if leaf not in node:
        node[leaf] = value
    elif isinstance(node[leaf], dict) and isinstance(value, dict):
        for inner, inner_value in value.items():
            _put(node[leaf], inner, inner_value, pair, f"{key}.{inner}")
    else:
        raise TaskConfigError(f"--set {pair!r}: {key} is set already by an earlier setting: keep one")
