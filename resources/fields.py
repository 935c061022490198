"""Pydantic fields derived from a declaration made once elsewhere.

The engine declares each user-facing field once, on its frozen dataclass
(``ServiceLimit``, ``Estimates``, ``Overrides``, ``BackfillSpec``'s share),
with its type, its default and its description. The Dagster resources and
the YAML components take theirs from there (``fields_of``, ``field_of``), or
from the resource they configure (``fields_like``, ``field_like``), so a new limit, a changed default or a
reworded description is one edit that the launchpad, ``dg check yaml`` and the
schema reference all follow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any, get_type_hints

from pydantic import BaseModel, Field

from pipeline.limits import DESCRIPTION


def fields_of(declaration: type, required: Collection[str] = ()) -> dict[str, Any]:
    """The fields of an engine dataclass, as ``pydantic.create_model`` takes them: ``{name: (type, Field)}``.

    A field named in ``required`` loses its default: the engine may default a
    name, a resource keyed by that name may not.
    """
    types = get_type_hints(declaration)
    return {
        field.name: (types[field.name], field_of(declaration, field.name, field.name in required))
        for field in dataclasses.fields(declaration)
    }


def field_of(declaration: type, name: str, required: bool = False) -> Any:
    """A new ``Field`` with the default (unless ``required``) and the description of a dataclass's field ``name``."""
    field = declaration.__dataclass_fields__[name]
    default = {} if required else {"default": field.default}
    return Field(description=field.metadata[DESCRIPTION], **default)


def fields_like(model: type[BaseModel]) -> dict[str, Any]:
    """Every field of ``model``, as ``pydantic.create_model`` takes them, for a model that mirrors it."""
    return {name: (field.rebuild_annotation(), field_like(model, name)) for name, field in model.model_fields.items()}


def field_like(model: type[BaseModel], name: str) -> Any:
    """A new ``Field`` with the default (or none: required) and the description of ``model``'s field ``name``."""
    declared = model.model_fields[name]
    default = {} if declared.is_required() else {"default": declared.default}
    return Field(description=declared.description, **default)
