"""Paceline's Dagster component types, for backfills declared in YAML (``type: paceline.Backfill``).

Registered with ``dg`` through the ``dagster_dg_cli.registry_modules`` entry
point, so ``dg list components`` shows them and ``dg check yaml`` knows their
schema. The project's own YAML backfills live in ``paceline/defs/``.
"""

from paceline.components import Backfill, Runtime, Service

__all__ = ["Backfill", "Runtime", "Service"]
