"""Hear what a service says about its limits on every response, successes included.

A quota's ``remaining`` shrinks long before the first 429, but a work function
returns a payload, not the response, so the runner would only ever see the
headers of a refusal. Instead the runner hangs a ``Listener`` on the worker's
httpx client: each response's rate-limit headers are read on the thread that
made the call, and the runner takes them with the call's outcome. Clients that
are not httpx (a database connection) say nothing, which is normal.
"""

from __future__ import annotations

import threading
from typing import Any

from pipeline.pacing.headers import NO_SIGNAL, ServiceSignal, read_signal


class Listener:
    """What one worker's client heard, per call.

    The worker's calls may run on several threads at once, each with its own
    response: what a response said is kept for the thread whose call received
    it (a ``threading.local`` of this listener, made on the worker, never
    pickled), and taken by that thread when its call returns.
    """

    __slots__ = ("_heard",)

    def __init__(self) -> None:
        self._heard = threading.local()

    def listen(self, client: Any) -> bool:
        """Hook the httpx client in ``client`` (itself, or its ``.http``); False when there is none."""
        http = client if hasattr(client, "event_hooks") else getattr(client, "http", None)
        hooks = getattr(http, "event_hooks", None)
        if not isinstance(hooks, dict):
            return False
        http.event_hooks = {**hooks, "response": [*hooks.get("response", []), self._hear]}
        return True

    def take(self) -> ServiceSignal | None:
        """What the service said to this thread's call since the last take (None when it said nothing)."""
        signal = getattr(self._heard, "signal", None)
        self._heard.signal = None
        return signal

    def _hear(self, response: Any) -> None:
        signal = read_signal(response.headers)  # the same reading the refusal's verdict carries
        if signal != NO_SIGNAL:
            self._heard.signal = signal
