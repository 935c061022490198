"""HTTP API backfills: one request per item from a URL template, or one POST per batch.

``HttpWork`` calls ``url_template`` for every item (GET, or POST with a JSON
body template) over one httpx client per chunk, and stores the JSON response
as the item's payload. It never sleeps to pace itself: the engine spaces the
calls from the declared limit, and ``raise_for_refusal`` hands every "no" to
the engine's refusal table (``pipeline.refusals``: a 429 or GitHub's quota
403 waits, an empty account stops the run, 5xx and timeouts are retryable,
other 4xx permanent, and Slack's 200 ``"ok": false`` is read as what it says);
a body that is not JSON is a permanent ``bad_payload``. ``conventions`` adds
a service's own dialect as rows asked before the built-in ones.

``HttpBatchWork`` is for services limited by batches in flight (vector
database upserts, bulk APIs). The item *is* the batch: ``Batches`` turns any
item source into items of ``batch_size`` records, so "one row per item" stays
true (one row per batch) and a failed batch is retried whole. Each worker has
at most one batch in flight, so batches in flight <= max_parallelism, which
the engine derives from the declared ``concurrent_batches``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pyarrow as pa

from pipeline.items import ITEM_SCHEMA, ItemSource, normalize
from pipeline.outcomes import Permanent, raise_for_refusal
from pipeline.refusals import Convention
from pipeline.spec import Service
from pipeline.work import Item, Work
from pipeline.workloads.common import (
    WorkloadConfigError,
    check,
    check_header_values,
    check_http_url,
    check_positive,
    item_record,
    require_limit,
    secret_header_values,
)

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_SAMPLE_ID = "sample-id"


@dataclass(frozen=True, kw_only=True)
class HttpClientConfig(Work):
    """What every HTTP workload needs: headers, a bearer token and a timeout, one client per chunk."""

    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold an API key
    token: str = field(default="", repr=False)
    timeout_s: float = 10.0
    conventions: tuple[Convention, ...] = ()  # the service's own ways of saying no, asked first

    def _check_client(self) -> None:
        owner = type(self).__name__
        check_positive(owner, "timeout_s", self.timeout_s)
        check_header_values(owner, self.headers)
        check(
            not (self.token and any(k.lower() == "authorization" for k in self.headers)),
            owner,
            "headers",
            "sets Authorization and a token is also given",
            "Pass the credential once: either token= (sent as a bearer token) or the header.",
        )
        check(
            self.token == self.token.strip() and self.token.isprintable(),
            owner,
            "token",
            "contains whitespace or control characters",
            "Strip the value read from the environment.",
        )

    def connect(self) -> Any:
        """One client (one keep-alive connection pool) for the whole chunk."""
        return self._client()

    def _client(self, extra_headers: Mapping[str, str] | None = None, **options: Any) -> Any:
        import httpx

        headers = {**self.headers, **(extra_headers or {})}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return httpx.Client(headers=headers, timeout=self.timeout_s, **options)

    def secrets(self) -> tuple[str, ...]:
        return (self.token, *secret_header_values(self.headers))


@dataclass(frozen=True, kw_only=True)
class HttpWork(HttpClientConfig):
    """One request per item: ``url_template`` and ``json_body_template`` filled from the item.

    Template fields: ``{base}`` (the service URL), ``{id}`` (the item id,
    URL-quoted in the URL) and, for items whose payload is a JSON object, its
    keys. Strings anywhere inside ``json_body_template`` are filled the same
    way (not quoted). The JSON response, or ``None`` for an empty body, is the payload.
    """

    url_template: str
    base: str = ""
    method: str = "GET"
    json_body_template: Any = None

    def __post_init__(self) -> None:
        self._check_client()
        owner = "HttpWork"
        check(
            bool(self.url_template),
            owner,
            "url_template",
            "is empty",
            "Give the URL to call per item, for example '{base}/items/{id}'.",
        )
        check(
            self.method in METHODS,
            owner,
            "method",
            f"{self.method!r} is not supported",
            f"Use one of {', '.join(METHODS)} (upper case).",
        )
        url_fields = _template_fields(owner, "url_template", self.url_template)
        body_fields = _body_fields(owner, self.json_body_template)
        check(
            bool((url_fields | body_fields) - {"base"}),
            owner,
            "url_template",
            "uses no item field, so every item would make the same call",
            "Put {id} (or a field of the item's payload) in the URL or the body template.",
        )
        check(
            "base" not in url_fields | body_fields or bool(self.base),
            owner,
            "base",
            "is empty but the template uses {base}",
            "Configure the service URL (Service.url), or write the full URL in the template.",
        )
        sample = _fill(self.url_template, _SampleFields(base=self.base.rstrip("/")))
        check_http_url(owner, "url_template", sample)

    def call(self, client: Any, item: Item) -> Any:
        base = self.base.rstrip("/")
        fields = _item_fields(item)
        url = _fill(self.url_template, _url_values(base, fields))
        body = None
        if self.json_body_template is not None:
            body = _fill_body(self.json_body_template, {**fields, "base": base})
        response = client.request(self.method, url, json=body)
        raise_for_refusal(response, self.conventions)
        return response.json() if response.content else None


def http_work(url_template: str = "{base}/items/{id}", **options: Any) -> Callable[[Service], HttpWork]:
    """``BackfillSpec.work`` for an HTTP API: base URL and bearer token come from the service.

    ``options`` are the other ``HttpWork`` fields (method, headers, timeout_s,
    json_body_template). The service's ``secret`` is sent as the bearer token.
    """

    def build(service: Service) -> HttpWork:
        return HttpWork(url_template=url_template, base=service.url, token=service.secret, **options)

    return build


@dataclass(frozen=True, kw_only=True)
class HttpBatchWork(HttpClientConfig):
    """One POST per item, where the item is a batch of records made by ``Batches``.

    The body is the JSON list of the batch's records; the payload stored is
    ``{"count": n, "response": <the JSON response>}``. The records themselves
    stay in the chunk plan, so a failed batch can be inspected and is retried whole.
    """

    url: str

    def __post_init__(self) -> None:
        self._check_client()
        check(bool(self.url), "HttpBatchWork", "url", "is empty", "Give the batch endpoint, e.g. https://host/batch.")
        check_http_url("HttpBatchWork", "url", self.url)

    def call(self, client: Any, item: Item) -> Any:
        records = _batch_records(item)
        response = client.post(self.url, json=records)
        raise_for_refusal(response, self.conventions)
        return {"count": len(records), "response": response.json() if response.content else None}


def http_batch_work(path: str = "/batch", **options: Any) -> Callable[[Service], HttpBatchWork]:
    """``BackfillSpec.work`` for a batch endpoint at ``path`` under the service URL.

    Refuses a service that does not declare ``concurrent_batches``: that is
    the limit this workload is sized by (batches in flight = live workers).
    """

    def build(service: Service) -> HttpBatchWork:
        require_limit(service, "concurrent_batches", "HttpBatchWork", "4")
        return HttpBatchWork(url=service.url.rstrip("/") + path, token=service.secret, **options)

    return build


@dataclass(frozen=True)
class Batches:
    """Group another source's items into batches of ``batch_size``: one item, one row, per batch.

    Items are normalised first (blanks and repeats dropped) so no record is
    sent twice. A batch's id is ``batch-<n>`` (stable for a given input) and
    its payload is ``{"records": [...]}``: each record is the inner item's
    payload if it has one (e.g. a vector to upsert), else its id.
    """

    source: ItemSource
    batch_size: int

    def __post_init__(self) -> None:
        check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            "Batches",
            "batch_size",
            f"must be a whole number >= 1, got {self.batch_size!r}",
            "Use the service's batch size, e.g. 100.",
        )

    def read(self) -> pa.Table:
        items, _ = normalize(self.source.read())
        ids = items["item_id"].to_pylist()
        payloads = items["payload"].to_pylist()
        records = [i if p is None else json.loads(p) for i, p in zip(ids, payloads)]
        batches = [records[start : start + self.batch_size] for start in range(0, len(records), self.batch_size)]
        width = len(str(max(len(batches) - 1, 0)))
        return pa.table(
            {
                "item_id": [f"batch-{n:0{width}d}" for n in range(len(batches))],
                "payload": [json.dumps({"records": batch}) for batch in batches],
            },
            schema=ITEM_SCHEMA,
        )

    def describe(self) -> str:
        return f"batches of {self.batch_size} from {self.source.describe()}"


class _SampleFields(dict):
    """Any field resolves to a placeholder: used to check a template's shape before any item exists."""

    def __missing__(self, key: str) -> str:
        return _SAMPLE_ID


def _template_fields(owner: str, field_name: str, template: str) -> set[str]:
    """Field names in a format string; only plain ``{name}`` fields are allowed."""
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as error:
        raise WorkloadConfigError(
            f"{owner}.{field_name}: {template!r} is not a valid template ({error}). "
            "Balance the braces; write {{ or }} for a literal brace."
        ) from None
    for name, spec, conversion in parsed:
        check(
            name is None or (name.isidentifier() and not spec and not conversion),
            owner,
            field_name,
            f"field {{{name}}} is not a plain name",
            "Use plain fields such as {id} or {base}; attribute access, indexes and formats are not supported.",
        )
    return {name for name, _, _ in parsed if name is not None}


def _body_fields(owner: str, body: Any) -> set[str]:
    if isinstance(body, str):
        return _template_fields(owner, "json_body_template", body)
    if isinstance(body, Mapping):
        return set().union(*(_body_fields(owner, v) for v in body.values()))
    if isinstance(body, (list, tuple)):
        return set().union(*(_body_fields(owner, v) for v in body))
    check(
        body is None or isinstance(body, (int, float, bool)),
        owner,
        "json_body_template",
        f"contains a {type(body).__name__}",
        "Use JSON values only: objects, lists, strings, numbers, booleans, null.",
    )
    return set()


def _item_fields(item: Item) -> dict[str, Any]:
    data = item_record(item)
    fields = dict(data) if isinstance(data, dict) else {}
    fields["id"] = item.id
    return fields


def _fill(template: str, values: Mapping[str, Any]) -> str:
    try:
        return template.format_map(values)
    except KeyError as missing:
        raise Permanent(
            f"the item has no field {missing} used by the template; add it to the item's payload",
            status="bad_item",
        ) from None


def _url_values(base: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Item fields quoted for a URL path or query (``/`` and ``?`` included); ``base`` as is."""
    return {**{k: quote(str(v), safe="") for k, v in fields.items()}, "base": base}


def _fill_body(body: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(body, str):
        return _fill(body, values)
    if isinstance(body, Mapping):
        return {k: _fill_body(v, values) for k, v in body.items()}
    if isinstance(body, (list, tuple)):
        return [_fill_body(v, values) for v in body]
    return body


def _batch_records(item: Item) -> list[Any]:
    data = item_record(item)
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise Permanent(
            'a batch item must carry {"records": [...]}; build the items with Batches(source, batch_size)',
            status="bad_item",
        )
    return data["records"]
