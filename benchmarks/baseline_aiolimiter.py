"""The baseline Paceline is compared with: what a typical user writes with asyncio, httpx and aiolimiter.

    python -m benchmarks.baseline_aiolimiter [--quick] [--declared-rps 100] [--real-rps 60] \\
        [--concurrency 32] [--latency-ms 20]

The script under test is deliberately ordinary, the code a careful user
writes from the aiolimiter README: one ``AsyncLimiter`` at the *declared*
rate, every item gathered at once behind a semaphore, and on a 429 one retry
after the ``Retry-After`` it was given (then the item counts as failed). It
reads no rate-limit header and never slows down. When the declared rate is
right it holds the limit; the interesting case, and the ``__main__`` one, is a
service whose real limit is below the declared one (DESIGN.md, "Closed-loop
pacing": a limit shared with other clients, or simply mis-declared).

``run_baseline`` reports goodput (items answered 200 per second of wall
time), the share of requests the service refused with 429, and the busiest
second as the *server* saw it (``/_stats`` of the bundled API), so the
numbers are comparable with the ones Paceline's own runs are judged by.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx
from aiolimiter import AsyncLimiter

from benchmarks.common import machine_line
from pipeline.localservices import start_http_api

DEFAULT_DECLARED_RPS = 100.0
DEFAULT_REAL_RPS = 60.0  # the real limit is 60% of the declared one, as measured in DESIGN.md
DEFAULT_CONCURRENCY = 32
DEFAULT_LATENCY_MS = 20.0
ITEMS = {False: 1000, True: 200}


def run_baseline(url: str, items: list[str], declared_rps: float, concurrency: int) -> dict[str, Any]:
    """Fetch ``GET {url}/items/{id}`` for every item the aiolimiter way; return the run's numbers.

    ``url`` must be the bundled HTTP API (``pipeline.localservices``): its
    statistics are reset first, so the server-side numbers are this run's.
    """
    admin = httpx.Client(base_url=url, trust_env=False, timeout=10)
    with admin:
        admin.post("/_reset").raise_for_status()
        client_side = asyncio.run(_gather(url, items, declared_rps, concurrency))
        stats = admin.get("/_stats").json()
    requests = client_side["requests"]
    return {
        "items": len(items),
        "ok": client_side["ok"],
        "failed": len(items) - client_side["ok"],
        "seconds": client_side["seconds"],
        "goodput_ok_per_s": client_side["ok"] / client_side["seconds"],
        "requests": requests,
        "throttled": client_side["throttled"],
        "throttled_share": client_side["throttled"] / requests if requests else 0.0,
        "declared_rps": declared_rps,
        "concurrency": concurrency,
        "server_requests": stats["count"],
        "server_limit_per_s": _limit_per_s(stats),
        "server_busiest_1s": stats["busiest_1s"],
        "server_busiest_1s_all": stats["busiest_1s_all"],
    }


def _limit_per_s(stats: dict[str, Any]) -> float | None:
    limit = stats.get("limit_per_window")
    return limit / stats["window_s"] if limit is not None else None


async def _gather(url: str, items: list[str], declared_rps: float, concurrency: int) -> dict[str, Any]:
    """The typical script itself: limiter at the declared rate, semaphore, gather, one retry on 429."""
    limiter = AsyncLimiter(declared_rps, time_period=1.0)
    semaphore = asyncio.Semaphore(concurrency)
    counts = {"requests": 0, "throttled": 0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30, limits=limits) as client:

        async def fetch(item: str) -> bool:
            async with semaphore:
                for attempt in range(2):
                    async with limiter:
                        response = await client.get(f"/items/{item}")
                    counts["requests"] += 1
                    if response.status_code != 429:
                        return response.status_code == 200
                    counts["throttled"] += 1
                    if attempt == 0:
                        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                return False

        start = time.perf_counter()
        answered = await asyncio.gather(*(fetch(item) for item in items))
        seconds = time.perf_counter() - start
    return {**counts, "ok": sum(answered), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Start the bundled API with a real limit below the declared one, run the baseline, print its numbers."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_aiolimiter", description=main.__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{ITEMS[True]} items instead of {ITEMS[False]}")
    parser.add_argument("--declared-rps", type=float, default=DEFAULT_DECLARED_RPS)
    parser.add_argument("--real-rps", type=float, default=DEFAULT_REAL_RPS, help="the limit the server enforces")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_MS)
    args = parser.parse_args(argv)
    items = [f"item-{n}" for n in range(ITEMS[args.quick])]
    print(machine_line(), flush=True)
    with start_http_api(rps=args.real_rps, latency_ms=args.latency_ms) as api:
        result = run_baseline(api.url, items, args.declared_rps, args.concurrency)
    result["goodput_over_real_limit"] = result["goodput_ok_per_s"] / args.real_rps
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
