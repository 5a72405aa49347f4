"""The chat messages the server accepts, as the openai client sends them, and the one line a bad one gets."""

from __future__ import annotations

import json

import pytest

from ftpipe.core.server.app import ApiError, ChatRequest, _parsed


def test_a_role_the_server_does_not_read_is_named_with_the_roles_it_does() -> None:
    body = {"model": "t", "messages": [{"role": "developer", "content": "Be brief."}, {"role": "bot", "content": "hi"}]}
    with pytest.raises(ApiError) as refused:
        _parsed(ChatRequest, json.dumps(body).encode())
    assert str(refused.value) == ("messages.1.role: role must be 'system', 'developer' (read as the system's), 'user' or "
                                  "'assistant', got 'bot'")
    body["messages"][1]["role"] = "user"
    assert [m.role for m in _parsed(ChatRequest, json.dumps(body).encode()).messages] == ["system", "user"]
