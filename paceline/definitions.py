"""The Paceline code location: the demo backfills, the services they call, and where manifests go.

Backfills come from two places, side by side in one location: the Python
declarations below, and the YAML ones in ``paceline/defs/`` (component types
``paceline.Service`` and ``paceline.Backfill``; ``dg list defs`` shows them).

UI (with the daemon, so the retry sensor runs)::

    DAGSTER_HOME=$PWD/dagster_home dagster dev -w workspace.yaml

Headless, the first pass (plan, attempt 0, failed items and their checks)::

    DAGSTER_HOME=$PWD/dagster_home dagster job execute -m paceline.definitions -j demo_ids_backfill

It sits at the top of the layers (``paceline`` → ``assets`` → ``resources`` →
``pipeline``), where Dagster looks for ``<root_module>/definitions.py``: the engine
below never imports it, so workers on Burla need no Dagster. The demo calls
the bundled rate-limited HTTP API, which the ``demo_api`` resource starts for
the duration of each run with the declared 200 requests/s as the server's own
limit: no account, no network. Its deliberate faults fail an id on its first
hit; the service remembers those hits in ``data/demo_api_faults.json``, so the
sensor's retry round (a new run, a new service process) heals them. To point
the demo at a service you run yourself, export ``PACELINE_DEMO_API_URL``.
Raise or lower the limit in the launchpad (resources → demo_api →
requests_per_second) without touching this file.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import Definitions, load_from_defs_folder

from assets import paceline_definitions
from pipeline.items import Values
from pipeline.limits import Estimates
from pipeline.spec import BackfillSpec
from pipeline.workloads.demos import DEMO_LIMITS, DEMO_SPECS
from pipeline.workloads.http_api import http_work
from resources import ManifestStoreResource, ServiceResource

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_ITEMS = 3000

demo_ids = BackfillSpec(
    name="demo_ids",
    service="demo_api",
    items=Values.of(range(1, DEMO_ITEMS + 1)),
    work=http_work("{base}/items/{id}"),
    estimates=Estimates(seconds_per_call=0.05, target_chunk_seconds=5),
    description=f"GET /items/{{id}} for {DEMO_ITEMS:,} ids from the bundled demo API.",
)

demo_api = ServiceResource(
    name="demo_api",
    requests_per_second=200,
    url=os.environ.get("PACELINE_DEMO_API_URL", ""),
    embedded="http_api",
    demo_faults=0.03,
    embedded_state_file=str(PROJECT_ROOT / "data" / "demo_api_faults.json"),
)

# One demo per built-in workload (HTTP API, batches, scraping, S3 -> Postgres, key ranges, LLM),
# each against a bundled local service that enforces the limit declared in DEMO_LIMITS.
workload_demo_services = [ServiceResource.from_limit(limit, embedded="demo") for limit in DEMO_LIMITS.values()]

# The YAML backfills use this location's manifest store and executor, declared here in Python.
defs = Definitions.merge(
    paceline_definitions(
        backfills=[demo_ids, *DEMO_SPECS],
        services=[demo_api, *workload_demo_services],
        store=ManifestStoreResource(root=str(PROJECT_ROOT / "data")),
    ),
    load_from_defs_folder(path_within_project=PROJECT_ROOT),
)
