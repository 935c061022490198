"""Make code-configured resources overridable one field at a time in the launchpad.

A resource instance configured in code is replaced *whole* by run config: set
``requests_per_second`` in the launchpad and ``url``, ``name`` and the
``EnvVar`` secret silently fall back to their class defaults. Turned into a
partial resource, each value written in code becomes the default of its own
field, so raising a limit after a clean run is a one-field change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dagster import ConfigurableResource

if TYPE_CHECKING:  # not exported by dagster; only the type is needed here
    from dagster._config.pythonic_config import PartialResource


def overridable(resource: ConfigurableResource) -> PartialResource:
    """The same resource, configurable at launch, with the values set in code as per-field defaults.

    ``EnvVar`` values stay references (``{"env": "NAME"}``): the secret itself
    is read when the run starts and never stored in the run's config.
    """
    values = {field: getattr(resource, field) for field in resource.model_fields_set}
    return type(resource).configure_at_launch(**values)
