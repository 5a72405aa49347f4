"""Greedy answers cached per prompt: one model (the version of its weights, on one device) answers a prompt with a
given token budget once, so an eval split that gained rows generates only the new ones, and the probe is not
answered again when only the split changed."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

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
        known = self._read()
        first_of = {key: index for index, key in reversed(list(enumerate(keys))) if key not in known}
        missing = sorted(first_of.values())
        if missing:
            fresh = dict(zip((keys[i] for i in missing), generate([prompts[i] for i in missing]), strict=True))
            self._append(fresh)
            known.update(fresh)
        return [known[key] for key in keys]

    def _read(self) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        known = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            known[record["key"]] = record["answer"]
        return known

    def _append(self, answers: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n"
                        for key, answer in answers.items())
        with self.path.open("a+", encoding="utf-8") as file:
            if file.tell() and not self._ends_with_newline():
                lines = "\n" + lines  # after a line a crash cut short
            file.write(lines)
            file.flush()
            os.fsync(file.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as file:
            file.seek(-1, os.SEEK_END)
            return file.read(1) == b"\n"
