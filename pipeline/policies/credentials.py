"""The credential guard: stop a worker whose every call was refused for its key.

A wrong API key turns every call of a million-item backfill into a 401. The
guard stops the worker (and gives its chunks' items ``auth_aborted`` rows) after ``threshold`` refusals, but only while *every*
call so far was refused: one odd 403 among successes is about that item, not
the key. Only refusals the classifier read as bad credentials count
(``pipeline.refusals``), so GitHub's 403 for a spent quota never stops a run.

Once the service has answered a call of this worker, and until it has
accepted one, the guard caps the calls in flight at the refusals it still
allows, so a worker that has been refused never sends more than the check
would have stopped at. Before the first answer it does not cap them: the
pace and the in-flight limit do. Capping there would cost a slow service
its start-up (a 2 s API paced at 18 calls/s per worker sent 5 calls in its
first 2 s, 7 % of a 24 s run), and it buys little: a refusal for credentials
is usually answered before the work is done, as fast as the service can
say no, so a worker with a bad key hears its first refusal after a call or
two. The bound is therefore: refused calls per worker <= the calls it
started before its first answer (at most pace x that answer's latency) +
``threshold``.
"""

from __future__ import annotations

__all__ = ["CredentialGuard"]


class CredentialGuard:
    """Counts a worker's outcomes until the first success. Pure: no clock, no I/O.

    >>> guard = CredentialGuard(threshold=2)
    >>> guard.on_outcome(refused=True), guard.on_outcome(refused=True)
    (False, True)
    """

    __slots__ = ("threshold", "proven", "_calls", "_refused")

    def __init__(self, threshold: int, proven: bool = False):
        self.threshold = threshold
        self.proven = proven  # a worker whose earlier run of this backfill run got through
        self._calls = 0
        self._refused = 0

    def on_outcome(self, refused: bool, ok: bool = False) -> bool:
        """Count one recorded outcome; True when the worker must stop: the credentials are wrong."""
        self._calls += 1
        self._refused += refused
        self.proven = self.proven or ok
        return not self.proven and self._refused == self._calls >= self.threshold

    def slots(self, wanted: int) -> int:
        """Calls that may be in flight: once answered and until proven, no more than the refusals still allowed."""
        if self.proven or not self._calls:
            return wanted
        return max(1, min(wanted, self.threshold - self._refused))

    def __repr__(self) -> str:
        state = "proven" if self.proven else f"{self._refused} of {self._calls} refused"
        return f"<CredentialGuard {state}, stops at {self.threshold}>"
