"""Prompt starts read once: a task's requests mostly begin with the same long system prompt, and a conversation's
next turn with its earlier ones. When a prompt shares a long enough start with a recent prompt of the same model and
adapter, that start's KV cache is computed once and kept; every later prompt that begins with it reads only the rest
(`Decoding.admit` continues from a copy)."""

from __future__ import annotations

from collections import OrderedDict, deque

from ftpipe.core.evaluation.generation import SharedPrefix, shared_length

BLOCK_TOKENS = 16  # a start is kept in whole blocks, so prompts that differ a little later share one entry
MIN_TOKENS = 64  # a shorter shared start is read with each prompt
STARTS_KEPT = 8  # the default; the least recently used is dropped first
RECENT_PROMPTS = 8  # per model and adapter: the prompts a new one is compared with


class Prefixes:
    """At most `capacity` kept starts, by model and adapter (none: 0); `read(model, adapter, ids, below)` reads a
    start after the kept start `below` (None: from the first token), None when the model's cache cannot be kept."""

    def __init__(self, read, capacity: int = STARTS_KEPT):
        self.read, self.capacity = read, capacity
        self.starts: OrderedDict[tuple, SharedPrefix] = OrderedDict()
        self.recent: dict[tuple, deque] = {}
        self.unkept: set[int] = set()  # models whose starts cannot be kept

    def clear(self) -> None:
        """Forget every start (models or adapters may have changed)."""
        self.starts.clear()
        self.recent.clear()
        self.unkept.clear()

    def find(self, job) -> SharedPrefix | None:
        """The start for `job`'s prompt (shorter than it: its last token's logits are the prompt's own pass): the
        longest kept one it begins with, or a longer one read after that (a conversation's earlier turns) when the
        prompt shares one with a recent prompt; None without. The tokens not read again become `cached_tokens`."""
        owner, prompt = (id(job.model), job.adapter), job.prompt
        if not self.capacity or owner[0] in self.unkept:
            return None
        kept = max((key for key in self.starts if key[:2] == owner and len(key[2]) < len(prompt)
                    and tuple(prompt[:len(key[2])]) == key[2]), key=lambda key: len(key[2]), default=None)
        below = self.starts[kept] if kept else None
        recent = self.recent.setdefault(owner, deque(maxlen=RECENT_PROMPTS))
        shared = max((shared_length([prompt[:-1], other]) for other in recent), default=0)
        recent.append(prompt)
        job.cached_tokens = len(below.ids) if below else 0
        if kept:
            self.starts.move_to_end(kept)
        length = shared // BLOCK_TOKENS * BLOCK_TOKENS
        longer = self._read(owner, job, length, below) if length >= job.cached_tokens + MIN_TOKENS else None
        return longer if longer is not None else below

    def _read(self, owner: tuple, job, length: int, below: SharedPrefix | None) -> SharedPrefix | None:
        start = self.read(job.model, job.adapter, job.prompt[:length], below)
        if start is None:
            self.unkept.add(owner[0])
            return None
        self.starts[(*owner, tuple(start.ids))] = start
        while len(self.starts) > self.capacity:
            self.starts.popitem(last=False)
        return start
