"""Dagster resources: a service's limit, the executor, the manifest store."""

from resources.execution import ExecutorResource, ManifestStoreResource
from resources.launchpad import overridable
from resources.service import ServiceResource

__all__ = ["ExecutorResource", "ManifestStoreResource", "ServiceResource", "overridable"]
