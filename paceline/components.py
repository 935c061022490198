"""Paceline backfills declared in YAML: the component types ``paceline.Service``, ``paceline.Backfill``
and ``paceline.Runtime``.

Many people who run backfills live in YAML and SQL, so a backfill can be
added with a ``defs.yaml`` instead of Python. These components are thin
adapters: YAML in, the same ``ServiceResource`` / ``BackfillSpec`` /
``ManifestStoreResource`` / ``ExecutorResource`` out, turned into definitions
by the same functions ``paceline_definitions`` is made of
(``service_definitions``, ``backfill_definitions``, ``runtime_definitions``).
So a backfill declared in YAML and the same one declared in Python are the
same assets, checks, sensor, pool and resource config.

* ``paceline.Service`` declares one service and its limit, once; every
  ``paceline.Backfill`` that names it shares its resource, so its limit and
  its concurrency pool are one.
* ``paceline.Backfill`` declares the items, the built-in workload, estimates,
  pins, and its ``share`` of the service's budget. It is checked against its
  service when the definitions load (``dg check defs``): its items files must
  exist then, the admission check, the workload's own checks and the engine's
  checks of ``share``, ``min_share`` and ``max_attempts`` run then, before any
  call, and errors name the YAML file, the line and the fix.
* ``paceline.Runtime`` says where manifests go and where chunks run: once per
  code location (``paceline/definitions.py`` declares its own in Python).

Secrets and URLs are written as ``{{ env.NAME }}`` and become ``EnvVar("NAME")``:
Dagster stores the variable's name, never its value. A secret written inline
is refused by its line, never repeated in the error.

A user's mistake is a ``YamlDeclarationError`` raised while the component
loads or builds, so ``dg check defs`` prints its one message; an error raised
inside a ``Resolver`` would come with a Python traceback and the YAML lines
around it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from dagster import (
    Component,
    ComponentLoadContext,
    Definitions,
    EnvVar,
    Model,
    ResolutionContext,
    Resolvable,
    Resolver,
)
from dagster_shared.yaml_utils.source_position import SourcePositionTree
from pydantic import BaseModel, Field, PrivateAttr, create_model, model_validator
from pydantic.json_schema import SkipJsonSchema

from assets import backfill_definitions, runtime_definitions, service_definitions
from pipeline.defaults import DEFAULT_MAX_ATTEMPTS
from pipeline.errors import ConfigError
from pipeline.items import FileColumn, ItemSource, JsonlPrompts, KeyRanges, S3Prefix, TextLines, Values
from pipeline.limits import Estimates, LimitError, Overrides, ServiceLimit, derive_plan
from pipeline.spec import BackfillSpec
from pipeline.spec import Service as ConfiguredService
from pipeline.work import Work
from pipeline.workloads.common import WorkloadConfigError
from pipeline.workloads.http_api import Batches, HttpClientConfig, HttpWork, http_batch_work, http_work
from pipeline.workloads.key_ranges import KeyRangeWork, key_range_work
from pipeline.workloads.llm import LlmWork, llm_work
from pipeline.workloads.s3_postgres import S3ToPostgresWork, s3_postgres_work
from pipeline.workloads.scrape import ByDomain, ScrapeWork, scrape_work
from resources import ExecutorResource, ManifestStoreResource, ServiceResource
from resources.execution import EXECUTOR_KINDS
from resources.fields import field_like, field_of, fields_like, fields_of

_ENV_REFERENCE = re.compile(
    r"^\{\{\s*env(?:\.(?P<dotted>[A-Za-z_][A-Za-z0-9_]*)|\(\s*['\"](?P<called>[A-Za-z_][A-Za-z0-9_]*)['\"]\s*\))\s*\}\}$"
)
_DATABASE_SAMPLE_URL = "postgresql://service.invalid/database"
_HTTP_SAMPLE_URL = "http://service.invalid"


class YamlDeclarationError(ConfigError):
    """A YAML declaration that cannot run; the message names the file, the line, the field and the fix."""


def env_variable(text: str) -> str | None:
    """The variable named by ``{{ env.NAME }}`` (or ``{{ env('NAME') }}``), or None for any other text."""
    match = _ENV_REFERENCE.match(text.strip())
    return None if match is None else match["dotted"] or match["called"]


def _keep_env_reference(context: ResolutionContext, text: str) -> str:
    """``url``: an ``{{ env.NAME }}`` reference stays unrendered (it becomes an EnvVar); other text is rendered."""
    return text if env_variable(text) else context.resolve_value(text, as_type=str)


def _as_written(context: ResolutionContext, text: str) -> str:
    """``secret``: never rendered, so a reference stays a name and a literal is refused by ``Service.load``.

    A resolver that raised would have Dagster print the YAML lines around the
    error, the secret's among them, and a Python traceback.
    """
    return text


_INLINE_SECRET = (
    "secret must name the environment variable that holds it, written '{{ env.API_TOKEN }}'. "
    "A secret written in YAML ends up in Git, in Dagster's run records and in the launchpad: "
    "remove it from the file, export it (export API_TOKEN=...) and write secret: '{{ env.API_TOKEN }}'."
)


def _from_env(text: str) -> str:
    """An ``EnvVar`` for ``{{ env.NAME }}`` (Dagster then stores the name only), else the text as written."""
    variable = env_variable(text)
    return EnvVar(variable) if variable else text


def _default(function: Callable[..., Any], parameter: str) -> Any:
    """A factory's own default, so the schema shows it without restating it."""
    return inspect.signature(function).parameters[parameter].default


def _one_of(model: Model, options: Iterable[str], attribute: str) -> str:
    """The one option written among ``options``; none or several is refused with the list to choose from."""
    given = [name for name in options if getattr(model, name) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"{attribute} needs exactly one of {', '.join(options)}, got {', '.join(given) or 'none'}. "
            "Write one of them."
        )
    return given[0]


def _set_fields(model: Model) -> dict[str, Any]:
    """Only what the YAML wrote, so every default stays the engine's own."""
    return model.model_dump(exclude_unset=True)


class _Located(Model):
    """A component that remembers where its YAML is, so its errors can name the file and the line."""

    _source: SourcePositionTree | None = PrivateAttr(default=None)

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        """The component's own fields are its YAML schema.

        Dagster's derived schema makes every field "its type or a template
        string" (``anyOf``), and ``dg check yaml`` then reports a misspelt
        nested key only as "not valid under any of the given schemas". With
        the plain schema it names the key, its line and the keys allowed.
        """
        return cls

    @classmethod
    def load(cls, attributes: Any, context: ComponentLoadContext) -> Any:
        component = super().load(attributes, context)  # type: ignore[misc]  # Component.load, by the MRO
        component._source = context.resolution_context.source_position_tree
        return component

    def where(self, *path: str) -> str:
        """``file:line (attributes.a.b)`` of the closest written key of ``path``."""
        location = ".".join(("attributes", *path))
        if self._source is None:
            return f"{type(self).__name__} {location}"
        position, _ = self._source.lookup_closest_and_path(["attributes", *path], trace=None)
        return f"{position} ({location})"

    def refuse(self, path: tuple[str, ...], problem: Exception | str, fix: str = "") -> YamlDeclarationError:
        return YamlDeclarationError(" ".join(part for part in (f"{self.where(*path)}: {problem}", fix) if part))


# --------------------------------------------------------------------------
# paceline.Service
# --------------------------------------------------------------------------


# The ServiceResource's fields, their defaults and descriptions (the limit's are ServiceLimit's): one
# declaration for Python, the launchpad and YAML.
_ServiceFields = create_model("ServiceFields", __base__=_Located, **fields_like(ServiceResource))


class Service(_ServiceFields, Component, Resolvable):
    """An external service and its limit, declared once and named by every paceline.Backfill that calls it.

    Becomes the ``ServiceResource`` keyed by ``name`` (also the concurrency pool
    of every backfill that calls it). Declare at least one limit.
    """

    # url and secret, declared again: YAML writes them as '{{ env.NAME }}', which becomes an EnvVar.

    url: Annotated[
        str,
        Resolver(
            _keep_env_reference,
            model_field_type=str,
            inject_before_resolve=False,
        ),
    ] = Field(
        default="",
        description="Base URL (or Postgres DSN): written as is, or '{{ env.NAME }}' to read it when the run starts.",
    )
    secret: Annotated[
        str,
        Resolver(
            _as_written,
            model_field_type=str,
            inject_before_resolve=False,
        ),
    ] = Field(
        default="",
        description="Token, key or password, only as '{{ env.NAME }}': the value is read when the run starts "
        "and never stored. A literal secret is refused.",
    )

    @classmethod
    def load(cls, attributes: Any, context: ComponentLoadContext) -> Any:
        """Refuse a secret written inline as soon as the YAML is read, naming its line and never its value."""
        service = super().load(attributes, context)
        if service.secret and env_variable(service.secret) is None:
            raise service.refuse(("secret",), _INLINE_SECRET)
        return service

    def resource(self) -> ServiceResource:
        """The same resource a Python declaration makes: only the fields written, url and secret as EnvVar."""
        values = {field: getattr(self, field) for field in self.model_fields_set}
        for field in ("url", "secret"):
            if values.get(field):
                values[field] = _from_env(values[field])
        return ServiceResource(**values)

    def limit(self) -> ServiceLimit:
        """The declared limit, refused with the file and line when it cannot run."""
        try:
            return self.resource().limit()
        except LimitError as error:
            raise self.refuse((), error) from None

    def sample(self, default_url: str) -> ConfiguredService:
        """The service as a workload would get it, without its secret: enough to check a declaration.

        The URL is the written one, or a placeholder of the workload's kind when
        it is read from the environment or the service is the embedded one.
        """
        written = self.url if self.url and env_variable(self.url) is None else default_url
        return ConfiguredService(self.limit(), written)

    def declared_at(self) -> str:
        """Where a backfill's error sends the user when the fix is in the service's limit."""
        return f"The limit of paceline.Service {self.name!r} is declared at {self.where()}."

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        self.limit()
        return service_definitions([self.resource()])


# --------------------------------------------------------------------------
# paceline.Backfill: items
# --------------------------------------------------------------------------


class FileColumnItems(Model):
    path: str = Field(description="A Parquet or CSV file, relative to this defs.yaml's folder.")
    column: str = Field(description="The column that holds the item ids.")


class JsonlItems(Model):
    path: str = Field(description="A JSON-lines file of prompt records, relative to this defs.yaml's folder.")
    id_field: str = Field(default=JsonlPrompts.id_field, description="The field of each record that identifies it.")


class S3PrefixItems(Model):
    bucket: str = Field(description="The bucket the objects are in.")
    prefix: str = Field(default="", description="Only keys under this prefix.")
    suffix: str = Field(default="", description="Only keys ending with this, e.g. '.jsonl.gz'.")
    endpoint_url: str = Field(default="", description="S3-compatible endpoint (MinIO...); empty for AWS.")


class KeyRangeItems(Model):
    lo: int = Field(description="First key (inclusive).")
    hi: int = Field(description="Last key (exclusive).")
    step: int = Field(description="Keys per range: one bounded query per range.")


class Items(Model, Resolvable):
    """Where the items come from: exactly one of lines, column, jsonl, s3_prefix, key_ranges, values."""

    lines: str | SkipJsonSchema[None] = Field(
        default=None, description="A text file, one item per line, relative to this defs.yaml's folder."
    )
    column: FileColumnItems | SkipJsonSchema[None] = Field(
        default=None, description="One column of a Parquet or CSV file."
    )
    jsonl: JsonlItems | SkipJsonSchema[None] = Field(
        default=None, description="Prompt records from a JSON-lines file (the llm workload)."
    )
    s3_prefix: S3PrefixItems | SkipJsonSchema[None] = Field(
        default=None, description="Object keys under an S3 prefix (s3_to_postgres)."
    )
    key_ranges: KeyRangeItems | SkipJsonSchema[None] = Field(
        default=None, description="Integer key ranges [lo, hi) in steps (the sql workload)."
    )
    values: list[str] | SkipJsonSchema[None] = Field(default=None, description="Items written here: a short list.")
    by_domain: bool = Field(
        default=False, description="Scraping: plan URLs domain by domain, for the service's max_workers_per_domain."
    )
    batch_size: int | None = Field(
        default=None, description="Group the items into batches of this many records: one item per batch (http_batch)."
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Items:
        _one_of(self, _ITEM_SOURCES, "items")
        return self

    def files(self) -> dict[tuple[str, ...], str]:
        """The local files the items are read from, each by its key path in the YAML."""
        if self.lines is not None:
            return {("items", "lines"): self.lines}
        written = {name: getattr(self, name) for name in ("column", "jsonl")}
        return {("items", name, "path"): spec.path for name, spec in written.items() if spec is not None}

    def source(self, folder: Path) -> ItemSource:
        """The engine's item source, with relative paths taken from ``folder``."""
        name = _one_of(self, _ITEM_SOURCES, "items")
        source = _ITEM_SOURCES[name](getattr(self, name), folder)
        if self.by_domain:
            source = ByDomain(source)
        if self.batch_size is not None:
            source = Batches(source, self.batch_size)
        return source


def _under(folder: Path, path: str) -> str:
    return str(folder / path)


_ITEM_SOURCES: dict[str, Callable[[Any, Path], ItemSource]] = {
    "lines": lambda path, folder: TextLines(_under(folder, path)),
    "column": lambda spec, folder: FileColumn(_under(folder, spec.path), spec.column),
    "jsonl": lambda spec, folder: JsonlPrompts(_under(folder, spec.path), spec.id_field),
    "s3_prefix": lambda spec, folder: S3Prefix(spec.bucket, spec.prefix, spec.endpoint_url or None, spec.suffix),
    "key_ranges": lambda spec, folder: KeyRanges(spec.lo, spec.hi, spec.step),
    "values": lambda values, folder: Values.of(values),
}


# --------------------------------------------------------------------------
# paceline.Backfill: the built-in workload
# --------------------------------------------------------------------------


class HttpOptions(Model):
    url_template: str = Field(
        default=_default(http_work, "url_template"),
        description="URL per item: {base} is the service url, {id} the item id, other {names} fields of its payload.",
    )
    method: str = Field(default=HttpWork.method, description="GET, POST, PUT, PATCH or DELETE.")
    json_body_template: Any = Field(default=None, description="JSON body per item, filled like the URL (POST...).")
    timeout_s: float = Field(
        default=HttpClientConfig.timeout_s, description="Seconds before a call times out (retryable)."
    )


class HttpBatchOptions(Model):
    path: str = Field(
        default=_default(http_batch_work, "path"), description="The batch endpoint, under the service url."
    )
    timeout_s: float = Field(
        default=HttpClientConfig.timeout_s, description="Seconds before a call times out (retryable)."
    )


class ScrapeOptions(Model):
    selectors: dict[str, str] = Field(description="Payload field -> CSS selector; the first match's text is stored.")
    user_agent: str = Field(default=ScrapeWork.user_agent, description="Your crawler's name and a contact URL.")
    http2: bool = Field(default=ScrapeWork.http2, description="HTTP/2 where the site offers it over TLS.")
    timeout_s: float = Field(
        default=HttpClientConfig.timeout_s, description="Seconds before a fetch times out (retryable)."
    )


class LlmOptions(Model):
    model: str = Field(description="The model name, e.g. gpt-4o-mini.")
    max_tokens: int = Field(default=LlmWork.max_tokens, description="Caps each answer; also sizes the token estimate.")
    prompt_field: str = Field(
        default=LlmWork.prompt_field, description="The field of each record that holds the prompt."
    )
    system_prompt: str = Field(default=LlmWork.system_prompt, description="Sent before every prompt; empty for none.")
    temperature: float | None = Field(default=None, description="0 to 2; unset for the model's default.")
    timeout_s: float = Field(default=LlmWork.timeout_s, description="Seconds before a call times out (retryable).")


class SqlOptions(Model):
    query: str = Field(description="Run once per key range, bounded by %(lo)s and %(hi)s.")
    max_rows: int = Field(default=KeyRangeWork.max_rows, description="At most this many result rows stored per range.")
    statement_timeout_s: float | None = Field(
        default=KeyRangeWork.statement_timeout_s, description="Seconds before one range's query is stopped (retryable)."
    )


class S3ToPostgresOptions(Model):
    bucket: str = Field(description="The bucket the gzipped JSON-lines files are in.")
    table: str = Field(description="The target table (schema.table); it needs a primary key or unique constraint.")
    columns: list[str] = Field(description="The columns to load, read from each record by name.")
    endpoint_url: str = Field(default="", description="S3-compatible endpoint (MinIO...); empty for AWS.")
    batch_rows: int = Field(
        default=S3ToPostgresWork.batch_rows, description="Rows copied per batch inside a file's transaction."
    )


class WorkOptions(Model, Resolvable):
    """The built-in workload and its options: exactly one of http, http_batch, scrape, llm, sql, s3_to_postgres."""

    http: HttpOptions | SkipJsonSchema[None] = Field(
        default=None, description="One HTTP request per item (paced by requests/s or /min)."
    )
    http_batch: HttpBatchOptions | SkipJsonSchema[None] = Field(
        default=None, description="One POST per batch of records (paced by concurrent_batches)."
    )
    scrape: ScrapeOptions | SkipJsonSchema[None] = Field(
        default=None, description="Polite scraping of static pages (robots.txt honoured)."
    )
    llm: LlmOptions | SkipJsonSchema[None] = Field(
        default=None, description="One chat completion per prompt (paced by tokens_per_minute)."
    )
    sql: SqlOptions | SkipJsonSchema[None] = Field(
        default=None, description="One bounded query per key range (paced by safe_connections)."
    )
    s3_to_postgres: S3ToPostgresOptions | SkipJsonSchema[None] = Field(
        default=None, description="Load S3 files into Postgres, each row once (paced by safe_connections)."
    )

    @model_validator(mode="after")
    def _exactly_one_workload(self) -> WorkOptions:
        _one_of(self, _WORKLOADS, "work")
        return self

    def kind(self) -> str:
        return _one_of(self, _WORKLOADS, "work")

    def factory(self) -> Callable[[ConfiguredService], Work]:
        """The engine's workload factory (``BackfillSpec.work``) with the options written."""
        kind = self.kind()
        return _WORKLOADS[kind](_set_fields(getattr(self, kind)))

    def sample_url(self) -> str:
        return _DATABASE_SAMPLE_URL if self.kind() in ("sql", "s3_to_postgres") else _HTTP_SAMPLE_URL


def _s3_postgres(options: dict[str, Any]) -> Callable[[ConfiguredService], Work]:
    bucket, table, columns = options.pop("bucket"), options.pop("table"), tuple(options.pop("columns"))
    if "endpoint_url" in options:
        options["endpoint_url"] = options["endpoint_url"] or None
    return s3_postgres_work(bucket, table, columns, **options)


_WORKLOADS: dict[str, Callable[[dict[str, Any]], Callable[[ConfiguredService], Work]]] = {
    "http": lambda options: http_work(**options),
    "http_batch": lambda options: http_batch_work(**options),
    "scrape": lambda options: scrape_work(options.pop("selectors"), **options),
    "llm": lambda options: llm_work(options.pop("model"), **options),
    "sql": lambda options: key_range_work(options.pop("query"), **options),
    "s3_to_postgres": _s3_postgres,
}


# --------------------------------------------------------------------------
# paceline.Backfill
# --------------------------------------------------------------------------


EstimatesOptions = create_model("EstimatesOptions", __base__=Model, **fields_of(Estimates))
OverridesOptions = create_model("OverridesOptions", __base__=Model, **fields_of(Overrides))


class Backfill(_Located, Component, Resolvable):
    """A rate-limited, manifested, retrying backfill: its assets, checks, jobs and retry sensor.

    Names a ``paceline.Service`` declared elsewhere in the project; checked
    against that service's limit when the definitions load, before any call.
    """

    name: str = Field(description="The backfill's name: asset key prefix, group, job and sensor names.")
    service: str = Field(description="The `name` of the paceline.Service this backfill calls.")
    items: Items = Field(description="Where the items come from.")
    work: WorkOptions = Field(description="The built-in workload that handles one item, and its options.")
    estimates: EstimatesOptions = Field(default_factory=EstimatesOptions, description="What you know about the work.")
    overrides: OverridesOptions = Field(
        default_factory=OverridesOptions, description="Values pinned instead of derived."
    )
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, description="Attempt 0 plus retry rounds, at most.")
    share: float = field_of(BackfillSpec, "share")
    min_share: float = field_of(BackfillSpec, "min_share")
    description: str = Field(default="", description="Shown in the UI.")

    def spec(self, folder: Path) -> BackfillSpec:
        """The same declaration Python would write; relative item paths are taken from ``folder``."""
        try:
            return BackfillSpec(
                name=self.name,
                service=self.service,
                items=self.items.source(folder),
                work=self.work.factory(),
                estimates=Estimates(**_set_fields(self.estimates)),
                overrides=Overrides(**_set_fields(self.overrides)),
                max_attempts=self.max_attempts,
                share=self.share,
                min_share=self.min_share,
                description=self.description,
            )
        except ValueError as error:
            raise self.refuse((), error) from None

    @classmethod
    def load(cls, attributes: Any, context: ComponentLoadContext) -> Any:
        """Refuse an items file that is not there as soon as the YAML is read, not when a run starts."""
        backfill = super().load(attributes, context)
        backfill._check_files(context.path)
        return backfill

    def _check_files(self, folder: Path) -> None:
        for key_path, written in self.items.files().items():
            path = Path(_under(folder, written))
            if not path.is_file():
                raise self.refuse(
                    key_path,
                    f"the items file {written!r} does not exist (looked for {path}).",
                    "Fix the path: a relative one is taken from this defs.yaml's folder; "
                    "write '{{ context.project_root }}/...' for one under the project.",
                )

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        spec = self.spec(context.path)
        self._admit(spec, self._service(context))
        return backfill_definitions(spec, executor=_executor_kind(context))

    def _service(self, context: ComponentLoadContext) -> Service:
        declared = {service.name: service for service in context.component_tree.get_all_components(of_type=Service)}
        if self.service not in declared:
            raise self.refuse(
                ("service",),
                f"no paceline.Service is named {self.service!r} (declared: {', '.join(sorted(declared)) or 'none'}).",
                f"Declare it once, e.g. in a defs.yaml: type: paceline.Service, attributes: name: {self.service}, "
                "requests_per_second: ..., or fix the name.",
            )
        return declared[self.service]

    def _admit(self, spec: BackfillSpec, service: Service) -> None:
        """The checks a run would make before its first call: the workload against the service, then the plan."""
        sample = service.sample(self.work.sample_url())
        try:
            spec.work(sample)
        except WorkloadConfigError as error:
            raise self.refuse(("work", self.work.kind()), error, service.declared_at()) from None
        try:
            derive_plan(sample.limit, spec.estimates, spec.overrides)
        except LimitError as error:
            raise self.refuse(("overrides",), error, service.declared_at()) from None
        try:
            spec.build(sample)  # the engine's own checks of what passes through as written: share, min_share...
        except ConfigError as error:
            raise self.refuse(_field_named(error, _PASSED_THROUGH), error) from None


_PASSED_THROUGH = ("max_attempts", "min_share", "share")


def _field_named(error: ConfigError, fields: Iterable[str]) -> tuple[str, ...]:
    """The field an engine message is about (it reads "<backfill>: <field> must ..."), to point at its line."""
    message = str(error)
    return next(((name,) for name in fields if f": {name} must" in message), ())


# --------------------------------------------------------------------------
# paceline.Runtime
# --------------------------------------------------------------------------


_ExecutorFields = create_model("ExecutorFields", __base__=Model, **fields_like(ExecutorResource))


class ExecutorOptions(_ExecutorFields):
    # The ExecutorResource's fields, with kind as a choice so that dg check yaml lists the kinds.
    kind: Literal[EXECUTOR_KINDS] = field_like(ExecutorResource, "kind")  # type: ignore[valid-type]


def _executor_kind(context: ComponentLoadContext) -> str:
    """The executor a ``paceline.Runtime`` of this project declares: it labels the assets that run chunks."""
    runtimes = context.component_tree.get_all_components(of_type=Runtime)
    return runtimes[0].executor.kind if runtimes else ExecutorResource.model_fields["kind"].default


class Runtime(_Located, Component, Resolvable):
    """Where manifests go and where chunks run, once per code location."""

    manifest_root: str = field_like(ManifestStoreResource, "root")
    s3_endpoint_url: str = field_like(ManifestStoreResource, "s3_endpoint_url")
    executor: ExecutorOptions = Field(default_factory=ExecutorOptions, description="Local threads or Burla.")

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        written = self.model_fields_set
        store = {"root": self.manifest_root} if "manifest_root" in written else {}
        if "s3_endpoint_url" in written:
            store["s3_endpoint_url"] = self.s3_endpoint_url
        return runtime_definitions(ManifestStoreResource(**store), ExecutorResource(**_set_fields(self.executor)))
