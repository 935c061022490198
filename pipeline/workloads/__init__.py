"""Built-in workloads: a ``Work`` (connect once per chunk, call once per item) for each kind of limit.

=====================  =====================================  ==========================
workload               items                                  paced by (declare this)
=====================  =====================================  ==========================
``HttpWork``           ids / records (any source)             requests/s or /min
``HttpBatchWork``      ``Batches(source, batch_size)``        concurrent_batches
``ScrapeWork``         URLs (``ByDomain(source)``)            per-worker rate, max_workers
``S3ToPostgresWork``   keys (``S3Prefix``)                    safe_connections
``KeyRangeWork``       ``KeyRanges(lo, hi, step)``            safe_connections
``LlmWork``            prompt records (``JsonlPrompts``)      tokens/min and requests/min
=====================  =====================================  ==========================

Each has a factory (``http_work``, ``http_batch_work``, ``scrape_work``,
``s3_postgres_work``, ``key_range_work``, ``llm_work``) usable as
``BackfillSpec.work``: it takes the configured ``Service`` (limit, URL,
secret) and returns the work, validated before any call. ``demos`` holds a
demo backfill of each against the bundled local services.
"""

from pipeline.workloads.common import MissingSecretError, WorkloadConfigError, token_from_env
from pipeline.workloads.http_api import Batches, HttpBatchWork, HttpWork, http_batch_work, http_work
from pipeline.workloads.key_ranges import KeyRangeWork, key_range_work
from pipeline.workloads.llm import LlmWork, llm_work
from pipeline.workloads.s3_postgres import S3ToPostgresWork, gzip_jsonl, s3_postgres_work
from pipeline.workloads.scrape import ByDomain, ScrapeWork, scrape_work

__all__ = [
    "Batches",
    "ByDomain",
    "HttpBatchWork",
    "HttpWork",
    "KeyRangeWork",
    "LlmWork",
    "MissingSecretError",
    "S3ToPostgresWork",
    "ScrapeWork",
    "WorkloadConfigError",
    "gzip_jsonl",
    "http_batch_work",
    "http_work",
    "key_range_work",
    "llm_work",
    "s3_postgres_work",
    "scrape_work",
    "token_from_env",
]
