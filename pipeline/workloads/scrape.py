"""Polite scraping of static pages: httpx (HTTP/2 where offered) and selectolax.

``ScrapeWork`` fetches each URL item with one httpx client per chunk and
stores the page title plus the text of each configured CSS selector. It is
polite by construction:

* **robots.txt** is read by RFC 9309 (``pipeline.workloads.robots``: Protego's
  matching, and the RFC's reading of each fetch outcome: 4xx allows all, 5xx
  or unreachable disallows all for now). It is fetched with the same client
  and User-Agent, in a call of its own: the call that first needs a site's
  rules fetches only robots.txt and raises ``CallAgain``, so the runner gives
  the URL the next paced slot and every request a site receives (robots.txt
  included) went through the pacer. A worker keeps the rules it fetched
  across its chunks, per origin, for 24 h: a site sees robots.txt once per
  worker, not once per chunk. A disallowed URL is never requested: its row is
  a permanent ``robots_disallowed``. While robots.txt is unreachable the site's
  URLs are retryable ``robots_unavailable`` rows, and robots.txt is fetched
  again after a short wait, not a day.
* **Rate**: the engine paces each worker; 429 and 503 are retryable and
  Retry-After is honoured. Declare the per-domain contract as the service
  limit (``per_worker_requests_per_second`` for one worker's politeness,
  ``max_workers_per_domain`` with ``ByDomain`` items for how many workers may hit
  a domain at once, ``requests_per_second`` for the domain's total).
* **Crawl-delay: d** or **Request-rate: n/m** (fractions allowed) ask for at
  most one request every s = max(d, m/n) seconds to that site from all its
  workers. With no coordination between workers, each worker spaces its own
  requests to the site by k x s, where k is ``workers_per_domain``: the
  service's ``max_workers_per_domain``, else its ``max_workers``
  (``scrape_work`` reads them). So the site sees at most k requests in any
  k x s seconds, the rate it asked for; two workers' requests may still land
  closer than s apart. The wait goes through the pacer
  (``CallAgain(after_s=...)``), not a sleep in the call. With neither bound
  declared, a site that asks for spacing gets no request beyond its
  robots.txt: its URLs fail permanently with ``crawl_delay_unbounded``, naming
  the fields to declare.

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

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.items import ItemSource
from pipeline.outcomes import CallAgain, Permanent, Retryable
from pipeline.spec import Service
from pipeline.work import Item
from pipeline.workloads.common import WorkloadConfigError, check, check_header_values
from pipeline.workloads.http_api import HttpClientConfig
from pipeline.workloads.robots import UNREACHABLE_RETRY_S, Robots, fetch_robots, product_token

DEFAULT_USER_AGENT = "PacelineBot/0.1 (+https://github.com/paceline)"
RESERVED_FIELDS = ("url", "title", "http_version")
_JS_MOUNT_POINTS = "#root, #app, #__next, #__nuxt, [data-reactroot], [ng-app], script"
_INVISIBLE_TAGS = ["script", "style", "noscript", "template"]
_DOMAIN = r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<domain>[^/?#]*)"
_WORKER_SITES = "paceline_robots_sites"


@dataclass(frozen=True, kw_only=True)
class ScrapeWork(HttpClientConfig):
    """Fetch a URL item, honour robots.txt, and store ``title`` plus each selector's text.

    ``selectors`` maps a payload field to a CSS selector; the first matching
    element's text (stripped) is stored, or ``None`` when nothing matches.
    Every selector is compiled at construction, so a typo fails before any
    request. Redirects are followed; robots.txt is checked for the URL as given.
    ``headers``, ``token`` (bearer) and ``timeout_s`` are as for ``HttpWork``.
    ``workers_per_domain`` bounds how many workers may hit one site at once;
    a robots.txt ``Crawl-delay: d`` (or ``Request-rate``) spaces each worker's
    requests to that site by ``workers_per_domain`` x d (``None``: no bound, so
    such a site is refused). robots.txt groups are matched by the product token
    that starts ``user_agent`` (``PacelineBot`` in ``PacelineBot/0.1 (+...)``).
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
        try:
            product_token(self.user_agent)
        except ValueError as error:
            raise WorkloadConfigError(f"{owner}.user_agent: {error}") from None
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
        return _Session(client, product_token(self.user_agent), self.workers_per_domain, _worker_sites())

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
    """What one worker knows of one origin: its robots.txt, and when it last sent the site a request.

    ``spacing_s`` is the gap this worker keeps between its requests to the
    site (k x the site's asked spacing; 0 when it asks none); ``None`` when
    the site asks for spacing but nothing bounds k, so no page of it may be
    requested.
    """

    robots: Robots
    last_request_at: float
    spacing_s: float | None


def _worker_sites() -> dict[str, _Site]:
    """This worker's sites (origin -> ``_Site``), kept across its chunks and gone with its thread.

    They hang on the thread object that runs the worker's chunks (locally or in
    a Burla process), not in a ``threading.local`` (which would not pickle by
    value for Burla) nor in a dict keyed by thread id (a new thread may reuse
    an ended one's id, and would inherit another run's rules).
    """
    return threading.current_thread().__dict__.setdefault(_WORKER_SITES, {})


class _Session:
    """The chunk's httpx client, and the gate every request to a site passes: robots.txt and its spacing.

    Calls of one chunk may run on several threads, so the worker's sites are
    read and written under one lock. It is held while robots.txt is fetched,
    so a second call to the same new site waits for those rules instead of
    fetching them again.
    """

    def __init__(
        self,
        http: Any,
        token: str,
        workers_per_domain: int | None,
        sites: dict[str, _Site],
        clock: Callable[[], float] = time.monotonic,
        unreachable_retry_s: float = UNREACHABLE_RETRY_S,
    ):
        self.http = http
        self.token = token
        self._workers = workers_per_domain
        self._sites = sites
        self._clock = clock
        self._retry_s = unreachable_retry_s
        self._lock = threading.Lock()

    def admit(self, url: str) -> None:
        """Return when ``url`` may be requested now, and count that request against its site's spacing.

        Raises ``CallAgain`` when this call's slot went to robots.txt or the
        site's spacing is not over, ``Permanent`` when robots.txt forbids the
        URL (or asks for spacing nothing lets us honour), and ``Retryable``
        while robots.txt is unreachable.
        """
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            site = self._sites.get(origin)
            now = self._clock()
            if site is None or site.robots.expired(now):
                self._wait_turn(site, now)
                site = self._sites[origin] = self._fetch(origin, now)
                raise CallAgain(f"robots.txt of {origin} fetched", after_s=site.spacing_s or 0.0)
            self._check(site, parts.netloc, url)
            self._wait_turn(site, now)
            site.last_request_at = now

    def _check(self, site: _Site, host: str, url: str) -> None:
        """Refuse ``url`` when robots.txt is unreachable or forbids it, or asks for spacing we cannot keep."""
        robots = site.robots
        if robots.unreachable:
            raise Retryable(
                f"robots.txt of {host} is unreachable ({robots.why}): nothing of the site is fetched until it "
                f"can be read; it is asked again after {self._retry_s:g} s",
                status="robots_unavailable",
            )
        if not robots.allows(url, self.token):
            raise Permanent(f"robots.txt of {host} disallows {url} for {self.token}", status="robots_disallowed")
        if site.spacing_s is None:
            raise Permanent(
                f"robots.txt of {host} asks {robots.asked(self.token)} (one request every "
                f"{robots.spacing_s(self.token):g} s), and nothing bounds how many workers may hit it at once. "
                "Declare max_workers_per_domain (with ByDomain items) or max_workers on the service limit: each "
                "worker then spaces its requests to the site by that many times the delay.",
                status="crawl_delay_unbounded",
            )

    @staticmethod
    def _wait_turn(site: _Site | None, now: float) -> None:
        """``CallAgain`` until this worker's spacing for the site is over (a robots.txt refetch counts too)."""
        wait = 0.0 if site is None else site.last_request_at + (site.spacing_s or 0.0) - now
        if wait > 0:
            raise CallAgain(f"Crawl-delay: next request in {wait:.2f} s", after_s=wait)

    def _fetch(self, origin: str, now: float) -> _Site:
        """Fetch robots.txt (one paced request, its redirects included) and derive this worker's spacing."""
        robots = fetch_robots(self.http, origin, now, self._retry_s)
        asked = robots.spacing_s(self.token)
        spacing = None if asked and self._workers is None else asked * (self._workers or 1)
        return _Site(robots, last_request_at=now, spacing_s=spacing)

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
