"""Alerts: a JSON POST to a webhook when a check fails (an alert that cannot be sent never fails the check)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

TIMEOUT_SECONDS = 10


def post_alert(url: str, payload: dict[str, Any]) -> str | None:
    """POST `payload` as JSON to `url`; None when it was delivered, else why not, in one line."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS):
            return None
    except OSError as error:
        return f"alert to {url} not delivered: {error}"
