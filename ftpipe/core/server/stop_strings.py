"""The `stop` strings of a chat request: the answer ends before the first one it contains, and a stream holds back
the text that may be the start of one until the next tokens tell."""

from __future__ import annotations

MAX_STOP_STRINGS = 4  # as OpenAI's API allows


def stop_position(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string in `text` begins; None when it has none."""
    found = [at for stop in stops if (at := text.find(stop)) >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` may begin a stop string (the longest such end)."""
    return max((size for stop in stops for size in range(min(len(stop) - 1, len(text)), 0, -1)
                if stop.startswith(text[-size:])), default=0)
