"""The engine's defaults, each declared once with its reason.

Every layer that shows a default (the dataclasses' signatures, the Dagster
resources, the YAML components) reads it from here, so changing one is one
edit. The pacer's own starting points (``DEFAULT_SECONDS_PER_CALL``,
``DEFAULT_MAX_IN_FLIGHT``) live with it in ``pipeline/pacing/schedule.py``,
which imports nothing from the rest of the engine.
"""

from __future__ import annotations

DEFAULT_SAFETY = 0.5
"""A first run aims at half the declared limit: the declared number is often optimistic, the limit may be
shared with other clients, and a clean run at half is cheap to raise (``paceline advise`` says by how much)."""

DEFAULT_JITTER_S = 0.0
"""No random extra wait between one worker's calls unless asked: spacing alone keeps every worker under its
ceiling, and jitter only costs throughput. A polite scraper may set it so its calls are not a metronome."""

DEFAULT_MAX_ATTEMPTS = 3
"""Attempt 0 and two retry rounds: enough for failures that heal (timeouts, a service restarting), few
enough that an item which fails for a reason of its own is declared dead the same day."""

DEFAULT_TARGET_CHUNK_SECONDS = 60.0
"""A chunk lasts about a minute: long enough that one client per chunk and one manifest file per chunk
cost little, short enough that a lost worker or a stopped run loses at most a minute of work."""

DEFAULT_MAX_THROTTLE_RETRIES = 3
"""429/503 answers one item may get inside a chunk before it is left for the next round: a throttle usually
clears within a few waits, and one that does not is better retried later than waited on now."""

DEFAULT_MAX_RETRY_AFTER_S = 60.0
"""The longest wait one Retry-After can impose inside a chunk: a longer one is cut to this, so a single
answer cannot park a worker (and its share of the limit) for an hour; the throttle retries still bound the item."""

DEFAULT_SHARE = 1.0
"""Backfills that run at once against one service split its budget equally unless told otherwise: a weight of
one each. A nightly that should keep most of it while ad-hoc reprocessing runs beside it sets share=3."""
