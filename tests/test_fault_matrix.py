"""The fault matrix: every built-in workload against real servers that misbehave on purpose.

Each workload has one table below that says what each item must end as: the
status of its row after the first attempt, its class (retryable: a retry
round tries it again; permanent: dead at once) and, for a fault the server
repairs, the attempt from which the item is ok. One parametrized test drives
every table through the first pass and two retry rounds (``max_attempts=3``)
and checks, in the ledger, after each attempt:

* every item has exactly one latest row, with the status and class
  (``ok`` / ``failed`` = retryable with attempts left / ``dead``) the table
  gives for that attempt — so a retryable fault that never heals ends dead;
* the attempt tried exactly the items the previous one left failed, once each;
* a throttled call (429/503) was retried once inside its chunk before its
  row was written (``max_throttle_retries=1``).

The faults are real: ``http_api`` item ids, site pages and LLM prompts with a fault
prefix (``e500-``, ``throttle-``, ``heal2-`` ...), ports where nothing
listens until the server is started before the first retry round, PostgreSQL
backends terminated by another connection, statement timeouts, a rotated
password, corrupt files in S3. Only the two faults that come from the worker
itself are injected in-process, by ``Sabotaged``: ``call`` raising for a
``raise-`` item, and ``connect`` raising until it is repaired.

Items are planned in chunks of two, so each fault shares a client (or a
database connection) with a neighbour, and the neighbour's row shows whether
that client survived it.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pipeline.backfill import Backfill
from pipeline.items import ItemSource, JsonlPrompts, KeyRanges, Values
from pipeline.ledger import Ledger
from pipeline.limits import Overrides, ServiceLimit
from pipeline.localservices import start_http_api, start_llm
from pipeline.work import Item, Work, WorkHooks
from pipeline.workloads import HttpWork, KeyRangeWork, LlmWork, S3ToPostgresWork, ScrapeWork, gzip_jsonl

MAX_ATTEMPTS = 3
TIMEOUT_S = 1.0  # the slow- fault answers after 5 s
PACING = Overrides(max_throttle_retries=1, max_retry_after_s=0.2, chunk_size=2)
STATEMENT_TIMEOUT_S = 1.0
ROWS_PER_FILE = 100


class Fault(NamedTuple):
    """What one item must end as."""

    status: str  # its row's status after the first attempt, and after every attempt it still fails
    retryable: bool  # its class: True means a retry round tries it again
    heals: int | None = None  # the attempt from which it is ok; None: never

    def after(self, attempt: int) -> tuple[str, str]:
        """(status, class) of the item's latest row once ``attempt`` has run."""
        if self.heals is not None and attempt >= self.heals:
            return "ok", "ok"
        if self.retryable and attempt + 1 < MAX_ATTEMPTS:
            return self.status, "failed"
        return self.status, "dead"


OK = Fault("ok", False, heals=0)


def retryable(status: str, heals: int | None = None) -> Fault:
    return Fault(status, True, heals)


def permanent(status: str) -> Fault:
    return Fault(status, False)


def all_items(keys: list[str], fault: Fault) -> dict[str, Fault]:
    return dict.fromkeys(keys, fault)


# --------------------------------------------------------------------------
# The tables. Keys are item ids; {api} is the local API's URL and {down} a
# port where nothing listens until the server is started before the first retry round.
# --------------------------------------------------------------------------

HTTP = {
    "plain-1": OK,
    "e500-a": retryable("http_500"),
    "e503-a": retryable("http_503"),  # Retry-After waited out once in the chunk, then recorded
    "throttle-a": retryable("http_429"),  # a 429 that never clears
    "throttlenoretry-a": retryable("http_429"),  # no Retry-After: the engine picks the wait
    "slow-a": retryable("timeout"),  # 5 s against timeout_s=1
    "reset-a": retryable("connection"),  # connection reset mid-body
    "badjson-a": permanent("bad_payload"),  # 200 with a body that is not JSON
    "e404-a": permanent("http_404"),
    "e400-a": permanent("http_400"),
    "raise-a": permanent("exception"),  # a bug in call
    "heal1-a": retryable("http_500", heals=1),
    "heal2-a": retryable("http_500", heals=2),
    "plain-2": OK,
}

SCRAPE = {  # the local site serves page n behind a fault prefix at /site/{fault}-{n}
    "{api}/site/1": OK,
    "{api}/site/e500-1": retryable("http_500"),
    "{api}/site/e503-1": retryable("http_503"),
    "{api}/site/throttle-1": retryable("http_429"),
    "{api}/site/throttlenoretry-1": retryable("http_429"),
    "{api}/site/slow-1": retryable("timeout"),
    "{api}/site/reset-1": retryable("connection"),
    "{api}/site/badjson-1": permanent("not_html"),  # served as JSON (broken or not): not a page to scrape
    "{api}/site/e404-1": permanent("http_404"),
    "{api}/site/e400-1": permanent("http_400"),
    "{api}/private/1": permanent("robots_disallowed"),  # never requested
    "{api}/js-shell": permanent("needs_javascript"),
    "{api}/site/raise-1": permanent("exception"),
    "{api}/site/heal1-1": retryable("http_500", heals=1),
    "{api}/site/heal2-1": retryable("http_500", heals=2),
    "{down}/site/2": retryable("robots_unavailable", heals=1),  # connection refused on robots.txt
}

LLM = {  # the key is the prompt's id and its text: the server picks the fault from the text
    "hello": OK,
    "e500-a": retryable("http_500"),
    "e503-a": retryable("http_503"),  # LlmWork raises Throttled itself (it reads retry-after-ms)
    "throttle-a": retryable("http_429"),
    "throttlenoretry-a": retryable("http_429"),
    "slow-a": retryable("timeout"),
    "reset-a": retryable("connection"),
    "badjson-a": permanent("bad_payload"),
    "e404-a": permanent("http_404"),
    "e400-a": permanent("http_400"),
    "noprompt-a": permanent("bad_item"),  # a record without its prompt field
    "raise-a": permanent("exception"),
    "heal1-a": retryable("http_500", heals=1),
    "heal2-a": retryable("http_500", heals=2),
}

KEY_RANGES = {  # KeyRanges(0, 800, 100); the faults live in the database, per range start
    "0-100": OK,
    "100-200": OK,
    "200-300": retryable("db_unavailable", heals=1),  # its backend is terminated mid-query
    "300-400": OK,  # same chunk: the runner replaced the terminated connection and went on
    "400-500": OK,
    "500-600": retryable("statement_timeout"),  # always slower than statement_timeout_s
    "600-700": permanent("exception"),  # division by zero in the query
    "700-800": OK,  # same chunk: the connection survived the error
}

S3_TO_POSTGRES = {
    "in/good.jsonl.gz": OK,
    "in/not-gzip.jsonl.gz": permanent("bad_payload"),
    "in/terminated.jsonl.gz": retryable("db_unavailable", heals=1),  # backend terminated mid-file
    "in/after-terminated.jsonl.gz": OK,  # same chunk: loaded on the connection that replaced it
    "in/truncated.jsonl.gz": permanent("bad_payload"),  # gzip stream cut in half
    "in/bad-line.jsonl.gz": permanent("bad_payload"),  # second line is not JSON
    "in/not-object.jsonl.gz": permanent("bad_payload"),  # a line that is a JSON list
    "in/null-user.jsonl.gz": permanent("exception"),  # a row the table refuses (NOT NULL)
    "in/missing.jsonl.gz": permanent("s3_missing"),  # no such key
    "in/raise-a.jsonl.gz": permanent("exception"),
}

# Faults of the whole service, for every item of a scenario (see SCENARIOS)
REFUSED_UNTIL_STARTED = retryable("connection", heals=1)  # nothing listens until the server starts
CONNECT_RAISES_UNTIL_FIXED = retryable("connect_failed", heals=1)
WRONG_DATABASE_PORT = retryable("connect_failed")  # never heals: dead after the last round
PASSWORD_ROTATED = retryable("connect_failed", heals=1)  # the server learns the new password before the retry


# --------------------------------------------------------------------------
# Faults from the worker itself
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sabotaged:
    """A built-in work plus the two faults that come from the worker, not from the service.

    ``call`` raises a plain bug (``KeyError``) for items whose id contains
    ``raise-``; ``connect`` raises while the file ``connect_broken`` exists
    (the test deletes it to repair it). One call at a time, cost, usage and secrets are the work's.
    """

    work: Work
    connect_broken: str = ""

    def connect(self) -> Any:
        if self.connect_broken and Path(self.connect_broken).exists():
            raise ConnectionError("cannot create the client: the proxy it needs is unreachable")
        return self.work.connect()

    def call(self, client: Any, item: Item) -> Any:
        if "raise-" in item.id:
            raise KeyError(f"bug in call: no field 'name' in {item.id}")
        return self.work.call(client, item)

    @property
    def one_call_at_a_time(self) -> bool:
        return WorkHooks.of(self.work).one_call_at_a_time

    @property
    def cost(self) -> Callable[[Item], float] | None:
        return WorkHooks.of(self.work).cost

    @property
    def usage(self) -> Callable[[Any], float | None] | None:
        return WorkHooks.of(self.work).usage

    def secrets(self) -> tuple[str, ...]:
        return WorkHooks.of(self.work).secrets


# --------------------------------------------------------------------------
# Faults from PostgreSQL
# --------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class DatabaseFaults:
    """Faults the database produces for chosen keys, and a DBA who terminates backends.

    The workload's SQL calls the function ``fn(key)`` (in a key-range query, or
    from a row trigger): for a ``hang`` key it takes an advisory lock that marks
    its backend and sleeps; a second connection polls ``pg_locks`` and
    terminates that backend (``pg_terminate_backend``), as an administrator or
    a failover would. ``slow`` sleeps past any statement timeout, ``bug``
    divides by zero. ``repair`` removes the hang and stops the terminator.
    """

    def __init__(self, dsn: str, kinds: dict[int, str]) -> None:
        self.dsn = dsn
        self.fn = unique("fault")
        self.terminated: set[int] = set()
        self._lock_key = random.randrange(1, 2**31)
        self._stop = threading.Event()
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f"CREATE TABLE {self.fn}_keys (key bigint PRIMARY KEY, kind text NOT NULL)")
            with connection.cursor() as cursor:
                cursor.executemany(f"INSERT INTO {self.fn}_keys VALUES (%s, %s)", list(kinds.items()))
            connection.execute(
                f"""CREATE FUNCTION {self.fn}(k bigint) RETURNS int LANGUAGE plpgsql AS $$
                DECLARE fault text := (SELECT kind FROM {self.fn}_keys WHERE key = k);
                BEGIN
                    IF fault = 'hang' THEN
                        PERFORM pg_advisory_xact_lock({self._lock_key});
                        PERFORM pg_sleep(30);
                    ELSIF fault = 'slow' THEN
                        PERFORM pg_sleep(30);
                    ELSIF fault = 'bug' THEN
                        RETURN 1 / 0;
                    END IF;
                    RETURN 0;
                END $$"""
            )
        self._thread = threading.Thread(target=self._terminate_hung_backends, daemon=True)
        self._thread.start()

    def on_insert(self, table: str) -> None:
        """Call the fault function with the ``id`` of every row inserted into ``table``."""
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute(
                f"""CREATE FUNCTION {self.fn}_row() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM {self.fn}(NEW.id); RETURN NULL; END $$"""
            )
            connection.execute(
                f"CREATE TRIGGER {self.fn} AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {self.fn}_row()"
            )

    def repair(self) -> None:
        """The server is healthy again: no more hangs, no more terminations."""
        self.stop()
        assert len(self.terminated) == 1, f"the DBA should have terminated one backend, not {self.terminated}"
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            connection.execute(f"DELETE FROM {self.fn}_keys WHERE kind = 'hang'")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _terminate_hung_backends(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            while not self._stop.wait(0.01):
                hung = connection.execute(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid::bigint = 0 AND objid::bigint = %s",
                    [self._lock_key],
                ).fetchall()
                for (pid,) in hung:
                    connection.execute("SELECT pg_terminate_backend(%s)", [pid])
                    self.terminated.add(pid)


def require_password(admin_dsn: str, role: str, role_dsn: str) -> None:
    """Make the server ask ``role`` for its password (the bundled server trusts local users)."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        hba = Path(admin.execute("SHOW hba_file").fetchone()[0])
        hba.write_text(f"local all {role} scram-sha-256\n{hba.read_text()}")
        admin.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the reload is asynchronous
        try:
            psycopg.connect(role_dsn).close()
        except psycopg.OperationalError:
            return
        time.sleep(0.02)
    pytest.fail(f"the server still lets {role} in without a password")


def set_password(admin_dsn: str, role: str, password: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))


# --------------------------------------------------------------------------
# What a scenario's builder gets: servers, placeholders, repairs, final checks
# --------------------------------------------------------------------------


def free_port() -> int:
    """A port nobody listens on (yet): connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Env:
    """Servers on demand, and what the servers repair before the first retry round."""

    request: pytest.FixtureRequest
    folder: Path
    names: dict[str, str] = field(default_factory=dict)  # {api}, {down} in a table's item ids
    repairs: list[Callable[[], None]] = field(default_factory=list)
    checks: list[Callable[[], None]] = field(default_factory=list)  # run after the last attempt

    def server(self, fixture: str) -> Any:
        return self.request.getfixturevalue(fixture)

    def item_id(self, key: str) -> str:
        return key.format_map(self.names)

    def down_url(self, start: Callable[..., Any]) -> str:
        """A service that refuses connections now and is started (``start(port=...)``) before the retry."""
        port = free_port()
        self.repairs.append(lambda: self.request.addfinalizer(start(port=port).stop))
        return f"http://127.0.0.1:{port}"

    def broken_connect(self, work: Work) -> Sabotaged:
        """``work`` whose ``connect`` raises until the first retry round."""
        flag = self.folder / unique("connect-broken")
        flag.touch()
        self.repairs.append(flag.unlink)
        return Sabotaged(work, connect_broken=str(flag))

    def database_faults(self, dsn: str, kinds: dict[int, str]) -> DatabaseFaults:
        faults = DatabaseFaults(dsn, kinds)
        self.request.addfinalizer(faults.stop)
        self.repairs.append(faults.repair)
        return faults

    def rotated_password(self) -> tuple[str, str]:
        """A role's DSN and the password the backfill holds; the server learns it before the retry."""
        pg = self.server("postgres")
        role, password = unique("rotated"), "new-secret"
        dsn = pg.create_role(role)
        set_password(pg.url, role, "old-secret")
        require_password(pg.url, role, dsn)
        self.repairs.append(lambda: set_password(pg.url, role, password))
        return dsn, password


def paced(name: str, source: ItemSource, work: Work, limit: ServiceLimit) -> Backfill:
    """A backfill with fast pacing: one in-chunk retry of a throttled call, after at most 0.2 s."""
    return Backfill(name, source, work, limit, overrides=PACING, max_attempts=MAX_ATTEMPTS)


# --------------------------------------------------------------------------
# Builders: (env, the table's keys) -> the backfill
# --------------------------------------------------------------------------


def http(url: str, keys: list[str], wrap: Callable[[Work], Work] = Sabotaged) -> Backfill:
    work = HttpWork(url_template="{base}/items/{id}", base=url, timeout_s=TIMEOUT_S)
    return paced("http", Values.of(keys), wrap(work), ServiceLimit(name="api", requests_per_second=1000))


def scrape(env: Env, keys: list[str], wrap: Callable[[Work], Work] = Sabotaged) -> Backfill:
    urls = [env.item_id(key) for key in keys]
    work = ScrapeWork(selectors={"heading": "h1"}, timeout_s=TIMEOUT_S)
    return paced("scrape", Values.of(urls), wrap(work), ServiceLimit(name="site", requests_per_second=1000))


def llm(env: Env, url: str, keys: list[str], wrap: Callable[[Work], Work] = Sabotaged) -> Backfill:
    path = env.folder / "prompts.jsonl"
    records = [{"id": key} if key.startswith("noprompt-") else {"id": key, "prompt": key} for key in keys]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    work = LlmWork(base_url=f"{url}/v1", model="local", max_tokens=16, timeout_s=TIMEOUT_S)
    limit = ServiceLimit(name="llm", tokens_per_minute=10**8, requests_per_minute=60_000)
    return paced("llm", JsonlPrompts(str(path)), wrap(work), limit)


def key_ranges(keys: list[str], dsn: str, query: str, password: str = "") -> Backfill:
    work = KeyRangeWork(dsn=dsn, password=password, query=query, statement_timeout_s=STATEMENT_TIMEOUT_S)
    limit = ServiceLimit(name="db", safe_connections=8, safety=1.0)
    return paced("key_ranges", KeyRanges(0, 100 * len(keys), 100), work, limit)


def key_ranges_faults(env: Env, keys: list[str]) -> Backfill:
    pg = env.server("postgres")
    table = unique("accounts")
    with psycopg.connect(pg.url, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, balance int NOT NULL)")
        connection.execute(f"INSERT INTO {table} SELECT n, n % 100 FROM generate_series(0, {100 * len(keys) - 1}) n")
    faults = env.database_faults(pg.url, {200: "hang", 500: "slow", 600: "bug"})
    query = (
        f"SELECT count(*) AS n, sum(balance) AS total, {faults.fn}(%(lo)s) AS fault "
        f"FROM {table} WHERE id >= %(lo)s AND id < %(hi)s"
    )
    return key_ranges(keys, pg.url, query)


def key_ranges_down(env: Env, keys: list[str]) -> Backfill:
    return key_ranges(keys, make_conninfo(env.server("postgres").url, port="1"), "SELECT %(hi)s - %(lo)s AS width")


def key_ranges_password(env: Env, keys: list[str]) -> Backfill:
    dsn, password = env.rotated_password()
    return key_ranges(keys, dsn, "SELECT %(hi)s - %(lo)s AS width", password)


def s3_file(key: str, first_id: int) -> bytes | None:
    """The body stored under ``key`` (None: nothing is stored), its records numbered from ``first_id``."""
    records = [{"id": n, "user_id": n % 7} for n in range(first_id, first_id + ROWS_PER_FILE)]
    whole = gzip_jsonl(records)
    bodies = {
        "in/not-gzip.jsonl.gz": b'{"id": 1, "user_id": 1}\n',
        "in/truncated.jsonl.gz": whole[: len(whole) // 2],
        "in/bad-line.jsonl.gz": gzip.compress(b'{"id": 1, "user_id": 1}\n{oops\n'),
        "in/not-object.jsonl.gz": gzip.compress(b"[1, 2]\n"),
        "in/null-user.jsonl.gz": gzip_jsonl([*records[:-1], {"id": records[-1]["id"], "user_id": None}]),
        "in/missing.jsonl.gz": None,
    }
    return bodies.get(key, whole)


def s3_to_postgres(env: Env, keys: list[str], dsn: str, password: str = "") -> tuple[Backfill, str]:
    """Files under ``keys`` (see ``s3_file``), a target table with a unique key, and the backfill."""
    s3, pg = env.server("s3"), env.server("postgres")
    bucket, table = unique("matrix").replace("_", "-"), unique("events")
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for number, key in enumerate(keys):
        body = s3_file(key, number * 1000)
        if body is not None:
            client.put_object(Bucket=bucket, Key=key, Body=body)
    with psycopg.connect(pg.url, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, user_id int NOT NULL)")
        connection.execute(f"GRANT ALL ON {table} TO PUBLIC")
    work = S3ToPostgresWork(
        dsn=dsn,
        password=password,
        bucket=bucket,
        table=table,
        columns=("id", "user_id"),
        endpoint_url=s3.url,
        batch_rows=40,
        statement_timeout_s=5.0,
    )
    limit = ServiceLimit(name="warehouse", safe_connections=8, safety=1.0)
    return paced("s3_postgres", Values.of(keys), Sabotaged(work), limit), table


def s3_to_postgres_faults(env: Env, keys: list[str]) -> Backfill:
    pg = env.server("postgres")
    loaded, table = s3_to_postgres(env, keys, pg.url)
    terminated = keys.index("in/terminated.jsonl.gz") * 1000 + ROWS_PER_FILE // 2  # in the second batch
    env.database_faults(pg.url, {terminated: "hang"}).on_insert(table)

    def every_good_row_loaded_once() -> None:
        with psycopg.connect(pg.url) as connection:
            rows, distinct = connection.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}").fetchone()
        assert rows == distinct == 3 * ROWS_PER_FILE, "good + terminated + its neighbour, each exactly once"

    env.checks.append(every_good_row_loaded_once)
    return loaded


def s3_to_postgres_password(env: Env, keys: list[str]) -> Backfill:
    dsn, password = env.rotated_password()
    return s3_to_postgres(env, keys, dsn, password)[0]


@dataclass(frozen=True)
class Scenario:
    """A table, and how to build the backfill whose items are its keys."""

    build: Callable[[Env, list[str]], Backfill]
    expect: dict[str, Fault]


def _scrape_faults(env: Env, keys: list[str]) -> Backfill:
    env.names.update(api=env.server("http_api").url, down=env.down_url(start_http_api))
    return scrape(env, keys)


def _scrape_connect(env: Env, keys: list[str]) -> Backfill:
    env.names["api"] = env.server("http_api").url
    return scrape(env, keys, env.broken_connect)


SCENARIOS = {
    "http": Scenario(lambda env, keys: http(env.server("http_api").url, keys), HTTP),
    "http-refused": Scenario(
        lambda env, keys: http(env.down_url(start_http_api), keys), all_items(["a", "b", "c"], REFUSED_UNTIL_STARTED)
    ),
    "http-connect": Scenario(
        lambda env, keys: http(env.server("http_api").url, keys, env.broken_connect),
        all_items(["a", "b", "c"], CONNECT_RAISES_UNTIL_FIXED),
    ),
    "scrape": Scenario(_scrape_faults, SCRAPE),
    "scrape-connect": Scenario(
        _scrape_connect, all_items(["{api}/site/1", "{api}/site/2"], CONNECT_RAISES_UNTIL_FIXED)
    ),
    "llm": Scenario(lambda env, keys: llm(env, env.server("llm").url, keys), LLM),
    "llm-refused": Scenario(
        lambda env, keys: llm(env, env.down_url(functools.partial(start_llm, latency_ms=0)), keys),
        all_items(["a", "b", "c"], REFUSED_UNTIL_STARTED),
    ),
    "llm-connect": Scenario(
        lambda env, keys: llm(env, env.server("llm").url, keys, env.broken_connect),
        all_items(["a", "b", "c"], CONNECT_RAISES_UNTIL_FIXED),
    ),
    "key_ranges": Scenario(key_ranges_faults, KEY_RANGES),
    "key_ranges-refused": Scenario(key_ranges_down, all_items(["0-100", "100-200"], WRONG_DATABASE_PORT)),
    "key_ranges-password": Scenario(key_ranges_password, all_items(["0-100", "100-200"], PASSWORD_ROTATED)),
    "s3_postgres": Scenario(s3_to_postgres_faults, S3_TO_POSTGRES),
    "s3_postgres-password": Scenario(s3_to_postgres_password, all_items(["in/good.jsonl.gz"], PASSWORD_ROTATED)),
}


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------


class Attempt(NamedTuple):
    """What the ledger says once an attempt has run."""

    latest: dict[str, tuple[str, str]]  # item -> (status, class) of its latest row
    latest_rows: int
    tried: list[str]  # the items this attempt wrote a row for, one entry per row
    throttled_tries: list[int]  # tries of this attempt's rows answered 429 or 503


def read_attempt(runner: Any, backfill: Backfill, attempt: int) -> Attempt:
    with Ledger(runner.store, backfill.max_attempts, backfill.name) as ledger:
        latest = ledger.query(
            "SELECT item_id, status, CASE WHEN ok THEN 'ok' "
            "WHEN item_id IN (SELECT item_id FROM failed) THEN 'failed' "
            "WHEN item_id IN (SELECT item_id FROM dead) THEN 'dead' END AS class FROM latest"
        ).to_pylist()
        rows = ledger.con.execute(
            "SELECT item_id, http_status, tries FROM results WHERE attempt = ?", [attempt]
        ).fetchall()
    return Attempt(
        latest={row["item_id"]: (row["status"], row["class"]) for row in latest},
        latest_rows=len(latest),
        tried=sorted(item for item, _, _ in rows),
        throttled_tries=[tries for _, status, tries in rows if status in (429, 503)],
    )


@pytest.mark.parametrize("name", SCENARIOS)
def test_fault_matrix(name: str, runner: Any, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    scenario = SCENARIOS[name]
    env = Env(request, tmp_path)
    backfill = scenario.build(env, list(scenario.expect))
    expect = {env.item_id(key): fault for key, fault in scenario.expect.items()}
    to_try = sorted(expect)
    for attempt in range(MAX_ATTEMPTS):
        if attempt == 1:
            for repair in env.repairs:
                repair()
        runner.run(backfill, attempt)
        seen = read_attempt(runner, backfill, attempt)
        assert seen.tried == to_try, f"attempt {attempt} must try exactly what was left failed, once each"
        assert seen.latest_rows == len(seen.latest) == len(expect), "exactly one latest row per item"
        assert seen.latest == {item: fault.after(attempt) for item, fault in expect.items()}, f"attempt {attempt}"
        assert all(tries == 1 + PACING.max_throttle_retries for tries in seen.throttled_tries), "429/503 retried once"
        to_try = sorted(item for item, (_, klass) in seen.latest.items() if klass == "failed")
    assert to_try == [], "after the last round nothing is left to retry: every item is ok or dead"
    for check in env.checks:
        check()
