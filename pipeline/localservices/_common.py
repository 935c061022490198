"""Shared machinery of the bundled local services.

Each service is a stdlib ``ThreadingHTTPServer`` run in its own subprocess, so
it never shares a GIL with the client under test and its clock-keeping is not
slowed down by the load it is measuring. What is common to all of them lives
here: the arrival log that is the server-side source of truth for "did the
client respect the limit", the limiters that enforce it (a sliding window, a
fixed-window quota and a leaky bucket) and the OpenAI / IETF rate-limit headers
that report their state, the busiest-window and bucket-replay arithmetic used by
``/_stats``, the deterministic faults
chosen by a key's prefix (:class:`Faults`), the request/response plumbing
(keep-alive, Content-Length always set, admin endpoints under ``/_``) and the
parent-side ``ServiceHandle`` that launches a service and reads its READY line.

Window convention, used by both the limiter and the statistics: an arrival at
time ``t`` belongs to every window ``[s, s + w)`` with ``s <= t < s + w``. Both
sides decide expiry with the same expression (:func:`expired`) on the very same
timestamps, so a limit enforced by the limiter can never show up as exceeded in
``/_stats`` because of float rounding.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from email.message import Message
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Protocol
from urllib.parse import unquote, urlsplit

READY_TIMEOUT_S = 15.0
RESET_PAUSE_S = 0.05
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------
# Windows, limits and statistics
# --------------------------------------------------------------------------


def expired(old_t: float, now: float, window_s: float) -> bool:
    """True when an arrival at ``old_t`` no longer counts in the window ending at ``now``.

    The single definition of the half-open window, shared by the limiter and
    :func:`busiest_window` so both agree bit for bit.
    """
    return old_t + window_s <= now


def busiest_window(times: Iterable[float], window_s: float, weights: Iterable[float] | None = None) -> float:
    """Largest total weight of arrivals inside any half-open window ``[s, s + window_s)``.

    Two pointers over the sorted arrivals: for each arrival taken as the last
    one of a window, drop from the front every arrival that is too old. The
    busiest window can always be slid so that it ends on an arrival, so this
    visits it. Weights default to 1 (count arrivals, and return an int); the
    LLM passes tokens.
    """
    if weights is None:
        points = sorted((t, 1) for t in times)
    else:
        points = sorted(zip(times, weights))
    best = running = 0
    left = 0
    for t, weight in points:
        running += weight
        while expired(points[left][0], t, window_s):
            running -= points[left][1]
            left += 1
        best = max(best, running)
    return best


def leaky_bucket_peak(times: Iterable[float], leak_rate: float) -> Fraction:
    """Fullest a leaky bucket gets when each arrival adds 1 and it drains ``leak_rate`` per second.

    Replays the arrivals in exact rational arithmetic, as :class:`LeakyBucket`
    does on the very same timestamps, so the admitted arrivals of a bucket of
    size B replay to at most B, bit for bit: the bucket's own account checked
    from the arrival log alone.
    """
    level, last, peak = Fraction(0), None, Fraction(0)
    rate = Fraction(leak_rate)
    for t in sorted(times):
        if last is not None:
            level = max(Fraction(0), level - rate * (Fraction(t) - Fraction(last)))
        level, last = level + 1, t
        peak = max(peak, level)
    return peak


class Admission(NamedTuple):
    """Outcome of ``try_admit`` on a :class:`Limiter`.

    ``t`` is the timestamp the limiter used; callers record the arrival with
    exactly this value. ``wait`` is 0 when admitted, else the seconds until
    enough budget frees (``inf`` if the request can never fit). ``reset_s``
    is the seconds until some budget next comes back (the oldest admission
    leaves a sliding window; a fixed window ends): what rate-limit headers report.
    """

    t: float
    wait: float
    remaining: dict[str, float]
    reset_s: float


class Limiter(Protocol):
    """What a service needs from its limiter: admit-or-wait, the limits, and a reset for ``/_reset``."""

    window_s: float
    limits: dict[str, float]

    def try_admit(self, costs: dict[str, float]) -> Admission: ...

    def clear(self) -> None: ...


class SlidingWindowLimiter:
    """Several budgets (e.g. requests and tokens) over one sliding window.

    All budgets are checked and charged under one lock, so a request is either
    admitted against every budget or against none. A request is admitted only
    if, counting it, no budget exceeds its limit within the last ``window_s``
    seconds. ``None`` limits are unlimited.
    """

    def __init__(self, window_s: float, limits: dict[str, float | None]) -> None:
        self.window_s = window_s
        self.limits = {name: limit for name, limit in limits.items() if limit is not None}
        self._lock = threading.Lock()
        self._entries: deque[tuple[float, dict[str, float]]] = deque()
        self._totals = dict.fromkeys(self.limits, 0.0)
        self._last_t = 0.0

    def try_admit(self, costs: dict[str, float]) -> Admission:
        """Admit and charge ``costs`` if every budget has room, else say how long to wait."""
        with self._lock:
            # Never step backwards, so the deque stays sorted even if the wall clock does.
            now = self._last_t = max(time.time(), self._last_t)
            self._prune(now)
            wait = self._wait_for(costs, now)
            if wait == 0:
                self._entries.append((now, costs))
                for name in self._totals:
                    self._totals[name] += costs.get(name, 0.0)
            remaining = {n: self.limits[n] - self._totals[n] for n in self.limits}
            reset_s = self._entries[0][0] + self.window_s - now if self._entries else 0.0
            return Admission(now, wait, remaining, reset_s)

    def clear(self) -> None:
        """Forget every admission (used by ``/_reset``)."""
        with self._lock:
            self._entries.clear()
            self._totals = dict.fromkeys(self.limits, 0.0)

    def _prune(self, now: float) -> None:
        while self._entries and expired(self._entries[0][0], now, self.window_s):
            _, costs = self._entries.popleft()
            for name in self._totals:
                self._totals[name] -= costs.get(name, 0.0)

    def _wait_for(self, costs: dict[str, float], now: float) -> float:
        """Seconds until enough of the oldest admissions expire to fit ``costs``.

        ``inf`` when a single request is larger than a whole budget: no amount
        of waiting helps, and the caller must say so instead of a 429.
        """
        if any(costs.get(name, 0.0) > limit for name, limit in self.limits.items()):
            return float("inf")
        excess = {name: self._totals[name] + costs.get(name, 0.0) - limit for name, limit in self.limits.items()}
        freed_at = now
        for t, old in self._entries:
            if all(value <= 0 for value in excess.values()):
                break
            excess = {name: value - old.get(name, 0.0) for name, value in excess.items()}
            freed_at = t + self.window_s
        return freed_at - now


class FixedWindowQuota:
    """Budgets that refill all at once at the end of each fixed window, like a per-hour API quota.

    Windows are ``[start + k * window_s, start + (k + 1) * window_s)``, from
    the moment the quota was made or last cleared. Within a window nothing is
    refused until a budget is spent; then every request waits for the window
    to end. Same interface as :class:`SlidingWindowLimiter`.

    ``aligned`` starts the first window at the whole second before that
    moment (so the first window is shorter), as providers that report their
    reset as integer epoch seconds do: with whole-second windows every window
    then ends exactly on the epoch second the header states, unrounded.
    """

    def __init__(self, window_s: float, limits: dict[str, float], *, aligned: bool = False) -> None:
        self.window_s = window_s
        self.limits = dict(limits)
        self.aligned = aligned
        self._lock = threading.Lock()
        self._last_t = 0.0
        self.clear()

    def try_admit(self, costs: dict[str, float]) -> Admission:
        """Admit and charge ``costs`` if the current window has room, else wait for its end."""
        with self._lock:
            now = self._last_t = max(time.time(), self._last_t)
            window = (now - self._start) // self.window_s
            if window != self._window:
                self._window, self._used = window, dict.fromkeys(self.limits, 0.0)
            reset_s = self._start + (window + 1) * self.window_s - now
            if any(costs.get(name, 0.0) > limit for name, limit in self.limits.items()):
                wait = float("inf")
            elif any(self._used[name] + costs.get(name, 0.0) > limit for name, limit in self.limits.items()):
                wait = reset_s
            else:
                wait = 0.0
                for name in self._used:
                    self._used[name] += costs.get(name, 0.0)
            remaining = {name: limit - self._used[name] for name, limit in self.limits.items()}
            return Admission(now, wait, remaining, reset_s)

    def clear(self) -> None:
        """Start a fresh window now (used by ``/_reset``)."""
        with self._lock:
            now = time.time()
            self._start, self._window = float(math.floor(now)) if self.aligned else now, 0.0
            self._used = dict.fromkeys(self.limits, 0.0)


class LeakyBucket:
    """A request bucket of ``size`` that leaks ``leak_rate`` per second, as Shopify's REST Admin API limits.

    Each admitted request adds its cost; the level drains continuously, never
    below 0. A request that would take the level over ``size`` is refused and
    adds nothing. The level is kept as an exact fraction of the float
    timestamps, so :func:`leaky_bucket_peak` replaying the arrival log gets
    the same levels, and no rounding lets a request in over the brim.

    As a :class:`Limiter`: ``limits`` is ``{"requests": size}``; ``window_s``
    is the time a full bucket takes to drain (``size / leak_rate``);
    ``remaining`` is the whole requests that would fit now (``floor(size -
    level)``, so ``size - remaining`` is the level rounded up); ``reset_s`` is
    the time until the bucket is empty; ``wait`` is the time until this
    request would fit.
    """

    def __init__(self, size: int, leak_rate: float) -> None:
        self.size = size
        self.leak_rate = leak_rate
        self.window_s = size / leak_rate
        self.limits: dict[str, float] = {"requests": size}
        self._rate = Fraction(leak_rate)
        self._lock = threading.Lock()
        self._last_t = 0.0
        self._level = Fraction(0)

    def try_admit(self, costs: dict[str, float]) -> Admission:
        """Drain the bucket to now, then add ``costs["requests"]`` if it fits under the brim."""
        cost = Fraction(costs.get("requests", 0.0))
        with self._lock:
            now = max(time.time(), self._last_t)
            self._level = max(Fraction(0), self._level - self._rate * (Fraction(now) - Fraction(self._last_t)))
            self._last_t = now
            if cost > self.size:
                wait = float("inf")
            elif self._level + cost > self.size:
                wait = float((self._level + cost - self.size) / self._rate)
            else:
                wait = 0.0
                self._level += cost
            remaining = {"requests": float(math.floor(self.size - self._level))}
            return Admission(now, wait, remaining, float(self._level / self._rate))

    def clear(self) -> None:
        """Empty the bucket (used by ``/_reset``)."""
        with self._lock:
            self._level = Fraction(0)


def ceil_ms(seconds: float) -> float:
    """Rounded up to the millisecond: a reset stated a hair late never brings a client back early."""
    return math.ceil(seconds * 1000) / 1000


def go_duration(seconds: float) -> str:
    """``360`` -> ``6m0s``, ``0.02`` -> ``20ms``, ``3723.5`` -> ``1h2m3.5s``: how OpenAI writes its resets.

    Rounded up to the millisecond (``0.0201`` -> ``21ms``), for the reason :func:`ceil_ms` gives.
    """
    seconds = ceil_ms(seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms" if seconds > 0 else "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


def openai_ratelimit_headers(admission: Admission, limits: dict[str, float]) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-<budget>`` for every budget that is set, as OpenAI sends them."""
    headers: dict[str, str] = {}
    for name, limit in limits.items():
        headers[f"x-ratelimit-limit-{name}"] = f"{limit:g}"
        headers[f"x-ratelimit-remaining-{name}"] = str(int(max(0.0, admission.remaining[name])))
        headers[f"x-ratelimit-reset-{name}"] = go_duration(admission.reset_s)
    return headers


def ietf_ratelimit_headers(admission: Admission, limits: dict[str, float]) -> dict[str, str]:
    """``RateLimit-Limit/-Remaining/-Reset`` for the request budget (draft-ietf-httpapi-ratelimit-headers
    up to -06, which counts requests only and gives the reset in whole seconds)."""
    return {
        "RateLimit-Limit": f"{limits['requests']:g}",
        "RateLimit-Remaining": str(int(max(0.0, admission.remaining["requests"]))),
        "RateLimit-Reset": str(math.ceil(admission.reset_s)),
    }


class ArrivalLog:
    """Every request a service saw, in arrival order, safe to append from handler threads.

    This is the server-side truth the tests and the demo check a client
    against: it is written by the server, never by the client being judged.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrivals: list[dict[str, Any]] = []

    def record(self, arrival: dict[str, Any]) -> None:
        with self._lock:
            self._arrivals.append(arrival)

    def snapshot(self) -> list[dict[str, Any]]:
        """A copy, so statistics never race with handler threads still appending."""
        with self._lock:
            return list(self._arrivals)

    def clear(self) -> None:
        with self._lock:
            self._arrivals.clear()


def count_by_status(arrivals: list[dict[str, Any]]) -> dict[str, int]:
    """``{"200": n, "429": m, ...}``; string keys because that is what JSON gives back."""
    counts: dict[str, int] = {}
    for arrival in arrivals:
        key = str(arrival["status"])
        counts[key] = counts.get(key, 0) + 1
    return counts


# --------------------------------------------------------------------------
# Request / reply plumbing shared by the services
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What a service needs to know about one request; the body is always fully read."""

    method: str
    path: str
    headers: Message
    body: bytes
    peer: str
    t: float  # arrival time, for replies decided before any limiter is consulted

    def bearer_ok(self, secret: str | None) -> bool:
        """True when no secret is configured or ``Authorization: Bearer <secret>`` matches."""
        if secret is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {secret}".encode())

    def json(self) -> Any:
        """The body parsed as JSON; raises ``ValueError`` when it is not."""
        return json.loads(self.body)


@dataclass
class Reply:
    """A response plus the facts the arrival log records about it.

    ``t`` overrides the arrival time with the limiter's timestamp, so the log
    holds exactly the values the limit was enforced on. ``cut_after`` makes the
    server write only that many body bytes (under a full Content-Length) and
    then reset the connection — the "connection dropped mid-body" fault.
    ``refused`` marks a refusal by the service's own limits (its limiter, the
    LLM's credit), whatever status its dialect gives it (GitHub's quota
    answers 403), so ``/_stats`` can tell refusals from admitted requests.
    """

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    t: float | None = None
    item: str | None = None
    tokens: int = 0
    cut_after: int | None = None
    refused: bool = False


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None, **facts: Any) -> Reply:
    """A JSON ``Reply``; ``facts`` are the arrival fields (``t``, ``item``, ``tokens``)."""
    return Reply(status, json.dumps(payload).encode(), headers=headers or {}, **facts)


class Service:
    """Per-process state of one service, shared by all handler threads.

    Subclasses implement :meth:`handle` and :meth:`stats`, and extend
    :meth:`reset`. Recording arrivals and the ``/_`` admin endpoints are done
    here, once, for every service.
    """

    def __init__(self) -> None:
        self.log = ArrivalLog()

    def handle(self, request: Request) -> Reply:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def reset(self) -> None:
        self.log.clear()

    def admin(self, request: Request) -> Reply:
        """``GET /_stats``, ``GET /_arrivals``, ``POST /_reset``; never recorded, never authenticated."""
        route = (request.method, request.path)
        if route == ("GET", "/_stats"):
            return json_reply(200, self.stats())
        if route == ("GET", "/_arrivals"):
            return json_reply(200, self.log.snapshot())
        if route == ("POST", "/_reset"):
            self.reset()
            return json_reply(200, {"reset": True})
        return json_reply(404, {"error": "no such admin endpoint"})

    def respond(self, request: Request) -> Reply:
        """Route admin calls aside; record every other request before it is answered.

        Recording before writing means a client that got its response can
        immediately read ``/_stats`` and find itself counted.
        """
        if request.path.startswith("/_"):
            return self.admin(request)
        reply = self.handle(request)
        self.log.record(
            {
                "t": reply.t if reply.t is not None else request.t,
                "path": request.path,
                "item": reply.item,
                "status": reply.status,
                "peer": request.peer,
                "tokens": reply.tokens,
                "refused": reply.refused,
            }
        )
        return reply


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler that turns sockets into ``Request``/``Reply``.

    Content-Length is always sent and request bodies are always drained, even
    for requests rejected early, so a keep-alive connection never desyncs.
    Nagle is off so small header/body writes are not delayed by delayed ACKs.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence per-request logging: the arrival log is the record, stderr stays for errors."""

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            method=method,
            path=unquote(urlsplit(self.path).path),
            headers=self.headers,
            body=self.rfile.read(length) if length else b"",
            peer=f"{self.client_address[0]}:{self.client_address[1]}",
            t=time.time(),
        )
        self._send(self.server.service.respond(request))

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if reply.cut_after is None:
            self.wfile.write(reply.body)
            return
        self.wfile.write(reply.body[: reply.cut_after])
        self._reset_connection()

    def _reset_connection(self) -> None:
        """Close with SO_LINGER 0 so the peer gets a TCP RST, not a clean FIN.

        The short pause first lets the headers and partial body reach the
        client, so it fails while reading the body, as with a real mid-body drop.
        """
        time.sleep(RESET_PAUSE_S)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    """Threading server sized for bursts of parallel clients.

    The default listen backlog of 5 would make the kernel drop SYNs under a
    burst, and the client would then see 1-second connect stalls that have
    nothing to do with the limit being tested.
    """

    daemon_threads = True
    request_queue_size = 512

    def __init__(self, port: int, service: Service) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.service = service

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up (timeouts, the reset fault) are normal here; report only real bugs."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


# --------------------------------------------------------------------------
# Deterministic faults, chosen by the prefix of a key (an item id, a prompt)
# --------------------------------------------------------------------------

SLOW_S = 5.0
RETRY_1S = {"Retry-After": "1"}
_HEAL = re.compile(r"heal(\d+)")

ErrorReply = Callable[[int, str, dict[str, str] | None], Reply]
"""``error(status, message, headers)``: a service's own error body (plain JSON, OpenAI-shaped, ...)."""


class Faults:
    """The fault prefixes every service understands, with one meaning everywhere.

    A key (the id in ``/items/{id}``, the text of an LLM prompt) whose part
    before the first ``-`` is a fault name gets that fault, every time:

    ``e500``             500
    ``e503``             503 with ``Retry-After: 1``
    ``e404`` / ``e400``  404 / 400
    ``throttle``         429 with ``Retry-After: 1`` every time (a 429 that never clears)
    ``throttlenoretry``  429 without Retry-After
    ``slow``             the normal answer after ``SLOW_S`` seconds (for client timeouts)
    ``badjson``          200, ``application/json``, body ``{not json``
    ``reset``            the normal answer's headers and half its body, then a TCP reset
    ``heal{N}``          500 for the first N hits of that exact key, then the normal answer

    The normal answer is built lazily by the caller (``ok``), so it still goes
    through the service's own limiter. Heal counters are per key, cleared by
    :meth:`clear`, and kept in ``state_file`` when one is given, so a service
    restarted between retry rounds heals as one long-lived service would.
    """

    def __init__(self, error: ErrorReply, state_file: str | None = None) -> None:
        self._error = error
        self._state_file = Path(state_file) if state_file else None
        self._lock = threading.Lock()
        self._heal_hits: dict[str, int] = self._load_heal_hits()

    def reply(self, key: str, ok: Callable[[], Reply]) -> Reply | None:
        """The fault ``key`` asks for, or ``None`` when its prefix names no fault."""
        prefix = key.partition("-")[0] if "-" in key else ""
        heal = _HEAL.fullmatch(prefix)
        if heal:
            return self.healing(key, int(heal.group(1)), ok)
        fixed = _FIXED_FAULTS.get(prefix)
        return fixed(self._error, ok) if fixed else None

    def healing(self, key: str, failures: int, ok: Callable[[], Reply]) -> Reply:
        """500 for the first ``failures`` hits of this exact key, then ``ok()`` forever."""
        with self._lock:
            hits = self._heal_hits[key] = self._heal_hits.get(key, 0) + 1
            self._save_heal_hits()
        return self._error(500, "transient failure", None) if hits <= failures else ok()

    def clear(self) -> None:
        """Forget every heal counter (used by ``/_reset``)."""
        with self._lock:
            self._heal_hits.clear()
            self._save_heal_hits()

    def _load_heal_hits(self) -> dict[str, int]:
        if self._state_file is None or not self._state_file.exists():
            return {}
        return {str(k): int(v) for k, v in json.loads(self._state_file.read_text() or "{}").items()}

    def _save_heal_hits(self) -> None:
        if self._state_file is not None:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            temp = self._state_file.with_suffix(".tmp")
            temp.write_text(json.dumps(self._heal_hits))
            temp.replace(self._state_file)


def _slow(ok: Callable[[], Reply]) -> Reply:
    time.sleep(SLOW_S)
    return ok()


def _cut_mid_body(ok: Callable[[], Reply]) -> Reply:
    reply = ok()
    reply.cut_after = len(reply.body) // 2
    return reply


_FIXED_FAULTS: dict[str, Callable[[ErrorReply, Callable[[], Reply]], Reply]] = {
    "e500": lambda error, ok: error(500, "internal server error", None),
    "e503": lambda error, ok: error(503, "service unavailable", RETRY_1S),
    "e404": lambda error, ok: error(404, "not found", None),
    "e400": lambda error, ok: error(400, "bad request", None),
    "throttle": lambda error, ok: error(429, "rate limited", RETRY_1S),
    "throttlenoretry": lambda error, ok: error(429, "rate limited", None),
    "slow": lambda error, ok: _slow(ok),
    "badjson": lambda error, ok: Reply(200, b"{not json"),
    "reset": lambda error, ok: _cut_mid_body(ok),
}


# --------------------------------------------------------------------------
# Subprocess side: flags, READY line, dying with the parent
# --------------------------------------------------------------------------


def service_parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the flags every service shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--watch-stdin",
        action="store_true",
        help="exit when stdin reaches EOF, i.e. when the parent that launched us dies",
    )
    parser.add_argument("--state-file", default=None, help="keep fault heal counters here across restarts")
    return parser


def serve(service: Service, port: int, watch_stdin: bool) -> None:
    """Bind, print ``READY <url>`` (the parent reads the port from it), serve forever."""
    server = _Server(port, service)
    if watch_stdin:
        threading.Thread(target=_exit_on_stdin_eof, daemon=True).start()
    print(f"READY http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


def _exit_on_stdin_eof() -> None:
    """Die with the parent, portably.

    The parent holds the write end of our stdin pipe and never writes; when it
    dies, for any reason including SIGKILL, the OS closes that end and this
    read returns.
    """
    sys.stdin.buffer.read()
    os._exit(0)


# --------------------------------------------------------------------------
# Parent side: launching and talking to a service
# --------------------------------------------------------------------------


class ServiceHandle:
    """A running local service: its URL, its admin endpoints, and a way to stop it.

    Use as a context manager so the subprocess is stopped even if the test or
    demo fails. The admin calls use urllib without proxies, so they work
    whatever HTTP client or proxy environment the caller has.
    """

    def __init__(self, url: str, process: subprocess.Popen[bytes], log_dir: tempfile.TemporaryDirectory[str]) -> None:
        self.url = url
        self.process = process
        self._log_dir = log_dir
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def stats(self) -> dict[str, Any]:
        """``GET /_stats``: the server's own account of what arrived."""
        return self._call("GET", "/_stats")

    def arrivals(self) -> list[dict[str, Any]]:
        """``GET /_arrivals``: every recorded request."""
        return self._call("GET", "/_arrivals")

    def settled_arrivals(self, quiet_s: float = 0.3, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Every recorded request, once none has been recorded for ``quiet_s``.

        A client killed with requests already on the wire leaves them in the
        server's socket buffers; on a loaded machine a handler thread may log
        them well after the client is gone. Counting the log as soon as the
        client died would miss them, so this waits for the log to stop growing.
        """
        deadline = time.monotonic() + timeout_s
        arrivals = self.arrivals()
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            latest = self.arrivals()
            if len(latest) == len(arrivals):
                return latest
            arrivals = latest
        raise TimeoutError(f"{self.url} still logged new requests after {timeout_s:g} s")

    def reset(self) -> None:
        """``POST /_reset``: forget arrivals, limiter budgets and fault counters."""
        self._call("POST", "/_reset")

    def post_admin(self, path: str, payload: Any) -> Any:
        """POST ``payload`` as JSON to a service's own admin endpoint, e.g. the LLM's ``/_topup``."""
        return self._call("POST", path, payload)

    def stop(self) -> None:
        """Terminate the subprocess and wait for it; safe to call twice."""
        _terminate(self.process)
        self._log_dir.cleanup()

    def __enter__(self) -> ServiceHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServiceHandle({self.url!r}, pid={self.process.pid})"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else b"" if method == "POST" else None
        request = urllib.request.Request(self.url + path, method=method, data=data)
        with self._opener.open(request, timeout=10) as response:
            return json.load(response)


def option_flags(options: dict[str, Any]) -> list[str]:
    """``{"max_concurrent_batches": 4, "ratelimit_headers": True}`` -> ``["--max-concurrent-batches", "4",
    "--ratelimit-headers"]``: ``True`` is a bare switch; ``None`` and ``False`` are omitted."""
    flags: list[str] = []
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        if value is True:
            flags.append(flag)
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags


def launch_service(module: str, options: dict[str, Any]) -> ServiceHandle:
    """Run ``python -m <module>`` with ``options`` as flags and wait for its READY line.

    stdout and stderr go to files, not pipes: a pipe nobody drains could fill
    up and freeze the server, and files are readable while it runs, on every
    OS. PYTHONPATH gets the project root so the child can import ``pipeline``
    whatever the caller's working directory is.
    """
    log_dir = tempfile.TemporaryDirectory(prefix="paceline-service-")
    out_path, err_path = Path(log_dir.name, "stdout"), Path(log_dir.name, "stderr")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", module, "--watch-stdin", *option_flags({"port": 0, **options})]
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env)
    try:
        url = _wait_for_ready(process, out_path, err_path, module)
    except BaseException:
        _terminate(process)
        log_dir.cleanup()
        raise
    return ServiceHandle(url, process, log_dir)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers; always reap and close our end of its stdin."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdin is not None:
        process.stdin.close()


def _wait_for_ready(process: subprocess.Popen[bytes], out_path: Path, err_path: Path, module: str) -> str:
    """Poll the child's stdout file for ``READY <url>``; fail loudly with its stderr."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        first_line = out_path.read_text(errors="replace").partition("\n")
        if first_line[1] and first_line[0].startswith("READY "):
            return first_line[0].removeprefix("READY ").strip()
        if process.poll() is not None:
            raise RuntimeError(
                f"{module} exited with code {process.returncode} before it was ready:\n"
                f"{err_path.read_text(errors='replace')}"
            )
        time.sleep(0.02)
    raise RuntimeError(
        f"{module} printed no READY line within {READY_TIMEOUT_S:.0f} s; stderr so far:\n"
        f"{err_path.read_text(errors='replace')}"
    )


def start_http_api(**options: Any) -> ServiceHandle:
    """Start the rate-limited JSON API / website, e.g. ``start_http_api(rps=50, token="x")``.

    Options are the flags of ``python -m pipeline.localservices.http_api``
    with dashes written as underscores; switches take ``True``, e.g.
    ``start_http_api(quota=100, quota_window_s=60, retry_after_date=True)``,
    and a provider's dialect is ``start_http_api(dialect="github", quota=60,
    quota_window_s=2)`` or ``start_http_api(dialect="shopify", bucket=40, leak_rate=2.0)``.
    """
    return launch_service(f"{__package__}.http_api", options)


def start_llm(**options: Any) -> ServiceHandle:
    """Start the OpenAI-compatible LLM, e.g. ``start_llm(tpm=6000, rpm=120, window_s=10)``.

    Options are the flags of ``python -m pipeline.localservices.llm`` with
    dashes written as underscores; ``start_llm(credit_tokens=5000)`` runs out
    of prepaid credit after 5,000 tokens (``handle.post_admin("/_topup", {"tokens": n})`` adds more).
    """
    return launch_service(f"{__package__}.llm", options)
