"""Where chunks run and where manifests go, as Dagster resources.

Thin on purpose: configuration in, plain engine objects out, so the assets
stay the same whether chunks run in local threads or on a Burla cluster and
whether manifests land in a folder or in S3.
"""

from __future__ import annotations

import dataclasses

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field

from pipeline.errors import ConfigError
from pipeline.executors import BurlaExecutor, Executor, LocalExecutor
from pipeline.limits import Overrides
from pipeline.manifests import ManifestStore

EXECUTOR_KINDS = ("local", "burla")


class ExecutorResource(ConfigurableResource):
    """Local threads (the default) or Burla, and an optional max_parallelism pin.

    The pin goes through the engine's admission check like any override: a
    value the declared limit cannot carry is refused, never silently lowered.
    """

    kind: str = Field(default="local", description="'local' (threads in the step) or 'burla'.")
    func_cpu: int = Field(default=BurlaExecutor.func_cpu, description="Burla: CPUs per worker.")
    func_ram: int = Field(default=BurlaExecutor.func_ram, description="Burla: GB of RAM per worker.")
    grow: bool = Field(default=BurlaExecutor.grow, description="Burla: let the cluster add nodes.")
    image: str = Field(default="", description="Burla: container image; empty uses the cluster default.")
    chunks_per_call: int = Field(
        default=BurlaExecutor.chunks_per_call,
        description="Burla: chunks one call runs back to back (a lost node loses at most this many unwritten).",
    )
    max_parallelism: int | None = Field(
        default=None,
        description="Pin live workers for every backfill instead of deriving them from the limit (still admitted).",
    )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        """A misspelt kind fails when the run starts, before the plan is even read."""
        self._check_kind()

    def executor(self) -> Executor:
        self._check_kind()
        if self.kind == "burla":
            return BurlaExecutor(
                func_cpu=self.func_cpu,
                func_ram=self.func_ram,
                grow=self.grow,
                image=self.image or None,
                chunks_per_call=self.chunks_per_call,
            )
        return LocalExecutor()

    def _check_kind(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            raise ConfigError(
                f"executor kind {self.kind!r} is not known: set kind to one of {', '.join(EXECUTOR_KINDS)}."
            )

    def overrides(self, declared: Overrides) -> Overrides:
        """The backfill's own overrides, with this resource's max_parallelism pin if set."""
        if self.max_parallelism is None:
            return declared
        return dataclasses.replace(declared, max_parallelism=self.max_parallelism)


class ManifestStoreResource(ConfigurableResource):
    """A folder (relative to the working directory) or an ``s3://bucket/prefix`` URI."""

    root: str = Field(
        default="data",
        description="Folder (relative to the working directory) or s3://bucket/prefix for plans and manifests.",
    )
    s3_endpoint_url: str = Field(
        default="", description="S3-compatible endpoint (MinIO, moto) for an s3:// root; empty for AWS."
    )

    def store(self) -> ManifestStore:
        return ManifestStore(self.root, self.s3_endpoint_url or None)
