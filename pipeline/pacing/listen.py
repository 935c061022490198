"""Hear what a service says about its limits on every response, successes included.

A quota's ``remaining`` shrinks long before the first 429, but a work function
returns a payload, not the response, so the runner would only ever see the
headers of a refusal. Instead the runner hangs a response hook on the chunk's
httpx client: each response's rate-limit headers are read on the thread that
made the call, and the runner takes them with the call's outcome. Clients that
are not httpx (a database connection) say nothing, which is normal.
"""

from __future__ import annotations

import threading
from typing import Any

from pipeline.pacing.headers import NO_SIGNAL, ServiceSignal, read_signal

_heard: dict[int, ServiceSignal] = {}
"""The latest signal per calling thread. A plain dict, not a ``threading.local``: this module travels
to Burla workers by value inside the pickled chunk function, and a thread-local does not pickle."""


def listen(client: Any) -> bool:
    """Hook the httpx client in ``client`` (itself, or its ``.http``); False when there is none."""
    http = client if hasattr(client, "event_hooks") else getattr(client, "http", None)
    hooks = getattr(http, "event_hooks", None)
    if not isinstance(hooks, dict):
        return False
    http.event_hooks = {**hooks, "response": [*hooks.get("response", []), _hear]}
    return True


def take_heard() -> ServiceSignal | None:
    """What the service said on this thread since the last take (None when it said nothing)."""
    return _heard.pop(threading.get_ident(), None)


def _hear(response: Any) -> None:
    signal = read_signal(response.headers)  # the same reading the refusal's verdict carries
    if signal != NO_SIGNAL:
        _heard[threading.get_ident()] = signal
