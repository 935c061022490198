"""robots.txt by RFC 9309: what a crawler may fetch from a site, and how far apart its requests must be.

Parsing and matching are Protego's (Scrapy's maintained parser), because the
rules are subtle and a home-made parser gets them wrong: the longest match
wins and Allow wins a tie, ``*`` matches any run of characters and a final
``$`` anchors, groups naming one product token are merged, and blank or
unknown lines do not end a group. ``tests/data/robots/conformance.json`` holds
the RFC's examples and Google's parser tests, checked over HTTP.

What this module adds is what the RFC says around the parser:

===========================  ===============================================================
fetch outcome                rules
===========================  ===============================================================
2xx                          the file's rules (its first ``PARSE_LIMIT_BYTES``, section 2.5)
3xx                          followed, up to ``MAX_REDIRECTS`` hops, even to another host;
                             the rules apply to the origin asked (2.3.1.2); more hops count
                             as "unavailable", as the RFC allows
4xx (401 and 403 included)   "unavailable": no rules, everything allowed (2.3.1.3)
429, 5xx, network error      "unreachable": everything disallowed for now (2.3.1.4), and
                             fetched again after ``UNREACHABLE_RETRY_S``, not kept for a day
===========================  ===============================================================

A 429 is read as "unreachable", not as a 4xx: it asks the crawler to slow
down, not to go ahead without rules (Google reads it the same way). Rules
are kept ``ROBOTS_TTL_S`` (24 h, section 2.4).

Groups are matched by the **product token** of the crawler's User-Agent, its
first word of letters, ``-`` and ``_`` (section 2.2.1): ``PacelineBot`` for
``PacelineBot/0.1 (+https://...)``, so a word in the User-Agent's comment
never selects a group.

The spacing a site asks for is outside the RFC but common: ``Crawl-delay: d``
(seconds, fractions allowed) and ``Request-rate: n/m`` (n requests per m
seconds) ask for at least ``max(d, m / n)`` seconds between requests. A
Request-rate's time-of-day window is ignored: the rate is kept all day, the
stricter reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protego import Protego

ROBOTS_TTL_S = 24 * 3600.0
"""RFC 9309 section 2.4: a crawler should not use a cached robots.txt for more than 24 hours."""
UNREACHABLE_RETRY_S = 60.0
"""How long an unreachable robots.txt keeps a site closed before it is fetched again: long enough that a
failing site is not asked again for every URL, short enough that a blip costs a minute, not a day."""
MAX_REDIRECTS = 5
"""RFC 9309 section 2.3.1.2: follow at least five consecutive redirects."""
PARSE_LIMIT_BYTES = 500 * 1024
"""RFC 9309 section 2.5: parse at least 500 KiB; the rest of a larger file is not read."""

_PRODUCT_TOKEN = re.compile(r"[A-Za-z_-]+")


def product_token(user_agent: str) -> str:
    """The product token robots.txt groups are matched against: ``PacelineBot`` for ``PacelineBot/0.1 (+...)``.

    Raises ``ValueError`` when the User-Agent does not start with one.
    """
    match = _PRODUCT_TOKEN.match(user_agent.strip())
    if match is None:
        raise ValueError(
            f"User-Agent {user_agent!r} does not start with a product token (letters, '-' or '_', RFC 9309 2.2.1). "
            "Start it with your crawler's name, e.g. 'MyBot/1.0 (+https://example.com/bot)'."
        )
    return match.group(0)


@dataclass(frozen=True)
class Robots:
    """One origin's robots.txt as last fetched: its rules, whether it was reachable, and until when it holds.

    ``rules`` is ``None`` when there are none to follow: everything is allowed
    ("unavailable"), or, when ``unreachable``, nothing is. ``why`` says what
    the fetch answered, for error messages.
    """

    rules: Protego | None
    unreachable: bool
    expires_at: float
    why: str

    @classmethod
    def parsed(cls, body: bytes, now: float, why: str = "HTTP 200") -> Robots:
        """The rules of a fetched file: UTF-8 (a byte-order mark skipped), its first 500 KiB only."""
        from protego import Protego

        text = body[:PARSE_LIMIT_BYTES].decode("utf-8-sig", errors="replace")
        return cls(Protego.parse(text), unreachable=False, expires_at=now + ROBOTS_TTL_S, why=why)

    @classmethod
    def unavailable(cls, now: float, why: str) -> Robots:
        """No robots.txt to read (4xx): the site may be crawled freely, RFC 9309 2.3.1.3."""
        return cls(None, unreachable=False, expires_at=now + ROBOTS_TTL_S, why=why)

    @classmethod
    def unreachable_now(cls, now: float, why: str, retry_s: float = UNREACHABLE_RETRY_S) -> Robots:
        """robots.txt could not be read (5xx, 429, network): nothing allowed until it is fetched again."""
        return cls(None, unreachable=True, expires_at=now + retry_s, why=why)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def allows(self, url: str, token: str) -> bool:
        """May the crawler whose product token is ``token`` fetch ``url``?"""
        if self.unreachable:
            return False
        return self.rules is None or self.rules.can_fetch(url, token)

    def spacing_s(self, token: str) -> float:
        """Seconds the site asks between requests: ``max(Crawl-delay, m / n)`` for ``Request-rate: n/m``; 0 if none."""
        if self.rules is None:
            return 0.0
        delay = self.rules.crawl_delay(token) or 0.0
        rate = self.rules.request_rate(token)
        return max(delay, rate.seconds / rate.requests if rate else 0.0)

    def asked(self, token: str) -> str:
        """The directives behind ``spacing_s``, as the site wrote them (``Crawl-delay: 0.5``), for messages."""
        if self.rules is None:
            return "nothing"
        delay, rate = self.rules.crawl_delay(token), self.rules.request_rate(token)
        said = [f"Crawl-delay: {delay:g}"] if delay else []
        said += [f"Request-rate: {rate.requests}/{rate.seconds}s"] if rate else []
        return ", ".join(said) or "nothing"


def fetch_robots(http: Any, origin: str, now: float, retry_s: float = UNREACHABLE_RETRY_S) -> Robots:
    """GET ``origin``/robots.txt with the crawler's own httpx client and read the answer by RFC 9309 2.3.1.

    Redirects are followed here, hop by hop, so the limit is ``MAX_REDIRECTS``
    whatever the client's own setting; the body is streamed and cut at
    ``PARSE_LIMIT_BYTES``, so a huge file is never held whole.
    """
    import httpx

    url = f"{origin}/robots.txt"
    try:
        for _ in range(MAX_REDIRECTS + 1):
            with http.stream("GET", url, follow_redirects=False) as response:
                if response.next_request is None:  # httpx sets it on a 3xx with a usable Location
                    return _read(response, now, retry_s)
                url = str(response.next_request.url)
    except httpx.HTTPError as error:
        return Robots.unreachable_now(now, f"{type(error).__name__}: {error}", retry_s)
    return Robots.unavailable(now, f"more than {MAX_REDIRECTS} redirects")


def _read(response: Any, now: float, retry_s: float) -> Robots:
    """One final (non-redirect) answer, by its status: 2xx rules, 4xx none, 429/5xx unreachable."""
    status = response.status_code
    why = f"HTTP {status}"
    if status == 429 or status >= 500:
        return Robots.unreachable_now(now, why, retry_s)
    if status >= 400:
        return Robots.unavailable(now, why)
    if not response.is_success:  # a 3xx without a usable Location: no file, and no answer that it is missing
        return Robots.unreachable_now(now, why, retry_s)
    body = bytearray()
    for piece in response.iter_bytes():
        body += piece
        if len(body) >= PARSE_LIMIT_BYTES:
            break
    return Robots.parsed(bytes(body), now, why)
