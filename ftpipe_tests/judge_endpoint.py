"""A local HTTP server on 127.0.0.1 that answers like an OpenAI chat-completions endpoint, for testing the LLM
judge: its reply is a function of the request's last message, and it keeps every request it got."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "judge-1"  # the only model it serves
PAIR = re.compile(r"Reference answer:\n(.*)\n\nAnswer A:\n(.*)\n\nAnswer B:\n(.*)\n\nWhich answer", re.DOTALL)


def prefers_the_reference(user: str) -> str:
    """A fair judge: the answer equal to the reference is better; neither or both: tie."""
    reference, first, second = PAIR.search(user).groups()
    return "A" if first == reference != second else "B." if second == reference != first else "Tie"


class Endpoint:
    """`base_url` (…/v1) answers POST /v1/chat/completions with `decide(last message)`; `requests` holds each
    request's path, Authorization header and JSON body."""

    def __init__(self, decide: Callable[[str], str]):
        self.decide, self.requests = decide, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if body["model"] != MODEL:
                    return self._send(404, {"error": {"message": f"model {body['model']} not found"}})
                reply = endpoint.decide(body["messages"][-1]["content"])
                message = {"role": "assistant", "content": reply}
                return self._send(200, {
                    "id": "chat-1", "object": "chat.completion", "created": 0, "model": MODEL,
                    "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        return Handler


@contextmanager
def serving(decide: Callable[[str], str]) -> Iterator[Endpoint]:
    """An `Endpoint` serving in a thread for the duration of the block."""
    endpoint = Endpoint(decide)
    thread = threading.Thread(target=endpoint.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        endpoint.server.shutdown()
        endpoint.server.server_close()
