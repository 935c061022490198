"""Bundled local services: real HTTP servers that enforce real limits.

The quick-start demo and the test suite point Paceline at these instead of
someone else's production API. Each runs in its own subprocess, enforces its
limits itself and logs every arrival server-side, so "the job stayed under the
limit" is judged by the service, never by the client's own bookkeeping.

    with start_http_api(rps=50, demo_faults=0.03) as api:
        ...  # hit api.url
        assert api.stats()["busiest_1s"] <= 50

See ``http_api`` (JSON API, batch endpoint, website, fault prefixes, and
providers' limit dialects: ``start_http_api(dialect="github", quota=60,
quota_window_s=2)``, ``"discord"``, ``"shopify"``) and ``llm`` (OpenAI-compatible
chat completions with tokens/min and requests/min, and a prepaid credit:
``start_llm(credit_tokens=5000)``).
"""

from pipeline.localservices._common import ServiceHandle, start_http_api, start_llm

__all__ = ["ServiceHandle", "start_http_api", "start_llm"]
