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


def test_an_unexpected_error_is_a_500_shaped_as_openai_errors_are(monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from ftpipe.core.server import app as server_app

    def broken(server, correction):
        raise TypeError("'<' not supported between instances of 'NoneType' and 'str'")

    monkeypatch.setattr(server_app, "_add_feedback", broken)
    server = server_app.Server()
    with TestClient(server_app.create_app(server), raise_server_exceptions=False) as client:
        answer = client.post("/v1/feedback", json={"request_id": "chatcmpl-1", "output": "x"})
    assert answer.status_code == 500 and answer.json() == {"error": {
        "message": "TypeError: '<' not supported between instances of 'NoneType' and 'str'", "type": "server_error",
        "param": None, "code": None}}
