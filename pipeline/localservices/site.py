"""Many small websites in one process, each with the robots.txt a test gives it, for judging crawlers.

    python -m pipeline.localservices.site --port 0

It prints ``READY http://127.0.0.1:<port>``. A crawler's robots.txt handling
is judged here, by the sites: each site is an origin of its own (its own
port, so its own robots.txt, as RFC 9309 ties the file to the origin), and
every request any of them receives is in the arrival log, with ``item`` set
to the URL the site served (``http://127.0.0.1:<port>/path``; the server sees
the path percent-decoded and without its query).

Admin (on every port; never logged)
    ``POST /_sites``  JSON ``{"robots_txt": "...", "status": 200, "redirects": 0, "failures": 0}``
                      opens a new site and answers ``{"url": "http://127.0.0.1:<port>"}``.
                      Its ``/robots.txt`` first redirects ``redirects`` times (301, through
                      ``/robots-hop-1.txt`` ...), then answers 503 to the first ``failures``
                      requests, then ``status`` with ``robots_txt`` as ``text/plain``.
    ``GET /_stats``, ``GET /_arrivals``, ``POST /_reset``  as every local service

Every other ``GET`` is a small HTML page whose title is its path.
"""

from __future__ import annotations

import html
import json
import threading
import urllib.request
from dataclasses import dataclass
from typing import Any

from pipeline.localservices._common import (
    Reply,
    Request,
    Service,
    ServiceHandle,
    _Server,
    count_by_status,
    json_reply,
    launch_service,
    serve,
    service_parser,
)

_HOP = "/robots-hop-{}.txt"


@dataclass
class SiteRobots:
    """How one site answers for its robots.txt (see the module docstring); ``failures`` counts down."""

    robots_txt: str = ""
    status: int = 200
    redirects: int = 0
    failures: int = 0


class Sites(Service):
    """The sites of this process, by ``host:port``; every site's requests go to the one arrival log."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._sites: dict[str, SiteRobots] = {}

    def admin(self, request: Request) -> Reply:
        if (request.method, request.path) == ("POST", "/_sites"):
            return self._open(request)
        return super().admin(request)

    def _open(self, request: Request) -> Reply:
        """Serve a new site on a port of its own, in a thread of this process."""
        try:
            robots = SiteRobots(**request.json())
        except (ValueError, TypeError) as error:
            return json_reply(400, {"error": f"POST /_sites takes {list(SiteRobots.__annotations__)}: {error}"})
        server = _Server(0, self)
        host = f"127.0.0.1:{server.server_address[1]}"
        with self._lock:
            self._sites[host] = robots
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return json_reply(200, {"url": f"http://{host}"})

    def handle(self, request: Request) -> Reply:
        host = request.headers.get("Host", "")
        reply = self._robots(host, request.path) if request.path.startswith("/robots") else None
        if reply is None:
            title = html.escape(request.path)
            body = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
            reply = Reply(200, body.encode(), "text/html; charset=utf-8")
        reply.item = f"http://{host}{request.path}"
        return reply

    def _robots(self, host: str, path: str) -> Reply | None:
        """The robots.txt chain of the site at ``host``; ``None`` for a path that is not part of it."""
        with self._lock:
            robots = self._sites.get(host)
            if robots is None:
                return None
            hops = ["/robots.txt", *(_HOP.format(n) for n in range(1, robots.redirects + 1))]
            if path not in hops:
                return None
            if path != hops[-1]:
                return Reply(301, b"", "text/plain", {"Location": hops[hops.index(path) + 1]})
            if robots.failures > 0:
                robots.failures -= 1
                return Reply(503, b"unavailable", "text/plain")
            return Reply(robots.status, robots.robots_txt.encode(), "text/plain; charset=utf-8")

    def stats(self) -> dict[str, Any]:
        arrivals = self.log.snapshot()
        return {"count": len(arrivals), "by_status": count_by_status(arrivals), "sites": len(self._sites)}


def add_site(service: ServiceHandle, robots_txt: str = "", **robots: int) -> str:
    """``POST /_sites`` on a running site service: a new origin with this robots.txt; returns its URL.

    ``robots`` are the other fields of ``SiteRobots``: ``status``, ``redirects``, ``failures``.
    """
    body = json.dumps({"robots_txt": robots_txt, **robots}).encode()
    request = urllib.request.Request(f"{service.url}/_sites", data=body, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return json.load(response)["url"]


def start_site() -> ServiceHandle:
    """Start the site service; open sites on it with ``add_site``."""
    return launch_service(f"{__package__}.site", {})


def main(argv: list[str] | None = None) -> None:
    """Parse flags and serve forever."""
    args = service_parser("Many small websites, each with its own robots.txt, for judging crawlers.").parse_args(argv)
    serve(Sites(), args.port, args.watch_stdin)


if __name__ == "__main__":
    main()
