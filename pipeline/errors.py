"""The root of every error Paceline raises, and the two families under it.

One root, as in httpx: a caller can catch ``PacelineError`` and know it met
Paceline's own judgement (a limit that cannot hold, a store that cannot be
read, a service that stopped the run), never a bug. The ``paceline``
command relies on that: a ``PacelineError`` is printed as one line that says
what to do, anything else keeps its traceback, because it is a bug to report.

``ConfigError`` is also a ``ValueError``: a declaration with a bad value is
one, and Dagster's and Pydantic's validation turn a ``ValueError`` raised in
a validator into a config error that names the field.
"""

from __future__ import annotations


class PacelineError(Exception):
    """Base class for every error Paceline raises; its message says what is wrong and what to do."""


class ConfigError(PacelineError, ValueError):
    """A declaration or an argument that cannot run, found before any external call is made."""
