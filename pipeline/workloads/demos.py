"""One demo backfill per built-in workload, against the bundled local services: no account anywhere.

    with start_demo_services() as demo:
        for spec in DEMO_SPECS:
            backfill = spec.build(demo.services[spec.service])
            plan_backfill(backfill, store); run_attempt(backfill, store, LocalExecutor())

``DEMO_LIMITS`` is what each demo service declares; ``start_demo_services``
starts local servers that enforce exactly those contracts themselves (a
request rate, batches in flight, a per-role connection limit, a token and
request budget), seeds them with data, and returns the configured
``Service`` of each (URL and secret filled in). The S3 endpoint of the
S3 -> Postgres demo is a second service, so it is passed through the
environment variable ``PACELINE_DEMO_S3_URL`` (with moto's dummy AWS
credentials, set only where none are configured).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.items import JsonlPrompts, KeyRanges, S3Prefix, Values
from pipeline.limits import Estimates, ServiceLimit
from pipeline.localservices import start_http_api, start_llm
from pipeline.localservices.postgres import PostgresHandle, start_postgres
from pipeline.localservices.s3 import S3Handle, start_s3
from pipeline.spec import BackfillSpec, Service
from pipeline.workloads.common import WorkloadConfigError
from pipeline.workloads.http_api import Batches, http_batch_work, http_work
from pipeline.workloads.key_ranges import key_range_work
from pipeline.workloads.llm import llm_work
from pipeline.workloads.s3_postgres import S3ToPostgresWork, gzip_jsonl, s3_postgres_work
from pipeline.workloads.scrape import ByDomain, scrape_work

S3_URL_ENV = "PACELINE_DEMO_S3_URL"
DEMO_BUCKET = "paceline-demo"
DEMO_PREFIX = "events/"
DEMO_FILES = 20
DEMO_ROWS_PER_FILE = 250
DEMO_ACCOUNTS = 10_000
DEMO_PROMPTS = 30
DEMO_IDS = 200
DEMO_API_TOKEN = "paceline-demo-token"
DEMO_LLM_KEY = "paceline-demo-key"
DEMO_ROLE = "paceline_demo"
EVENT_COLUMNS = ("id", "user_id", "kind", "attributes")

DEMO_LIMITS: dict[str, ServiceLimit] = {
    "local_api": ServiceLimit(name="local_api", requests_per_second=100),
    "local_batches": ServiceLimit(name="local_batches", concurrent_batches=4),
    "local_site": ServiceLimit(
        name="local_site", requests_per_second=20, per_worker_requests_per_second=5, max_workers=2
    ),
    "local_postgres": ServiceLimit(name="local_postgres", safe_connections=8),
    "local_llm": ServiceLimit(name="local_llm", tokens_per_minute=60_000, requests_per_minute=1_200),
}


def _site_urls(service: Service) -> ByDomain:
    pages = [f"{service.url}/site/{n}" for n in range(1, 41)]
    return ByDomain(Values.of([*pages, f"{service.url}/private/1", f"{service.url}/js-shell"]))


def _demo_s3_url() -> str:
    url = os.environ.get(S3_URL_ENV, "")
    if not url:
        raise WorkloadConfigError(
            f"{S3_URL_ENV} is not set, so the S3 -> Postgres demo does not know where its files are. "
            "Start the demo services with pipeline.workloads.demos.start_demo_services()."
        )
    return url


def _demo_events(service: Service) -> S3Prefix:
    return S3Prefix(bucket=DEMO_BUCKET, prefix=DEMO_PREFIX, endpoint_url=_demo_s3_url())


def _demo_load(service: Service) -> S3ToPostgresWork:
    return s3_postgres_work(DEMO_BUCKET, "demo_events", EVENT_COLUMNS, endpoint_url=_demo_s3_url())(service)


def _demo_prompts(service: Service) -> JsonlPrompts:
    """Write the (deterministic) demo prompts next to the other temporary files, and read them."""
    path = Path(tempfile.gettempdir(), "paceline-demo", "prompts.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    topics = ("rate limits", "retries", "Parquet", "DuckDB", "backfills", "Burla", "Dagster", "tokens")
    lines = (
        json.dumps({"id": f"p{n:03d}", "prompt": f"In one sentence, why do {topics[n % len(topics)]} matter? ({n})"})
        for n in range(DEMO_PROMPTS)
    )
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(path)  # whole or not at all, even with two demos starting at once
    return JsonlPrompts(str(path))


DEMO_SPECS: tuple[BackfillSpec, ...] = (
    BackfillSpec(
        name="demo_http_api",
        service="local_api",
        items=Values.of(f"user-{n}" for n in range(DEMO_IDS)),
        work=http_work("{base}/items/{id}"),
        description=f"GET /items/{{id}} for {DEMO_IDS} ids at half of 100 req/s, with a bearer token; "
        "a few ids fail once and heal in a retry round, a few are missing for good.",
    ),
    BackfillSpec(
        name="demo_http_batches",
        service="local_batches",
        items=Batches(Values.of(f"vec-{n}" for n in range(2_000)), batch_size=50),
        work=http_batch_work("/batch"),
        estimates=Estimates(seconds_per_call=0.05),
        description="2,000 records upserted in batches of 50, at most 4 x 0.5 batches in flight.",
    ),
    BackfillSpec(
        name="demo_scrape",
        service="local_site",
        items=_site_urls,
        work=scrape_work({"heading": "h1", "price": "p.price"}),
        description="40 product pages, a page robots.txt forbids and a JavaScript shell, 2 workers at 5 pages/s.",
    ),
    BackfillSpec(
        name="demo_s3_to_postgres",
        service="local_postgres",
        items=_demo_events,
        work=_demo_load,
        description=f"{DEMO_FILES} gzipped JSON-lines files from S3 into Postgres, each row exactly once.",
    ),
    BackfillSpec(
        name="demo_key_ranges",
        service="local_postgres",
        items=KeyRanges(0, DEMO_ACCOUNTS, 500),
        work=key_range_work(
            "SELECT count(*) AS accounts, sum(balance) AS balance FROM demo_accounts WHERE id >= %(lo)s AND id < %(hi)s"
        ),
        description="Sum balances over 20 key ranges, one bounded query per range.",
    ),
    BackfillSpec(
        name="demo_llm",
        service="local_llm",
        items=_demo_prompts,
        work=llm_work("local-llm", max_tokens=32),
        estimates=Estimates(seconds_per_call=0.2, tokens_per_item=40),
        description=f"{DEMO_PROMPTS} prompts under a tokens/min and requests/min budget.",
    ),
)


@dataclass
class DemoServices:
    """The running local services.

    ``services`` maps each demo service name to its configured ``Service``
    (what ``BackfillSpec.build`` takes); ``handles`` maps the same names, plus
    ``local_s3``, to the running servers (the HTTP and LLM ones report what
    they saw with ``.stats()``).
    """

    services: dict[str, Service] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> DemoServices:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start(self, name: str, handle: Any) -> Any:
        """Keep a started server, so ``stop`` stops it whatever happens next."""
        self.handles[name] = self._stack.enter_context(handle)
        return handle

    def _declare(self, name: str, url: str, secret: str = "") -> None:
        self.services[name] = Service(DEMO_LIMITS[name], url, secret)


def start_demo_services() -> DemoServices:
    """Start and seed every local service the demo backfills use (a few seconds).

    Each server enforces the contract its ``DEMO_LIMITS`` entry declares.
    """
    demo = DemoServices()
    api, batches, site, llm = (DEMO_LIMITS[n] for n in ("local_api", "local_batches", "local_site", "local_llm"))
    try:
        server = demo._start(
            "local_api", start_http_api(rps=api.requests_per_second, token=DEMO_API_TOKEN, demo_faults=0.03)
        )
        demo._declare("local_api", server.url, DEMO_API_TOKEN)
        server = demo._start("local_batches", start_http_api(max_concurrent_batches=batches.concurrent_batches))
        demo._declare("local_batches", server.url)
        server = demo._start("local_site", start_http_api(rps=site.requests_per_second))
        demo._declare("local_site", server.url)
        server = demo._start(
            "local_llm",
            start_llm(tpm=llm.tokens_per_minute, rpm=llm.requests_per_minute, key=DEMO_LLM_KEY, completion_tokens=24),
        )
        demo._declare("local_llm", f"{server.url}/v1", DEMO_LLM_KEY)
        demo._declare("local_postgres", _seed_postgres(demo._start("local_postgres", start_postgres())))
        _seed_s3(demo._start("local_s3", start_s3()))
    except BaseException:
        demo.stop()
        raise
    return demo


def _seed_postgres(postgres: PostgresHandle) -> str:
    """A role capped at the declared safe connections (the server refuses one more), and its tables."""
    import psycopg

    dsn = postgres.create_role(DEMO_ROLE, connection_limit=DEMO_LIMITS["local_postgres"].safe_connections or -1)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE demo_events (id bigint PRIMARY KEY, user_id int NOT NULL, kind text, attributes jsonb)"
        )
        connection.execute("CREATE TABLE demo_accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
        connection.execute(
            "INSERT INTO demo_accounts SELECT n, (n * 37) %% 1000 FROM generate_series(0, %s) AS n",
            [DEMO_ACCOUNTS - 1],
        )
    return dsn


def _seed_s3(s3: S3Handle) -> None:
    """The demo bucket with its files; its URL and dummy credentials go to the environment."""
    os.environ[S3_URL_ENV] = s3.url
    for name, value in s3.env.items():
        os.environ.setdefault(name, value)
    client = s3.client()
    client.create_bucket(Bucket=DEMO_BUCKET)
    for part in range(DEMO_FILES):
        first = part * DEMO_ROWS_PER_FILE
        records = [_event(n) for n in range(first, first + DEMO_ROWS_PER_FILE)]
        client.put_object(Bucket=DEMO_BUCKET, Key=f"{DEMO_PREFIX}part-{part:03d}.jsonl.gz", Body=gzip_jsonl(records))


def _event(n: int) -> dict[str, Any]:
    return {"id": n, "user_id": n % 97, "kind": ("view", "click", "buy")[n % 3], "attributes": {"n": n}}
