"""Greedy answers cached per prompt: one model (the version of its weights, on one device) answers a prompt with a
given token budget once, so an eval split that gained rows generates only the new ones, and the probe is not
answered again when only the split changed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from ftpipe.core.storage import append_lines, read_keyed_lines

Generate = Callable[[list[list[dict]]], list[str]]  # prompts -> greedy answers, in order


def prompt_key(prompt: list[dict], max_new_tokens: int) -> str:
    text = json.dumps([prompt, max_new_tokens], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class AnswerRows:
    """One model's answers by prompt in a JSON-lines file; lines are only ever appended (a line cut short by a
    crash is skipped when read)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def answers(self, prompts: list[list[dict]], max_new_tokens: int, generate: Generate) -> list[str]:
        """The answer to each prompt, calling `generate` once with the prompts never answered before (in order)."""
        keys = [prompt_key(prompt, max_new_tokens) for prompt in prompts]
        known = {key: entry["answer"] for key, entry in read_keyed_lines(self.path).items()}
        first_of = {key: index for index, key in reversed(list(enumerate(keys))) if key not in known}
        missing = sorted(first_of.values())
        if missing:
            fresh = dict(zip((keys[i] for i in missing), generate([prompts[i] for i in missing]), strict=True))
            append_lines(self.path, [{"key": key, "answer": answer} for key, answer in fresh.items()])
            known.update(fresh)
        return [known[key] for key in keys]
