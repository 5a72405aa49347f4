"""Served traffic for the monitoring tests: request-log records as `ftpipe serve` writes them, for a bank's intent
classifier (a shared system prompt, short messages) and its new customers."""

from __future__ import annotations

from datetime import datetime, timezone

from ftpipe.core.server.request_log import RequestLog
from ftpipe_tests.intents import SYSTEM_PROMPT, intent_task

TASK = "bank"


def stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record(message: str, output: str, *, at: float, status: int = 200, latency: float = 100.0) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": message}]
    return {"time": stamp(at), "task": TASK, "model": TASK, "version": 1, "request_id": f"r{at}-{message[:8]}",
            "messages": messages, "output": output, "latency_ms": latency, "prompt_tokens": 90,
            "completion_tokens": 3, "total_tokens": 93, "status": status, "error": None}


def log(records: list[dict], **settings) -> None:
    writer = RequestLog(**settings)
    for found in records:
        writer.append(found)
    writer.close()


def new_customers(count: int) -> list[tuple[str, str]]:
    """(message, label) of customers the training never saw: the same intents, other wordings of the details."""
    rows = intent_task(seed=7).rows[:count]
    return [(row["messages"][1]["content"], row["messages"][2]["content"]) for row in rows]
