"""The throttle policy: what one worker does when the service says "slow down".

A throttle raises three questions, and a wrong answer to any of them costs
either the service's patience or the run's speed:

* **Whose fault is it?** A refusal about the service (a spent quota, a global
  limit, throttles coming a few calls apart) means this worker is too fast:
  its pace is cut (``Aimd``). A refusal about one item (a locked record, a
  hot key) while other calls pass must not slow the worker: 0.5% of such
  items cut a run to 0.78 of its target when each one cut the pace. Where the
  service says which (``Failure.scope``, from ``pipeline.refusals``), that
  decides. Otherwise the evidence does: a throttle within ``ISOLATED_AFTER``
  calls of the last one is about the pace, and cuts at once; an isolated one
  is given the benefit of the doubt, and its item's retry settles it. Refused
  again, the item was hot and the pace stays; through, the item was fine all
  along, so the throttle was about the pace, and the cut is made then (one
  for all the doubtful throttles of that moment). A throttle that did cut
  for want of evidence (a worker whose first calls meet a hot item) is
  taken back when its item is refused again after ``ISOLATED_AFTER`` clean
  calls: the item was hot, and the pace was fine. On simulated time
  (``tests/test_policies.py``) this keeps 0.5% hot items from costing more
  than their own retries, while workers at a real limit of 40-70% of their
  ceiling still find it (about 1% of calls refused once converged).
* **When does the item come back?** After the wait the service asked for
  (capped by ``Pacing.max_retry_after_s``), set aside so the worker goes on with
  other items; after ``Pacing.max_throttle_retries`` retries its row is written
  failed-retryable, for the retry round.
* **Does the worker wait too?** Yes when the service said its budget is spent
  (a call now would be refused as well), and when two throttles come in a row.

When the worker has nothing else to do (no chunk left to take), while
throttles are rare (``RARE_THROTTLES``: about items, not the service), an
item whose wait is longer than ``END_OF_CHUNK_WAIT_S`` goes to the retry
round rather than keeping the worker (and, for the last chunks, the attempt)
idle until it is due. Before that, a throttled item waits aside while the
worker goes on with its next chunks; its own chunk is written when it is
done.

    policy = ThrottlePolicy(Pacing(max_throttle_retries=3))
    step = policy.on_throttle(item, tries=1, failure=failure, now=clock())
    ...
    policy.on_success(item, first_try=False, now=clock())   # its retry went through
    # step.defer_until: when the item may be tried again (None: write its row now)
    # step.hold_s: how long the worker itself waits before its next call
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any

from pipeline.outcomes import Failure
from pipeline.pacing.aimd import Aimd
from pipeline.pacing.schedule import Pacing
from pipeline.refusals import SERVICE, Meaning

__all__ = [
    "DEFAULT_WAIT_S",
    "END_OF_CHUNK_WAIT_S",
    "ISOLATED_AFTER",
    "RARE_THROTTLES",
    "Step",
    "ThrottlePolicy",
]

ISOLATED_AFTER = 25
"""First tries that went through since the worker's last throttle for a new throttle, of a scope the service did
not say, to be given the benefit of the doubt. A worker at a real limit below its pace meets throttles a few to a
few tens of its calls apart (more apart the more workers share the limit); hot keys at 0.5% come about 200
apart. Measured on the bundled API (a sliding 60 per 2 s against 3 workers aiming at 45/s): 5 refused 2.4% of
calls and reached 0.89 of the limit, 25 refused 1.3-1.4% and reached 0.91-0.93, as cutting on every throttle
does; random hot keys at 0.5% fall within 25 calls of each other about one time in eight, and then cost one
cut."""

END_OF_CHUNK_WAIT_S = 0.5
"""At a worker's end, a throttled item due later than this goes to the retry round (when throttles are rare, see
``RARE_THROTTLES``). Shorter waits are cheaper to sit out than a retry round's start-up; longer ones would idle
the worker (and the attempt's end) for an item the service singled out."""

RARE_THROTTLES = 0.1
"""Throttles are about items, not the service, while at most this share of first tries was throttled. Then an
item still waiting at a worker's end goes to the retry round. When throttles are common the service is pacing
the whole run, the items are not at fault, and sending them to the round would only spend attempts: the worker
waits as the service asked."""

DEFAULT_WAIT_S = 1.0
"""The wait after a throttle that named none (RFC 6585 leaves Retry-After optional): one common window."""


@dataclass(frozen=True)
class Step:
    """What to do after one throttle: ``defer_until`` (monotonic time; None: record the row now) and ``hold_s``."""

    defer_until: float | None
    hold_s: float = 0.0


class ThrottlePolicy:
    """One worker's throttle handling: the AIMD factor, the evidence, and the items set aside.

    Pure: it is handed ``now`` and reads no clock. Items are opaque to it.
    """

    __slots__ = (
        "_pacing",
        "aimd",
        "_clean_calls",
        "_first_tries",
        "_first_throttles",
        "_in_a_row",
        "_quiet_until",
        "_suspects",
        "_cut_by",
        "_deferred",
        "_order",
    )

    def __init__(self, pacing: Pacing, factor: float = 1.0):
        self._pacing = pacing
        self.aimd = Aimd(factor)
        self._clean_calls = 0  # first tries through since the last throttle: a fresh worker has no evidence yet
        self._first_tries = 0  # first tries settled, and how many of them were throttled (``RARE_THROTTLES``)
        self._first_throttles = 0
        self._in_a_row = False
        self._quiet_until = -1.0  # one cut per refusal episode: not again until the wait it asked is over
        self._suspects: set[int] = set()  # items whose throttle did not cut: their retry tells whose fault it was
        self._cut_by: int | None = None  # the item whose throttle made the last cut, until its retry settles it
        self._deferred: list[tuple[float, int, Any]] = []  # (due at, tie-breaker, item): a heap
        self._order = itertools.count()

    @property
    def factor(self) -> float:
        """The fraction of its planned ceiling the worker runs at now."""
        return self.aimd.factor

    def on_success(self, item: Any, first_try: bool, now: float) -> bool:
        """A call went through: evidence that the pace is fine, and a probe back up. True if the factor moved.

        An item whose throttle was given the benefit of the doubt and now goes
        through was fine all along: that throttle was about the pace after all,
        and the cut it did not make is made now.
        """
        self._in_a_row = False
        self._clean_calls += first_try
        self._first_tries += first_try
        if not first_try and id(item) in self._suspects:
            self._suspects.clear()  # the other throttles of that moment are the same episode: one cut for all
            if now >= self._quiet_until:
                self.aimd.on_throttle()
                return True
        if self.aimd.factor < 1.0:
            self.aimd.on_success()
            return True
        return False

    def on_other_failure(self) -> None:
        """A failure that is not a throttle breaks a run of throttles."""
        self._in_a_row = False

    def on_throttle(self, item: Any, tries: int, failure: Failure, now: float) -> Step:
        """Decide for one throttled call of ``item`` (its ``tries``-th)."""
        in_a_row, self._in_a_row = self._in_a_row, True
        if tries > 1:
            self._suspects.discard(id(item))  # refused again while others went through: a hot item, proven
            if id(item) == self._cut_by and self._clean_calls >= ISOLATED_AFTER:
                self.aimd.undo_throttle()  # it cut the pace (no evidence yet), but was hot: the cut was wrong
                self._cut_by = None
        wait = min(
            DEFAULT_WAIT_S if failure.retry_after is None else failure.retry_after, self._pacing.max_retry_after_s
        )
        about_service = self._about_service(failure, tries)
        if tries == 1:
            self._clean_calls = 0
            self._first_tries += 1
            self._first_throttles += 1
        hold = wait if self._service_said_wait(failure) or (failure.scope is None and in_a_row) else 0.0
        if about_service and now >= self._quiet_until:
            self.aimd.on_throttle()
            self._suspects.clear()
            self._cut_by = id(item) if tries == 1 and failure.scope is None else None
            if hold:  # the calls already out when the worker stopped will be refused too: one cut for all
                self._quiet_until = now + wait
        elif failure.scope is None and tries == 1 and not about_service:
            self._suspects.add(id(item))
        if tries > self._pacing.max_throttle_retries:
            return Step(None, hold)
        heapq.heappush(self._deferred, (now + wait, next(self._order), item))
        return Step(now + wait, hold)

    @staticmethod
    def _service_said_wait(failure: Failure) -> bool:
        """The service said its whole budget is spent: a call before the wait is over would be refused too."""
        return failure.scope == SERVICE or failure.meaning is Meaning.QUOTA_SPENT

    def _about_service(self, failure: Failure, tries: int) -> bool:
        if failure.scope is not None:
            return failure.scope == SERVICE
        if failure.meaning is Meaning.QUOTA_SPENT:
            return True
        # A second throttle while a doubtful one still waits for its retry: two in one wait is the pace.
        return tries == 1 and (self._clean_calls < ISOLATED_AFTER or bool(self._suspects))

    # -- the items set aside -------------------------------------------------------------------

    def due(self, now: float) -> Any | None:
        """The item set aside longest whose wait is over, or None."""
        if self._deferred and self._deferred[0][0] <= now:
            return heapq.heappop(self._deferred)[2]
        return None

    def next_due(self) -> float | None:
        """When the first item set aside may be tried again (None: nothing is set aside)."""
        return self._deferred[0][0] if self._deferred else None

    def leave_to_retry_round(self, now: float) -> list[Any]:
        """At the worker's end: take back the items the retry round should have (their rows are written then).

        Only while throttles are rare (about items): those not due within ``END_OF_CHUNK_WAIT_S``.
        """
        if self._first_throttles > RARE_THROTTLES * self._first_tries:
            return []
        keep = [entry for entry in self._deferred if entry[0] <= now + END_OF_CHUNK_WAIT_S]
        left = [entry[2] for entry in self._deferred if entry[0] > now + END_OF_CHUNK_WAIT_S]
        heapq.heapify(keep)
        self._deferred = keep
        return left

    def take_all(self) -> list[Any]:
        """Every item still set aside (the worker gives its chunks up)."""
        items = [entry[2] for entry in self._deferred]
        self._deferred.clear()
        return items

    def __len__(self) -> int:
        return len(self._deferred)

    def __repr__(self) -> str:
        return f"<ThrottlePolicy factor {self.aimd.factor:.3f}, {len(self._deferred)} set aside>"
