"""Polite scraping of static pages: httpx (HTTP/2 where offered) and selectolax.

``ScrapeWork`` fetches each URL item with one httpx client per chunk and
stores the page title plus the text of each configured CSS selector. It is
polite by construction:

* **robots.txt** is fetched with the same client and User-Agent, in a call of
  its own: the call that first needs a site's rules fetches only robots.txt and
  raises ``CallAgain``, so the runner gives the URL the next paced slot and
  every request a site receives (robots.txt included) went through the pacer.
  A worker keeps the rules it fetched across its chunks, per origin, for
  ``ROBOTS_TTL_S`` (24 h, RFC 9309): a site sees robots.txt once per worker,
  not once per chunk. A disallowed URL is never requested: its row is a
  permanent ``robots_disallowed``. An unreachable robots.txt (5xx, 429,
  timeout) makes the item retryable rather than guessing; a missing one (404)
  allows all.
* **Rate**: the engine paces each worker; 429 and 503 are retryable and
  Retry-After is honoured. Declare the per-domain contract as the service
  limit (``per_worker_requests_per_second`` for one worker's politeness,
  ``max_workers_per_domain`` with ``ByDomain`` items for how many workers may hit
  a domain at once, ``requests_per_second`` for the domain's total).
* **Crawl-delay: d** (whole seconds, as ``urllib.robotparser`` reads it) means
  at most one request every d seconds to that site from all its workers. With
  no coordination between workers, each worker spaces its own requests to the
  site by k x d, where k is ``workers_per_domain``: the service's
  ``max_workers_per_domain``, else its ``max_workers`` (``scrape_work`` reads
  them). So the site sees at most k requests in any k x d seconds, the rate it
  asked for; two workers' requests may still land closer than d apart. The
  wait goes through the pacer (``CallAgain(after_s=...)``), not a sleep in the
  call. With neither bound declared, a site that asks for a Crawl-delay gets no
  request beyond its robots.txt: its URLs fail permanently with
  ``crawl_delay_unbounded``, naming the fields to declare.

What it does **not** do: run JavaScript. A page that is an empty JavaScript
shell (no visible text, only a mount point such as ``#root`` or scripts) is
recorded as the permanent failure ``needs_javascript``, not as an empty
success; such sites need a browser-based tool (e.g. Playwright).
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.items import ItemSource
from pipeline.outcomes import CallAgain, Permanent, Retryable
from pipeline.spec import Service
from pipeline.work import Item
from pipeline.workloads.common import WorkloadConfigError, check, check_header_values
from pipeline.workloads.http_api import HttpClientConfig

DEFAULT_USER_AGENT = "PacelineBot/0.1 (+https://github.com/paceline)"
RESERVED_FIELDS = ("url", "title", "http_version")
_JS_MOUNT_POINTS = "#root, #app, #__next, #__nuxt, [data-reactroot], [ng-app], script"
_INVISIBLE_TAGS = ["script", "style", "noscript", "template"]
_DOMAIN = r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<domain>[^/?#]*)"
ROBOTS_TTL_S = 24 * 3600.0
"""RFC 9309 section 2.4: a crawler should not use a cached robots.txt for more than 24 hours."""


@dataclass(frozen=True, kw_only=True)
class ScrapeWork(HttpClientConfig):
    """Fetch a URL item, honour robots.txt, and store ``title`` plus each selector's text.

    ``selectors`` maps a payload field to a CSS selector; the first matching
    element's text (stripped) is stored, or ``None`` when nothing matches.
    Every selector is compiled at construction, so a typo fails before any
    request. Redirects are followed; robots.txt is checked for the URL as given.
    ``headers``, ``token`` (bearer) and ``timeout_s`` are as for ``HttpWork``.
    ``workers_per_domain`` bounds how many workers may hit one site at once;
    a robots.txt ``Crawl-delay: d`` spaces each worker's requests to that site
    by ``workers_per_domain`` x d (``None``: no bound, so such a site is refused).
    """

    selectors: Mapping[str, str] = field(default_factory=dict)
    user_agent: str = DEFAULT_USER_AGENT
    http2: bool = True
    workers_per_domain: int | None = None

    def __post_init__(self) -> None:
        owner = "ScrapeWork"
        self._check_client()
        check_header_values(owner, {"User-Agent": self.user_agent})
        check(
            bool(self.user_agent.strip()),
            owner,
            "user_agent",
            "is empty",
            "Name your crawler and a contact URL, e.g. 'MyBot/1.0 (+https://example.com/bot)'.",
        )
        check(
            not self.http2 or importlib.util.find_spec("h2") is not None,
            owner,
            "http2",
            "is on but the 'h2' package is not installed",
            "Install httpx[http2], or pass http2=False.",
        )
        check(
            self.workers_per_domain is None
            or (isinstance(self.workers_per_domain, int) and self.workers_per_domain >= 1),
            owner,
            "workers_per_domain",
            f"is {self.workers_per_domain!r}",
            "Give a whole number of workers >= 1, or None when nothing bounds them.",
        )
        for name, selector in self.selectors.items():
            check(
                isinstance(name, str) and name.isidentifier() and name not in RESERVED_FIELDS,
                owner,
                "selectors",
                f"field name {name!r} is not usable",
                f"Use a plain name other than {', '.join(RESERVED_FIELDS)}.",
            )
            _compile_selector(name, selector)

    def connect(self) -> Any:
        """HTTP/2 where the server offers it (over TLS); plain http:// stays HTTP/1.1."""
        client = self._client({"User-Agent": self.user_agent}, http2=self.http2, follow_redirects=True)
        return _Session(client, self.user_agent, self.workers_per_domain, _worker_sites())

    def call(self, client: Any, item: Item) -> Any:
        from selectolax.lexbor import LexborHTMLParser

        url = _url(item)
        client.admit(url)
        response = client.http.get(url)
        response.raise_for_status()
        content_type = response.headers.get("content-type", "")
        if "html" not in content_type:
            raise Permanent(f"{url} is {content_type or 'of no declared type'}, not an HTML page", status="not_html")
        tree = LexborHTMLParser(response.text)
        if _needs_javascript(tree):
            raise Permanent(
                f"{url} is an empty JavaScript shell: its content is rendered by scripts, and this "
                "workload does not run JavaScript. Scrape it with a browser-based tool (e.g. Playwright).",
                status="needs_javascript",
            )
        title = tree.css_first("title")
        payload: dict[str, Any] = {
            "url": url,
            "http_version": response.http_version,
            "title": title.text(strip=True) if title is not None else None,
        }
        for name, selector in self.selectors.items():
            node = tree.css_first(selector)
            payload[name] = node.text(strip=True) if node is not None else None
        return payload


def scrape_work(selectors: Mapping[str, str], **options: Any) -> Callable[[Service], ScrapeWork]:
    """``BackfillSpec.work`` for scraping: items are full URLs, so the service URL is not used.

    The service limit says how many workers may hit one site
    (``max_workers_per_domain``, else ``max_workers``): that is what spaces a
    robots.txt Crawl-delay without the workers talking to each other.
    """

    def build(service: Service) -> ScrapeWork:
        limit = service.limit
        bound = limit.max_workers_per_domain or limit.max_workers
        return ScrapeWork(selectors=selectors, **{"workers_per_domain": bound, **options})

    return build


@dataclass(frozen=True)
class ByDomain:
    """URL items tagged with their domain, so the chunk plan is made domain by domain.

    A chunk then holds one domain's URLs (its one client reuses one connection
    and fetches robots.txt once), and with ``max_workers_per_domain`` in the
    service limit each domain gets at most that many chunks — so at most that
    many workers, each at the per-worker rate, ever hit one domain at once.
    """

    source: ItemSource

    def read(self) -> pa.Table:
        items = self.source.read()
        urls = pc.utf8_trim_whitespace(items["item_id"])  # as normalize will store them
        domains = pc.utf8_lower(pc.struct_field(pc.extract_regex(urls, _DOMAIN), "domain"))
        return items.append_column("group", pc.fill_null(domains, ""))

    def describe(self) -> str:
        return f"{self.source.describe()}, grouped by domain"


@dataclass
class _Site:
    """What one worker knows of one origin: its robots.txt rules, and when it last sent it a request.

    ``spacing_s`` is the gap this worker keeps between its requests to the
    site (k x Crawl-delay; 0 without one); ``None`` when the site asks for a
    Crawl-delay but nothing bounds k, so no page of it may be requested.
    """

    rules: RobotFileParser
    fetched_at: float
    last_request_at: float
    spacing_s: float | None


_sites: dict[int, dict[str, _Site]] = {}
"""Per worker (the thread that runs its chunks, locally or in a Burla process): origin -> ``_Site``.

A plain dict, not a ``threading.local``, so the module still pickles by value for Burla.
"""


def _worker_sites() -> dict[str, _Site]:
    """This worker's sites, kept across its chunks; a new worker first forgets the workers that ended."""
    worker = threading.get_ident()
    if worker not in _sites:
        alive = {thread.ident for thread in threading.enumerate()}
        for ended in [key for key in list(_sites) if key not in alive]:
            _sites.pop(ended, None)
    return _sites.setdefault(worker, {})


class _Session:
    """The chunk's httpx client, and the gate every request to a site passes: robots.txt and Crawl-delay.

    Calls of one chunk may run on several threads, so the worker's sites are
    read and written under one lock. It is held while robots.txt is fetched,
    so a second call to the same new site waits for those rules instead of
    fetching them again.
    """

    def __init__(
        self,
        http: Any,
        user_agent: str,
        workers_per_domain: int | None,
        sites: dict[str, _Site],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.http = http
        self.user_agent = user_agent
        self._workers = workers_per_domain
        self._sites = sites
        self._clock = clock
        self._lock = threading.Lock()

    def admit(self, url: str) -> None:
        """Return when ``url`` may be requested now, and count that request against its site's spacing.

        Raises ``CallAgain`` when this call's slot went to robots.txt or the
        site's Crawl-delay is not over, ``Permanent`` when robots.txt forbids
        the URL (or asks a Crawl-delay nothing lets us honour), and
        ``Retryable`` when robots.txt could not be read.
        """
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            site = self._sites.get(origin)
            now = self._clock()
            if site is None or now - site.fetched_at > ROBOTS_TTL_S:
                self._wait_turn(site, now)
                site = self._sites[origin] = self._fetch_robots(origin, now)
                raise CallAgain(f"robots.txt of {origin} fetched", after_s=site.spacing_s or 0.0)
            if not site.rules.can_fetch(self.user_agent, url):
                raise Permanent(f"robots.txt of {parts.netloc} disallows {url}", status="robots_disallowed")
            if site.spacing_s is None:
                raise Permanent(
                    f"robots.txt of {parts.netloc} asks Crawl-delay: {site.rules.crawl_delay(self.user_agent)} s, "
                    "and nothing bounds how many workers may hit it at once. Declare max_workers_per_domain "
                    "(with ByDomain items) or max_workers on the service limit: each worker then spaces its "
                    "requests to the site by that many times the delay.",
                    status="crawl_delay_unbounded",
                )
            self._wait_turn(site, now)
            site.last_request_at = now

    @staticmethod
    def _wait_turn(site: _Site | None, now: float) -> None:
        """``CallAgain`` until this worker's spacing for the site is over (a robots.txt refetch counts too)."""
        wait = 0.0 if site is None else site.last_request_at + (site.spacing_s or 0.0) - now
        if wait > 0:
            raise CallAgain(f"Crawl-delay: next request in {wait:.2f} s", after_s=wait)

    def _fetch_robots(self, origin: str, now: float) -> _Site:
        """RFC 9309: 4xx means no rules, 401/403 means keep out, 5xx/unreachable means try later."""
        import httpx

        rules = RobotFileParser(f"{origin}/robots.txt")
        try:
            response = self.http.get(f"{origin}/robots.txt")
        except httpx.HTTPError as error:
            raise Retryable(
                f"robots.txt of {origin} could not be fetched: {error}", status="robots_unavailable"
            ) from None
        if response.status_code in (401, 403):
            rules.disallow_all = True
        elif response.status_code == 429 or response.status_code >= 500:
            raise Retryable(f"robots.txt of {origin} answered HTTP {response.status_code}", status="robots_unavailable")
        elif response.is_success:
            rules.parse(response.text.splitlines())
        else:
            rules.allow_all = True
        delay = rules.crawl_delay(self.user_agent) or 0
        spacing = None if delay and self._workers is None else delay * (self._workers or 1)
        return _Site(rules, fetched_at=now, last_request_at=now, spacing_s=spacing)

    @property
    def is_closed(self) -> bool:
        """True once the httpx client is closed: the runner then opens a new session (``pipeline.connection``)."""
        return bool(self.http.is_closed)

    def close(self) -> None:
        self.http.close()


def _compile_selector(name: str, selector: str) -> None:
    """selectolax compiles a selector when it is first used: use it once on an empty document."""
    from selectolax.lexbor import LexborHTMLParser, SelectolaxError

    try:
        LexborHTMLParser("<html></html>").css_first(selector)
    except (SelectolaxError, TypeError) as error:
        raise WorkloadConfigError(
            f"ScrapeWork.selectors[{name!r}]: {selector!r} is not a CSS selector selectolax can parse "
            f"({error}). Fix the selector (for example 'p.price' or 'div#main > h1')."
        ) from None


def _url(item: Item) -> str:
    url = item.id
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Permanent(f"{url!r} is not an absolute http(s) URL", status="bad_url")
    return url


def _needs_javascript(tree: Any) -> bool:
    """No visible text in the body, but a JavaScript mount point or scripts: nothing to read without JS."""
    if tree.body is None or tree.css_first(_JS_MOUNT_POINTS) is None:
        return False
    visible = tree.clone()
    visible.strip_tags(_INVISIBLE_TAGS)
    return not visible.body.text(strip=True)
