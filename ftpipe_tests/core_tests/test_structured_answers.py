"""`response_format` grammars on a real tokenizer: which tokens each step allows, and when an answer is complete."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ftpipe.core.server.structured import Constraint, grammar, mask
from ftpipe_tests.tiny_model import build_tokenizer

FRUIT = {"type": "json_schema", "json_schema": {"name": "fruit", "schema": {
    "type": "object", "properties": {"fruit": {"enum": ["plum", "lime"]}, "count": {"type": "integer"}},
    "required": ["fruit", "count"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def constraint(tokenizer, response_format: dict) -> Constraint:
    return Constraint(grammar(response_format), tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


def allowed(tokenizer, answer: Constraint) -> torch.Tensor:
    return mask(torch.zeros(1, len(tokenizer)), [answer])[0] == 0


def walk(tokenizer, answer: Constraint, text: str) -> bool:
    """Feed `text` token by token, each one allowed before it is taken; whether the answer is then complete."""
    for token in tokenizer.encode(text):
        assert allowed(tokenizer, answer)[token], (text, tokenizer.decode([token]))
        answer.accept(token)
    return answer.complete


def test_a_json_object_is_complete_at_its_closing_brace_and_not_before(tokenizer):
    text = json.dumps({"name": "Anna", "items": [1, 2.5, None], "nested": {"ok": True}})
    assert not walk(tokenizer, constraint(tokenizer, {"type": "json_object"}), text[:-1])
    assert walk(tokenizer, constraint(tokenizer, {"type": "json_object"}), text)
    start = allowed(tokenizer, constraint(tokenizer, {"type": "json_object"}))
    assert start[tokenizer.encode("{")[0]] and not start[tokenizer.encode("x")[0]] and not start[tokenizer.eos_token_id]


def test_a_schema_allows_only_its_values_and_ends_the_answer(tokenizer):
    answer = constraint(tokenizer, FRUIT)
    assert not walk(tokenizer, answer, '{"fruit": "')
    options = {tokenizer.decode([t]) for t in allowed(tokenizer, answer).nonzero().flatten().tolist()}
    assert options and all("plum".startswith(o) or "lime".startswith(o) for o in options), options
    assert walk(tokenizer, answer, 'lime", "count": 12}')
    with pytest.raises(AssertionError):
        walk(tokenizer, constraint(tokenizer, FRUIT), '{"fruit": "kiwi"')


def test_rows_without_a_grammar_keep_their_logits(tokenizer):
    logits = torch.randn(3, len(tokenizer))
    masked = mask(logits, [None, constraint(tokenizer, {"type": "json_object"}), None])
    assert torch.equal(masked[[0, 2]], logits[[0, 2]]) and torch.isinf(masked[1]).sum() > 0
    assert mask(logits, [None, None, None]) is logits


@pytest.mark.parametrize(("response_format", "message"), [
    ({"type": "xml"}, "type 'xml': one of text, json_object, json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema: a JSON schema (an object) is required"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}, "json_schema.schema: Invalid type: strin"),
])
def test_a_bad_response_format_says_what_is_wrong(response_format, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        grammar(response_format)
    assert grammar({"type": "text"}) is None and grammar(None) is None
