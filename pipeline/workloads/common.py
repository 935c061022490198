"""What the built-in workloads share: configuration errors, secrets from the environment, checks.

Every workload validates its configuration when it is constructed, which
``BackfillSpec.build`` does before the first call. So a bad declaration is
one clear error naming the field and the fix, never a thousand failed rows.
Checks here are local only: they never open a connection.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ConfigError
from pipeline.spec import Service
from pipeline.work import Item


class WorkloadConfigError(ConfigError):
    """A workload declared with a value that cannot work; raised before any call."""


class MissingSecretError(WorkloadConfigError):
    """The environment variable that should hold a secret is missing or empty."""


def token_from_env(variable: str) -> str:
    """The secret held by environment variable ``variable``, or an error naming that variable.

    Read by the caller (a Dagster resource, a script), never by a worker, so a
    missing secret is reported once, before anything is planned.
    """
    if not variable:
        raise WorkloadConfigError(
            "token_from_env: no variable name given. Pass the name of the environment "
            "variable that holds the secret, for example token_from_env('API_TOKEN')."
        )
    value = os.environ.get(variable, "").strip()
    if not value:
        raise MissingSecretError(
            f"environment variable {variable} is not set or is empty. Export it before "
            f"running (export {variable}=...), or configure the service's secret another way."
        )
    return value


def check(condition: bool, owner: str, field: str, problem: str, fix: str) -> None:
    """Raise ``WorkloadConfigError`` as "<owner>.<field>: <problem>. <fix>" unless ``condition``."""
    if not condition:
        raise WorkloadConfigError(f"{owner}.{field}: {problem}. {fix}")


def check_http_url(owner: str, field: str, url: str) -> None:
    """An absolute http(s) URL with a host, checked without contacting it."""
    parts = urlsplit(url)
    check(
        parts.scheme in ("http", "https") and bool(parts.netloc),
        owner,
        field,
        f"{url!r} is not an absolute http(s) URL",
        "Write it as http://host[:port]/path or https://host/path.",
    )


def check_positive(owner: str, field: str, value: float) -> None:
    check(value > 0, owner, field, f"must be greater than 0, got {value!r}", f"Set {field} to a positive number.")


def check_header_values(owner: str, headers: Mapping[str, Any]) -> None:
    """Header names and values must be strings without line breaks (header injection)."""
    for name, value in headers.items():
        check(
            isinstance(name, str) and isinstance(value, str) and not any(c in name + value for c in "\r\n"),
            owner,
            "headers",
            f"header {name!r} must map a string to a string without line breaks",
            "Fix that header.",
        )


_SECRET_HEADER_WORDS = ("auth", "key", "token", "secret", "cookie", "password")


def secret_header_values(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Values of headers whose names say they carry credentials, so they get redacted too."""
    return tuple(v for k, v in headers.items() if any(word in k.lower() for word in _SECRET_HEADER_WORDS))


def item_record(item: Item) -> Any:
    """The item's decoded JSON payload (a record, a range, a batch), or None when it has none."""
    return item.data if item.payload is not None else None


def require_limit(service: Service, field: str, workload: str, example: str) -> None:
    """Refuse a service whose declared limit lacks the field this workload is paced by."""
    if getattr(service.limit, field) is None:
        raise WorkloadConfigError(
            f"{service.name}: {workload} needs {field} declared in the service limit, because "
            f"max_parallelism is derived from it. Declare it, for example ServiceLimit(name="
            f"{service.name!r}, {field}={example})."
        )


@contextmanager
def translated(translate: Callable[[Exception], Exception]) -> Iterator[None]:
    """Re-raise errors as the engine outcome ``translate`` maps them to (or unchanged)."""
    try:
        yield
    except Exception as error:
        outcome = translate(error)
        if outcome is error:
            raise
        raise outcome from error
