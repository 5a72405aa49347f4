"""The task.yaml reference in the README, generated from the schema in `ftpipe.config` (every field, its default
and its description):

    python -m ftpipe.config_reference
"""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from ftpipe.config import TaskConfig, nested_model

COMMENT_COLUMN = 30


def _choices(annotation: Any) -> list[str]:
    """The allowed values of a Literal field (also `Literal[...] | None`); none for any other type."""
    if get_origin(annotation) is Literal:
        return [str(value) for value in get_args(annotation)]
    options = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and all(get_origin(arg) is Literal for arg in options):
        return [choice for arg in options for choice in _choices(arg)]
    return []


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def _line(indent: str, text: str, comment: str | None) -> str:
    line = indent + text
    return f"{line:<{COMMENT_COLUMN - 2}}  # {comment}" if comment else line


def _comment(field: Any) -> str | None:
    choices = _choices(field.annotation)
    return f"{' | '.join(choices)}: {field.description}" if choices else field.description


def _reference_lines(model: type[BaseModel], indent: str) -> list[str]:
    """`key: default  # description` for every field of `model`; sections nested, null sections commented out (a
    required section inside one is shown with its fields)."""
    lines = []
    for name, field in model.model_fields.items():
        section = nested_model(field.annotation) if get_origin(field.annotation) is not dict else None
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if section is not None and (default is not None or (field.is_required() and "#" in indent)):
            lines += [_line(indent, f"{name}:", field.description), *_reference_lines(section, indent + "  ")]
        elif section is not None:
            commented_out = _reference_lines(section, indent + "#   ")
            lines += [_line(indent, f"{name}: null", f"{field.description}; its fields:"), *commented_out]
        else:
            value = field.examples[0] if field.is_required() else default
            lines.append(_line(indent, f"{name}: {_yaml_value(value)}", _comment(field)))
    return lines


def reference_yaml() -> str:
    """The task.yaml reference (every field, its default and its description), generated from the schema."""
    return "\n".join(_reference_lines(TaskConfig, "")) + "\n"


if __name__ == "__main__":
    print(reference_yaml(), end="")
