"""The external service a backfill calls, as a Dagster resource: its limit, URL and secret.

One resource per service, keyed by the service's name, so its limit is set —
and raised after clean runs — in the launchpad or in run config, without a
code change, and every backfill that calls the service reads the same numbers.
Set ``secret`` with ``dagster.EnvVar("...")``: Dagster then stores the variable's
name, never its value, and the engine redacts the value from every row.

With no ``url`` and ``embedded`` set to ``"http_api"`` or ``"llm"``, the
resource starts the bundled local service for the duration of the run, with
the declared limit as the service's own server-side limit, so ``dagster dev``
and the demo work with no account anywhere. Its arrivals live and die with the
run; its "fails once, then heals" fault counters survive in
``embedded_state_file`` when one is set. The embedded service gets the secret
on its command line: fine for a local demo, not for a real credential.

``embedded="demo"`` takes the URL and secret of the service of the same name
from ``pipeline.workloads.demos.start_demo_services()`` (the built-in
workloads' demos: an API, a batch endpoint, a website, an LLM, PostgreSQL and
S3, seeded with data), started once per run process.
"""

from __future__ import annotations

import atexit
import dataclasses

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr, create_model

from pipeline.errors import ConfigError
from pipeline.limits import ServiceLimit
from pipeline.localservices import ServiceHandle, start_http_api, start_llm
from pipeline.spec import Service
from pipeline.workloads.demos import DemoServices, start_demo_services
from resources.fields import fields_of

_DEMO_SERVICES: list[DemoServices] = []


def _demo_services() -> DemoServices:
    """The built-in workloads' demo services, started on first use and stopped when the process exits."""
    if not _DEMO_SERVICES:
        _DEMO_SERVICES.append(start_demo_services())
        atexit.register(_DEMO_SERVICES[0].stop)
    return _DEMO_SERVICES[0]


EMBEDDED_SERVICES = ("http_api", "llm", "demo")
_EMBEDDED_BASE_PATH = {"http_api": "", "llm": "/v1"}  # the LLM is OpenAI-compatible: clients expect .../v1
LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(ServiceLimit))


_ServiceLimitFields = create_model(
    "ServiceLimitFields", __base__=ConfigurableResource, **fields_of(ServiceLimit, required={"name"})
)


class ServiceResource(_ServiceLimitFields):
    """A service limit, where the service is, and its secret.

    The limit fields (``requests_per_second``, ``safety``...) are ``ServiceLimit``'s
    own, with its defaults and descriptions (``name`` is required); each is a
    launchpad key of its own.
    """

    url: str = Field(default="", description="Base URL of the service; empty starts the embedded one.")
    secret: str = Field(default="", description='Token or key; set it with EnvVar("...").')
    embedded: str = Field(
        default="", description="'http_api', 'llm' or 'demo': start the bundled local service(s) when url is empty."
    )
    demo_faults: float = Field(
        default=0.0, description="Embedded http_api only: the fraction of plain ids it fails on purpose."
    )
    embedded_state_file: str = Field(
        default="",
        description="Embedded http_api only: where it remembers the items it already failed, so a retry "
        "round in a later run heals them as a long-lived service would.",
    )

    _handle: ServiceHandle | None = PrivateAttr(default=None)

    def limit(self) -> ServiceLimit:
        """The declared limit; a bad value raises the engine's ``LimitError`` naming the field."""
        return ServiceLimit(**{field: getattr(self, field) for field in LIMIT_FIELDS})

    @classmethod
    def from_limit(cls, limit: ServiceLimit, **settings: object) -> ServiceResource:
        """A resource declaring ``limit`` (plus url, secret, embedded... in ``settings``)."""
        return cls(**{name: getattr(limit, name) for name in LIMIT_FIELDS}, **settings)

    def service(self) -> Service:
        """The configured service, starting the embedded one on first use if configured so."""
        limit = self.limit()
        if not self.url and self.embedded == "demo":
            demo = _demo_services().services[self.name]
            return Service(limit, demo.url, self.secret or demo.secret)
        return Service(limit, self.url or self._embedded_url(limit), self.secret)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        """Refuse a bad limit, or no way to reach the service, when the run starts: before any call."""
        self.limit()
        self._check_reachable()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._handle is not None:
            self._handle.stop()
            self._handle = None

    def _check_reachable(self) -> None:
        if not self.url and self.embedded not in EMBEDDED_SERVICES:
            raise ConfigError(
                f"{self.name}: url is empty and embedded is {self.embedded!r}. Set url to the service's "
                f"base URL, or embedded to one of {', '.join(EMBEDDED_SERVICES)} to run against the "
                "bundled local service."
            )

    def _embedded_url(self, limit: ServiceLimit) -> str:
        self._check_reachable()
        if self._handle is None:
            self._handle = self._start_embedded(limit)
        return self._handle.url + _EMBEDDED_BASE_PATH[self.embedded]

    def _start_embedded(self, limit: ServiceLimit) -> ServiceHandle:
        """The bundled service, enforcing the declared (not the target) limit server-side."""
        secret = self.secret or None
        if self.embedded == "http_api":
            return start_http_api(
                rps=limit.global_rate(),
                max_concurrent_batches=limit.concurrent_batches,
                token=secret,
                demo_faults=self.demo_faults,
                state_file=self.embedded_state_file or None,
            )
        rate = limit.global_rate()
        return start_llm(
            tpm=limit.tokens_per_minute,
            rpm=None if rate is None else rate * 60,
            key=secret,
        )
