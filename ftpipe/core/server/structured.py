"""Structured answers, as OpenAI's `response_format` asks for them: `json_object` (any JSON object) or `json_schema`
(JSON valid against the request's schema). Each step, the tokens that cannot continue a valid answer are masked out of
the row's logits (llguidance), and the row ends once the answer is complete."""

from __future__ import annotations

import hashlib
import threading
import weakref
from typing import Any

# Between JSON's tokens: up to 16 spaces or newlines (a one-line answer, or one indented as the model learned it),
# so a model cannot spend its whole budget on whitespace.
WHITESPACE = r"[ \n]{0,16}"
# llguidance's view of a tokenizer takes a third of a second to build: one per vocabulary, for every task on a base
_by_tokenizer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_by_vocabulary: dict[str, Any] = {}
_building = threading.Lock()


def grammar(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar of `response_format` (None: free text); ValueError saying what is wrong with it."""
    from llguidance import LLMatcher

    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("json_schema.schema: a JSON schema (an object) is required")
    else:
        raise ValueError(f"type {kind!r}: one of text, json_object, json_schema")
    found = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": WHITESPACE})
    if error := LLMatcher.validate_grammar(found):
        raise ValueError(f"json_schema.schema: {error}")
    return found


class Constraint:
    """One answer's grammar: which tokens may come next, and whether the answer is complete."""

    def __init__(self, found_grammar: str, tokenizer, vocab_size: int, stops: frozenset[int]):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(_llguidance_tokenizer(tokenizer, vocab_size, stops), found_grammar)

    @property
    def complete(self) -> bool:
        """The answer is whole: nothing may follow."""
        return self.matcher.is_stopped()

    def accept(self, token: int) -> bool:
        """Take the answer's next token; True once the answer is complete."""
        self.matcher.consume_token(token)
        return self.complete


def mask(logits, constraints: list[Constraint | None]) -> Any:
    """`logits` (one row per answer) with the tokens each row's constraint forbids set to -inf; as they are when no
    row has one."""
    import numpy as np
    import torch

    rows = [row for row, constraint in enumerate(constraints) if constraint]
    if not rows:
        return logits
    words = torch.from_numpy(np.stack([np.frombuffer(constraints[row].matcher.compute_bitmask(), dtype=np.int32)
                                       for row in rows]))
    bits = ((words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten(1).bool()
    allowed = torch.zeros(len(rows), logits.shape[-1], dtype=torch.bool)
    known = min(bits.shape[1], allowed.shape[1])  # a token past the tokenizer's vocabulary is never allowed
    allowed[:, :known] = bits[:, :known]
    logits = logits.to(torch.float32, copy=True)  # a copy: the pass's own logits cannot change outside its mode
    logits[rows] = logits[rows].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits


def _llguidance_tokenizer(tokenizer, vocab_size: int, stops: frozenset[int]):
    """llguidance's view of a served tokenizer, built once per vocabulary; the answer may end on any of `stops`."""
    import llguidance.hf

    with _building:
        if tokenizer not in _by_tokenizer:
            text = f"{tokenizer.backend_tokenizer.to_str()}{vocab_size}{sorted(stops)}"
            key = hashlib.sha256(text.encode()).hexdigest()
            if key not in _by_vocabulary:
                built = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(stops))
                _by_vocabulary[key] = built
            _by_tokenizer[tokenizer] = _by_vocabulary[key]
        return _by_tokenizer[tokenizer]
