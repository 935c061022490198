"""Polite scraping of static pages: httpx (HTTP/2 where offered) and selectolax.

``ScrapeWork`` fetches each URL item with one httpx client per chunk and
stores the page title plus the text of each configured CSS selector. It is
polite by construction:

* **robots.txt** is fetched once per domain per chunk, with the same client
  and User-Agent, and a disallowed URL is never requested: its row is a
  permanent ``robots_disallowed``. An unreachable robots.txt (5xx, timeout)
  makes the item retryable rather than guessing; a missing one (404) allows all.
* **Rate**: the engine paces each worker; 429 and 503 are retryable and
  Retry-After is honoured. Declare the per-domain contract as the service
  limit (``per_worker_requests_per_second`` for one worker's politeness,
  ``max_workers`` for how many may hit a domain at once, ``requests_per_second``
  for the domain's total). Today that limit applies to the whole backfill, so it
  holds for every domain at once: see ``ByDomain`` for what grouping adds and
  what it does not.
* The robots.txt request is not paced by the engine: each chunk makes one
  such extra request per domain it visits, inside the call for its first URL.
  A global rate has room for it under ``safety`` below 1; a per-worker ceiling
  P does not (no safety applies to it), so the first second of a chunk may
  see P + 1 requests from that worker: declare P - 1 if the site counts strictly.

What it does **not** do: run JavaScript. A page that is an empty JavaScript
shell (no visible text, only a mount point such as ``#root`` or scripts) is
recorded as the permanent failure ``needs_javascript``, not as an empty
success; such sites need a browser-based tool (e.g. Playwright).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.items import ItemSource
from pipeline.outcomes import Permanent, Retryable
from pipeline.spec import Service
from pipeline.work import Item
from pipeline.workloads.common import WorkloadConfigError, check, check_header_values
from pipeline.workloads.http_api import HttpClientConfig

DEFAULT_USER_AGENT = "PacelineBot/0.1 (+https://github.com/paceline)"
RESERVED_FIELDS = ("url", "title", "http_version")
_JS_MOUNT_POINTS = "#root, #app, #__next, #__nuxt, [data-reactroot], [ng-app], script"
_INVISIBLE_TAGS = ["script", "style", "noscript", "template"]
_DOMAIN = r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<domain>[^/?#]*)"


@dataclass(frozen=True, kw_only=True)
class ScrapeWork(HttpClientConfig):
    """Fetch a URL item, honour robots.txt, and store ``title`` plus each selector's text.

    ``selectors`` maps a payload field to a CSS selector; the first matching
    element's text (stripped) is stored, or ``None`` when nothing matches.
    Every selector is compiled at construction, so a typo fails before any
    request. Redirects are followed; robots.txt is checked for the URL as given.
    ``headers``, ``token`` (bearer) and ``timeout_s`` are as for ``HttpWork``.
    """

    selectors: Mapping[str, str] = field(default_factory=dict)
    user_agent: str = DEFAULT_USER_AGENT
    http2: bool = True

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
        return _Session(client, self.user_agent)

    def call(self, client: Any, item: Item) -> Any:
        from selectolax.lexbor import LexborHTMLParser

        url = _url(item)
        if not client.allowed(url):
            raise Permanent(f"robots.txt of {urlsplit(url).netloc} disallows {url}", status="robots_disallowed")
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
    """``BackfillSpec.work`` for scraping: items are full URLs, so the service URL is not used."""

    def build(service: Service) -> ScrapeWork:
        return ScrapeWork(selectors=selectors, **options)

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


class _Session:
    """The chunk's httpx client and the robots.txt rules of each domain it has seen."""

    def __init__(self, http: Any, user_agent: str):
        self.http = http
        self.user_agent = user_agent
        self._robots: dict[str, RobotFileParser] = {}

    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self._robots:
            self._robots[origin] = self._fetch_robots(origin)
        return self._robots[origin].can_fetch(self.user_agent, url)

    def _fetch_robots(self, origin: str) -> RobotFileParser:
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
        return rules

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
