"""A rate-limited JSON API, batch endpoint and small website, for demos and tests.

    python -m pipeline.localservices.http_api --port 0 --rps 50 [--window-s 1] \\
        [--quota 100 --quota-window-s 60] [--ratelimit-headers] [--retry-after-date] \\
        [--dialect github|discord --quota Q --quota-window-s S] \\
        [--dialect shopify --bucket 40 --leak-rate 2.0] \\
        [--max-concurrent-batches 4] [--token SECRET] [--demo-faults 0.03] \\
        [--latency-ms 0] [--latency-jitter-ms 0] [--crawl-delay S] [--state-file PATH]

It prints ``READY http://127.0.0.1:<port>`` once listening. It exists so that
"the job never broke the service's limits" is checked by the service itself:
every request is logged server-side (429s included) and ``/_stats`` reports
the busiest second and the busiest window.

Limits (every non-admin request goes through the limiter, before auth and
before routing, so no non-429 arrival was ever over the limit)
    ``--rps R --window-s W`` admits at most R x W requests in any sliding
    W-second window (W defaults to 1; R to unlimited). A longer window allows
    bursts a 1-second limit would refuse, as services that count per minute
    do. Over the limit: ``429``, ``{"error": "rate limited"}`` and
    ``Retry-After`` = whole seconds until the oldest admission leaves the
    window (at least 1).
    ``--quota Q --quota-window-s S`` (instead of ``--rps``) is a fixed-window
    quota: Q requests per window ``[start + kS, start + (k+1)S)`` from start or
    ``/_reset``, nothing refused until the Q-th, then ``429`` with
    ``Retry-After`` until the window ends. It always sends the headers below:
    the server for which a client that reads headers sees no 429 at all.
    ``--max-concurrent-batches K`` caps ``POST /batch`` calls in flight at once
    (over it: ``429``, ``Retry-After: 1``).

Rate-limit headers (``--ratelimit-headers``, or ``--quota``), on every
response the limiter admitted and on its own 429s, computed from the
limiter's state after this request
    ``x-ratelimit-limit-requests``      R x W (or Q)
    ``x-ratelimit-remaining-requests``  what is left in the window now
    ``x-ratelimit-reset-requests``      Go duration (``850ms``, ``1m0s``) until some
                                        budget comes back: the oldest admission leaves
                                        the sliding window, or the fixed window ends
    ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset``
                                        the same, IETF draft style (reset in whole seconds)
``--retry-after-date`` sends every ``Retry-After`` (limiter, batch and fault
429/503s) as an HTTP-date, rounded up to the whole second, instead of seconds.

Provider dialects (``--dialect``): the limit stated and refused exactly as a
real provider does, and nothing else (no ``x-ratelimit-*-requests``, no
``RateLimit-*``), so a client is judged on the provider's own words. Headers
go on every response the limiter decided (admitted or refused), computed from
its state after this request; ``/_stats`` counts the refusals whatever their status.
    ``github``  https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api
                ``--quota Q --quota-window-s S`` (S whole seconds): a fixed-window quota whose
                windows start on a whole epoch second, as GitHub's hourly quota does
                ``X-RateLimit-Limit: Q``, ``X-RateLimit-Remaining``, ``X-RateLimit-Used`` (Q - remaining),
                ``X-RateLimit-Reset`` (integer epoch seconds when the window ends, exact),
                ``X-RateLimit-Resource: core``. Spent: ``403`` (GitHub also uses 429; the 403 is
                the one that reads like a bad credential), remaining 0, no ``Retry-After``,
                ``{"message": "API rate limit exceeded for user ID 1. ...",
                "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"}``
    ``discord`` https://discord.com/developers/docs/topics/rate-limits
                ``--quota Q --quota-window-s S``: one bucket, a fixed-window quota from start
                ``X-RateLimit-Limit: Q``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset`` (epoch
                seconds with 3 decimals), ``X-RateLimit-Reset-After`` (seconds, 3 decimals, e.g.
                ``1.234``), ``X-RateLimit-Bucket: <hash>`` (rounded up to the millisecond, so a
                client never comes back early). Spent: ``429``, ``Retry-After`` (whole seconds,
                rounded up), ``X-RateLimit-Scope: user``,
                ``{"message": "You are being rate limited.", "retry_after": 1.234, "global": false}``
    ``shopify`` https://shopify.dev/docs/api/admin-rest/usage/rate-limits
                ``--bucket B --leak-rate L`` (defaults 40 and 2.0): a leaky bucket; each request
                adds 1, the bucket drains L per second continuously, a request that would
                overflow it is refused (``_common.LeakyBucket``)
                ``X-Shopify-Shop-Api-Call-Limit: <used>/<B>`` (the level after this request,
                rounded up). Over: ``429``, ``Retry-After: 2.0``, ``{"errors": "Exceeded 2 calls
                per second for api client. Reduce request rates to resume uninterrupted service."}``
``--dialect`` cannot be combined with ``--ratelimit-headers``, ``--retry-after-date`` or ``--rps``.

Auth
    ``--token SECRET`` requires ``Authorization: Bearer SECRET`` on every
    non-admin endpoint, else ``401 {"error": "bad token"}``.

Endpoints
    ``GET /items/{id}``   ``200 {"id": id, "value": crc32(id) % 1000}``
    ``POST /batch``       JSON list body -> ``200 {"upserted": len}``; takes
                          ``--latency-ms`` (50 ms when that is 0) so concurrency is visible
    ``GET /robots.txt``   disallows ``/private/``; with ``--crawl-delay S`` (whole seconds)
                          also ``Crawl-delay: S``, so a scraper's spacing is measured here
    ``GET /site/{n}``     product page: ``<title>Page n</title>``, ``<h1>``,
                          ``<a class="link">`` links, ``<p class="price">``
    ``GET /site/{fault}-{n}``  page n behind a fault prefix (below), e.g. ``/site/heal1-3``
    ``GET /private/{n}``  a page robots.txt forbids
    ``GET /js-shell``     an empty JavaScript app shell (nothing to scrape without JS)
    ``GET /_stats``, ``GET /_arrivals``, ``POST /_reset``  admin, never logged or limited

``--latency-ms`` is slept by every admitted, authorised non-batch request, to simulate work;
``--latency-jitter-ms J`` makes each sleep uniform in latency +- J (never below 0), and
the response then says how long it slept in ``Server-Timing: work;dur=<ms>``.

``/_stats`` counts every request: ``count``, ``by_status``, ``refused`` (the limiter's own
refusals, whatever their status; each arrival in ``/_arrivals`` says ``refused``),
``busiest_1s`` (admitted arrivals, i.e. neither refused nor 429, in the busiest sliding
second), ``busiest_1s_all`` (all arrivals), ``dialect``,
``window_s`` / ``limit_per_window`` / ``busiest_window`` (the limiter's window and the
admitted arrivals in its busiest sliding instance; with ``--quota`` a sliding window
straddling a boundary may hold up to 2Q, which is what fixed windows allow; with
``shopify`` the window is B / L, the time a full bucket takes to drain, and
``bucket_peak`` is the fullest the bucket gets when the admitted arrivals are
replayed through it: at most B), ``peak_concurrent_batches``, ``peers``, ``max_peer_rps_1s``.

Faults, chosen by the item id's prefix in ``GET /items/{id}`` or the page's in
``GET /site/{fault}-{n}`` (deterministic; the same prefixes, shared with the LLM
server's prompts, are implemented once in ``_common.Faults``)
    ``e500-*``            500 every time
    ``e503-*``            503 with ``Retry-After: 1`` every time
    ``e404-*``            404 every time
    ``e400-*``            400 every time
    ``throttle-*``        429 with ``Retry-After: 1`` every time (a 429 that never clears)
    ``throttlenoretry-*`` 429 without ``Retry-After``
    ``slow-*``            answers 200 after 5 s (for client timeouts)
    ``badjson-*``         200, ``application/json``, body ``{not json``
    ``reset-*``           headers with a full Content-Length, part of the body, then a TCP reset
    ``heal{N}-*``         500 for the first N hits of that exact id, then 200 forever
                          (per-id counter, cleared by ``/_reset``): a transient fault that
                          a client must not retry in a tight loop, and a retry round heals
    plain ids             with ``--demo-faults P``: a stable fraction P (by crc32 of the id)
                          behaves as ``heal1``, and a fraction P/5 is 404 forever
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import threading
import time
import zlib
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol

from pipeline.localservices._common import (
    RETRY_1S,
    Admission,
    Faults,
    FixedWindowQuota,
    LeakyBucket,
    Limiter,
    Reply,
    Request,
    Service,
    SlidingWindowLimiter,
    busiest_window,
    ceil_ms,
    count_by_status,
    ietf_ratelimit_headers,
    json_reply,
    leaky_bucket_peak,
    openai_ratelimit_headers,
    serve,
    service_parser,
)

DEFAULT_BATCH_S = 0.05
ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"
JS_SHELL = '<html><head><title></title><script src="/app.js"></script></head><body><div id="root"></div></body></html>'
GITHUB_DOCS = "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
GITHUB_MESSAGE = (
    "API rate limit exceeded for user ID 1. If you reach out to GitHub Support for help, please include "
    "the request ID 0000:0000:0000000:0000000:00000000."
)
DISCORD_BUCKET = hashlib.md5(b"GET /items").hexdigest()  # Discord's buckets are opaque hashes
SHOPIFY_ERRORS = "Exceeded 2 calls per second for api client. Reduce request rates to resume uninterrupted service."
SHOPIFY_BUCKET, SHOPIFY_LEAK_RATE = 40, 2.0


def item_value(item_id: str) -> int:
    """The deterministic value served for an item, so clients can verify what they stored."""
    return zlib.crc32(item_id.encode()) % 1000


def _item_ok(item_id: str) -> Reply:
    return json_reply(200, {"id": item_id, "value": item_value(item_id)})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return json_reply(status, {"error": message}, headers)


class Dialect(Protocol):
    """How a service states its limit: headers on every reply the limiter decided, and its refusal."""

    def headers(self, admission: Admission) -> dict[str, str]: ...

    def refusal(self, admission: Admission) -> Reply: ...


@dataclass(frozen=True)
class Plain:
    """This server's own dialect: ``429`` + ``Retry-After``, and OpenAI / IETF headers when asked."""

    limits: dict[str, float]
    ratelimit_headers: bool

    def headers(self, admission: Admission) -> dict[str, str]:
        if not (self.ratelimit_headers and self.limits):
            return {}
        return openai_ratelimit_headers(admission, self.limits) | ietf_ratelimit_headers(admission, self.limits)

    def refusal(self, admission: Admission) -> Reply:
        return _error(429, "rate limited", {"Retry-After": str(max(1, math.ceil(admission.wait)))})


@dataclass(frozen=True)
class GitHub:
    """GitHub's primary rate limit: ``X-RateLimit-*`` with an epoch reset, and a 403 once spent."""

    limit: int

    def headers(self, admission: Admission) -> dict[str, str]:
        remaining = int(admission.remaining["requests"])
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Used": str(self.limit - remaining),
            # The quota is aligned to whole seconds, so the window's end is an integer: exact, not rounded.
            "X-RateLimit-Reset": str(round(admission.t + admission.reset_s)),
            "X-RateLimit-Resource": "core",
        }

    def refusal(self, admission: Admission) -> Reply:
        return json_reply(403, {"message": GITHUB_MESSAGE, "documentation_url": GITHUB_DOCS})


@dataclass(frozen=True)
class Discord:
    """Discord's per-bucket limit: epoch and delta resets with fractions, a 429 with ``retry_after`` in the body."""

    limit: int

    def headers(self, admission: Admission) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(int(admission.remaining["requests"])),
            "X-RateLimit-Reset": f"{ceil_ms(admission.t + admission.reset_s):.3f}",
            "X-RateLimit-Reset-After": f"{ceil_ms(admission.reset_s):.3f}",
            "X-RateLimit-Bucket": DISCORD_BUCKET,
        }

    def refusal(self, admission: Admission) -> Reply:
        body = {"message": "You are being rate limited.", "retry_after": ceil_ms(admission.wait), "global": False}
        return json_reply(429, body, {"Retry-After": str(math.ceil(admission.wait)), "X-RateLimit-Scope": "user"})


@dataclass(frozen=True)
class Shopify:
    """Shopify's REST Admin leaky bucket: the level in ``X-Shopify-Shop-Api-Call-Limit``, a flat 2 s Retry-After."""

    size: int

    def headers(self, admission: Admission) -> dict[str, str]:
        used = self.size - int(admission.remaining["requests"])
        return {"X-Shopify-Shop-Api-Call-Limit": f"{used}/{self.size}"}

    def refusal(self, admission: Admission) -> Reply:
        return json_reply(429, {"errors": SHOPIFY_ERRORS}, {"Retry-After": "2.0"})


def _item_id(path: str) -> str | None:
    """The id in ``/items/{id}``, recorded with every arrival on that path (even 429s)."""
    if not path.startswith("/items/"):
        return None
    return path.removeprefix("/items/") or None


def _site_page(n: int) -> str:
    links = "".join(
        f'<li><a class="link" href="{href}">{text}</a></li>'
        for href, text in ((f"/site/{n + 1}", "next"), (f"/site/{n * 2}", "double"), (f"/private/{n}", "private"))
    )
    return (
        f"<html><head><title>Page {n}</title></head><body><h1>Product {n}</h1>"
        f'<ul>{links}</ul><p class="price">${(n * 7) % 100 + 0.99:.2f}</p></body></html>'
    )


def _private_page(n: int) -> str:
    return f"<html><head><title>Private {n}</title></head><body><h1>Secret {n}</h1></body></html>"


def _html(text: str) -> Reply:
    return Reply(200, text.encode(), "text/html; charset=utf-8")


class HttpApi(Service):
    """State shared by handler threads: limiter, heal counters, batch concurrency.

    ``limiter`` counts every non-admin request (a sliding window for
    ``--rps``, a fixed window for ``--quota``, a leaky bucket for Shopify);
    ``dialect`` says how its state and refusals are worded (this server's own
    ``Plain`` by default). ``rng`` draws the latency jitter; tests and
    benchmarks may seed it.
    """

    def __init__(
        self,
        limiter: Limiter,
        token: str | None,
        demo_faults: float,
        latency_ms: float,
        max_concurrent_batches: int | None,
        state_file: str | None = None,
        *,
        latency_jitter_ms: float = 0.0,
        ratelimit_headers: bool = False,
        dialect: Dialect | None = None,
        retry_after_date: bool = False,
        crawl_delay_s: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self.limiter = limiter
        self.token = token
        self.demo_faults = demo_faults
        self.latency_s = latency_ms / 1000
        self.batch_s = self.latency_s or DEFAULT_BATCH_S
        self.jitter_s = latency_jitter_ms / 1000
        self.dialect = dialect or Plain(limiter.limits, ratelimit_headers)
        self.retry_after_date = retry_after_date
        self.robots_txt = ROBOTS_TXT + ("" if crawl_delay_s is None else f"Crawl-delay: {crawl_delay_s}\n")
        self.max_batches = max_concurrent_batches
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.faults = Faults(_error, state_file)
        self.page_faults = Faults(_error)  # its own heal counters: /site/heal1-1 is not /items/heal1-1
        self._batches_in_flight = 0
        self._peak_batches = 0

    def handle(self, request: Request) -> Reply:
        """Limiter first (so every non-429 arrival was admitted), then auth, then the route."""
        admission = self.limiter.try_admit({"requests": 1})
        if admission.wait == 0:
            reply = self._admitted(request)
        else:
            reply = self.dialect.refusal(admission)
            reply.refused = True
        reply.headers = self._limit_headers(reply.headers, admission)
        reply.t = admission.t
        reply.item = _item_id(request.path)
        return reply

    def _limit_headers(self, headers: dict[str, str], admission: Admission) -> dict[str, str]:
        """A copy of ``headers`` (they may be a shared constant) with the limiter's state and Retry-After as asked."""
        headers = {**headers, **self.dialect.headers(admission)}
        if self.retry_after_date and "Retry-After" in headers:
            # HTTP-dates have whole seconds: round the moment up, so the client never comes back early.
            headers["Retry-After"] = formatdate(math.ceil(admission.t + float(headers["Retry-After"])), usegmt=True)
        return headers

    def _work(self, base_s: float) -> dict[str, str]:
        """Sleep ``base_s`` +- the jitter, as the service's own work; say how long in ``Server-Timing``."""
        seconds = max(0.0, base_s + self._rng.uniform(-self.jitter_s, self.jitter_s))
        time.sleep(seconds)
        return {"Server-Timing": f"work;dur={seconds * 1000:.3f}"} if self.jitter_s else {}

    def _admitted(self, request: Request) -> Reply:
        if not request.bearer_ok(self.token):
            return _error(401, "bad token")
        if (request.method, request.path) == ("POST", "/batch"):
            return self._batch(request)
        timing = self._work(self.latency_s)
        reply = self._get(request) if request.method == "GET" else _error(404, "not found")
        reply.headers = {**reply.headers, **timing}
        return reply

    def _get(self, request: Request) -> Reply:
        item_id = _item_id(request.path)
        if item_id:
            return self._item(item_id)
        kind, _, rest = request.path.lstrip("/").partition("/")
        if kind in ("site", "private") and rest.isdigit():
            return _html((_site_page if kind == "site" else _private_page)(int(rest)))
        if kind == "site":
            return self._faulty_page(rest)
        if request.path == "/robots.txt":
            return Reply(200, self.robots_txt.encode(), "text/plain; charset=utf-8")
        if request.path == "/js-shell":
            return _html(JS_SHELL)
        return _error(404, "not found")

    def _faulty_page(self, page: str) -> Reply:
        """``/site/{fault}-{n}``: page n behind the fault its prefix names, for scrapers."""
        n = page.rpartition("-")[2]
        fault = self.page_faults.reply(page, lambda: _html(_site_page(int(n)))) if n.isdigit() else None
        return fault if fault is not None else _error(404, "not found")

    def _item(self, item_id: str) -> Reply:
        fault = self.faults.reply(item_id, lambda: _item_ok(item_id))
        return fault if fault is not None else self._plain(item_id)

    def _plain(self, item_id: str) -> Reply:
        """A stable pseudo-random slice of ids fails, so the demo has something to retry."""
        u = zlib.crc32(b"demo-fault:" + item_id.encode()) / 2**32
        if u < self.demo_faults / 5:
            return _error(404, "not found")
        if u < self.demo_faults / 5 + self.demo_faults:
            return self.faults.healing(item_id, 1, lambda: _item_ok(item_id))
        return _item_ok(item_id)

    def _batch(self, request: Request) -> Reply:
        try:
            rows = request.json()
        except ValueError:
            rows = None
        if not isinstance(rows, list):
            return _error(400, "body must be a JSON list")
        if not self._enter_batch():
            return _error(429, "too many concurrent batches", RETRY_1S)
        try:
            timing = self._work(self.batch_s)
        finally:
            with self._lock:
                self._batches_in_flight -= 1
        return json_reply(200, {"upserted": len(rows)}, timing)

    def _enter_batch(self) -> bool:
        with self._lock:
            if self.max_batches is not None and self._batches_in_flight >= self.max_batches:
                return False
            self._batches_in_flight += 1
            self._peak_batches = max(self._peak_batches, self._batches_in_flight)
            return True

    def stats(self) -> dict[str, Any]:
        arrivals = self.log.snapshot()
        by_peer: dict[str, list[float]] = {}
        for arrival in arrivals:
            by_peer.setdefault(arrival["peer"], []).append(arrival["t"])
        admitted = [a["t"] for a in arrivals if not a["refused"] and a["status"] != 429]
        stats = {
            "count": len(arrivals),
            "by_status": count_by_status(arrivals),
            "refused": sum(1 for a in arrivals if a["refused"]),
            "dialect": type(self.dialect).__name__.lower(),
            "busiest_1s": busiest_window(admitted, 1.0),
            "busiest_1s_all": busiest_window((a["t"] for a in arrivals), 1.0),
            "window_s": self.limiter.window_s,
            "limit_per_window": self.limiter.limits.get("requests"),
            "busiest_window": busiest_window(admitted, self.limiter.window_s),
            "peak_concurrent_batches": self._peak_batches,
            "peers": len(by_peer),
            "max_peer_rps_1s": max((busiest_window(ts, 1.0) for ts in by_peer.values()), default=0),
        }
        if isinstance(self.limiter, LeakyBucket):
            # Everything the bucket let through, a throttle fault's 429 included: the bucket's own account.
            through = [a["t"] for a in arrivals if not a["refused"]]
            stats["bucket_peak"] = float(leaky_bucket_peak(through, self.limiter.leak_rate))
        return stats

    def reset(self) -> None:
        """Clear arrivals, the rate window, heal counters and the batch peak.

        Batches still in flight keep their slot, so the in-flight count stays true.
        """
        super().reset()
        self.limiter.clear()
        self.faults.clear()
        self.page_faults.clear()
        with self._lock:
            self._peak_batches = self._batches_in_flight


def main(argv: list[str] | None = None) -> None:
    """Parse flags and serve forever."""
    parser = service_parser("Rate-limited JSON API, batch endpoint and website with deterministic faults.")
    parser.add_argument(
        "--rps", type=float, default=None, help="requests per second, counted over --window-s (default unlimited)"
    )
    parser.add_argument(
        "--window-s",
        type=float,
        default=1.0,
        help="the sliding window --rps is counted over: rps x W requests per W seconds (default 1)",
    )
    parser.add_argument(
        "--quota",
        type=int,
        default=None,
        help="requests per fixed --quota-window-s window, refused only once spent (instead of --rps)",
    )
    parser.add_argument("--quota-window-s", type=float, default=60.0)
    parser.add_argument(
        "--ratelimit-headers",
        action="store_true",
        help="send x-ratelimit-* and RateLimit-* headers (always on with --quota)",
    )
    parser.add_argument("--retry-after-date", action="store_true", help="send Retry-After as an HTTP-date")
    parser.add_argument(
        "--dialect",
        choices=("github", "discord", "shopify"),
        default=None,
        help="state and refuse the limit as this provider does (github/discord take --quota, shopify --bucket)",
    )
    parser.add_argument("--bucket", type=int, default=None, help=f"shopify: bucket size (default {SHOPIFY_BUCKET})")
    parser.add_argument(
        "--leak-rate",
        type=float,
        default=None,
        help=f"shopify: requests leaked per second (default {SHOPIFY_LEAK_RATE})",
    )
    parser.add_argument("--max-concurrent-batches", type=int, default=None)
    parser.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN")
    parser.add_argument("--demo-faults", type=float, default=0.0, help="fraction of plain ids that fail once")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--latency-jitter-ms", type=float, default=0.0, help="latency varies uniformly by +- this")
    parser.add_argument(
        "--crawl-delay",
        type=int,
        default=None,
        help="robots.txt asks Crawl-delay: S (whole seconds, as Python's robotparser reads it)",
    )
    args = parser.parse_args(argv)
    limiter = _limiter(parser, args)
    service = HttpApi(
        limiter,
        args.token,
        args.demo_faults,
        args.latency_ms,
        args.max_concurrent_batches,
        args.state_file,
        latency_jitter_ms=args.latency_jitter_ms,
        ratelimit_headers=args.ratelimit_headers or args.quota is not None,
        dialect=_dialect(parser, args, limiter),
        retry_after_date=args.retry_after_date,
        crawl_delay_s=args.crawl_delay,
    )
    serve(service, args.port, args.watch_stdin)


def _limiter(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Limiter:
    """The leaky bucket, the fixed-window quota or the sliding rps window; refuse flags that cannot be honoured."""
    if (args.bucket is not None or args.leak_rate is not None) and args.dialect != "shopify":
        parser.error("--bucket and --leak-rate are the shopify dialect's limit: add --dialect shopify")
    if args.dialect == "shopify":
        bucket = SHOPIFY_BUCKET if args.bucket is None else args.bucket
        leak_rate = SHOPIFY_LEAK_RATE if args.leak_rate is None else args.leak_rate
        if args.quota is not None or args.rps is not None or bucket < 1 or leak_rate <= 0:
            parser.error("--dialect shopify is limited by --bucket (>= 1) and --leak-rate (> 0) only")
        return LeakyBucket(bucket, leak_rate)
    if args.dialect is not None and args.quota is None:
        parser.error(f"--dialect {args.dialect} needs --quota Q --quota-window-s S")
    if args.quota is not None:
        if args.rps is not None:
            parser.error("--quota and --rps are two ways to limit: choose one")
        if args.quota < 1 or args.quota_window_s <= 0:
            parser.error("--quota must be >= 1 and --quota-window-s > 0")
        aligned = args.dialect == "github"
        if aligned and args.quota_window_s != int(args.quota_window_s):
            parser.error("--dialect github states its reset in epoch seconds: --quota-window-s must be whole")
        return FixedWindowQuota(args.quota_window_s, {"requests": args.quota}, aligned=aligned)
    if args.window_s <= 0 or (args.rps is not None and args.rps * args.window_s < 1):
        parser.error("--window-s must be > 0, and --rps x --window-s at least one request")
    return SlidingWindowLimiter(args.window_s, {"requests": args.rps * args.window_s if args.rps else None})


def _dialect(parser: argparse.ArgumentParser, args: argparse.Namespace, limiter: Limiter) -> Dialect | None:
    """The provider's dialect for ``--dialect``, or ``None`` for this server's own (``Plain``)."""
    if args.dialect is None:
        return None
    if args.ratelimit_headers or args.retry_after_date:
        parser.error("--dialect sends only its provider's headers: drop --ratelimit-headers and --retry-after-date")
    limit = int(limiter.limits["requests"])
    return {"github": GitHub, "discord": Discord, "shopify": Shopify}[args.dialect](limit)


if __name__ == "__main__":
    main()
