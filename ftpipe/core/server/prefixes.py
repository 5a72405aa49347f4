"""Prompt starts read once: a task's requests mostly begin with the same long system prompt. When a prompt shares a
long enough start with a recent prompt of the same model and adapter, that start's KV cache is computed once and
kept; every later prompt that begins with it reads only the rest (`Decoding.admit` continues from a copy)."""

from __future__ import annotations

from collections import OrderedDict, deque

from ftpipe.core.evaluation.generation import SharedPrefix, shared_length

BLOCK_TOKENS = 16  # a start is kept in whole blocks, so prompts that differ a little later share one entry
MIN_TOKENS = 64  # a shorter shared start is read with each prompt
STARTS_KEPT = 8  # the default; the least recently used is dropped first
RECENT_PROMPTS = 8  # per model and adapter: the prompts a new one is compared with


class Prefixes:
    """At most `capacity` kept starts, by model and adapter (none: 0); `forward(model, adapter, ids)` reads a start
    into a fresh KV cache."""

    def __init__(self, forward, capacity: int = STARTS_KEPT):
        self.forward, self.capacity = forward, capacity
        self.starts: OrderedDict[tuple, SharedPrefix] = OrderedDict()
        self.recent: dict[tuple, deque] = {}
        self.unkept: set[int] = set()  # models whose starts cannot be kept
        self.read = self.reused = 0  # starts read, and prompts that began with a kept start

    def clear(self) -> None:
        """Forget every start (models or adapters may have changed)."""
        self.starts.clear()
        self.recent.clear()
        self.unkept.clear()

    def find(self, job) -> SharedPrefix | None:
        """The kept start `job`'s prompt begins with (shorter than the prompt: its last token's logits are the
        prompt's own pass; its length becomes the job's `cached_tokens`), else a new one read when the prompt shares
        one with a recent prompt; None without."""
        owner, prompt = (id(job.model), job.adapter), job.prompt
        if not self.capacity or owner[0] in self.unkept:
            return None
        key = next((key for key in reversed(self.starts)
                    if key[:2] == owner and len(key[2]) < len(prompt) and tuple(prompt[:len(key[2])]) == key[2]), None)
        recent = self.recent.setdefault(owner, deque(maxlen=RECENT_PROMPTS))
        shared = max((shared_length([prompt[:-1], other]) for other in recent), default=0) if key is None else 0
        recent.append(prompt)
        if key is None:
            return self._read(owner, job, shared // BLOCK_TOKENS * BLOCK_TOKENS)
        self.reused += 1
        self.starts.move_to_end(key)
        job.cached_tokens = len(key[2])
        return self.starts[key]

    def _read(self, owner: tuple, job, length: int) -> SharedPrefix | None:
        if length < MIN_TOKENS:
            return None
        ids = job.prompt[:length]
        cache = self.forward(job.model, job.adapter, ids)
        if any(cache.is_linear) or any(cache.is_sliding):  # such a layer's cache cannot be continued after padding
            self.unkept.add(owner[0])
            return None
        self.read += 1
        self.starts[(*owner, tuple(ids))] = start = SharedPrefix(ids, cache)
        while len(self.starts) > self.capacity:
            self.starts.popitem(last=False)
        return start
