"""Canonical example rows for tests: one from a prompt and an answer, and random sentences that never repeat."""

from __future__ import annotations

import random

from ftpipe.core.records import example_id

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def row(prompt: str, answer: str, source: str = "f:line 1", system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"id": example_id(messages), "messages": messages, "source": source}


def sentence(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n))
