"""One worker's schedule: when its next call may start.

The plan fixes a ceiling for every worker (``Pacing``), so that workers x
ceiling <= limit x safety holds by construction, with no coordination. The
``Pacer`` turns that ceiling into start times. It is a virtual clock that each
call pushes forward: a call may start once the clock allows it, and then moves
the clock by the larger of the request spacing and its token cost at the
worker's token rate. Reconciling with the usage a response reports moves it
again, so a wrong token estimate is paid back on the next call instead of
accumulating.

Everything the feedback loops change (how many calls are in flight, what a
call is charged) stays *under* this ceiling: the pacer is the one place where
the limit is enforced, and it never schedules faster than the plan allows.

    pacer = Pacer(Pacing(min_interval_s=0.1))
    pacer.before_call()    # sleeps until the schedule allows a call
    ...                    # the call
    pacer.after_call()     # a politeness window counts from returns
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.pacing.headers import ServiceSignal

DEFAULT_SECONDS_PER_CALL = 0.05
"""A call's latency when nothing better is known: the starting point of the in-flight loop."""

DEFAULT_MAX_IN_FLIGHT = 64
"""Calls one worker may keep in flight on one client.

64 covers a service 40x slower than estimated (a 2 s LLM call planned as 50 ms)
and stays under httpx's default pool of 100 connections, so calls never queue
inside the client, where their latency would be counted as the service's.
Beyond it, the plan needs more workers: declare ``seconds_per_call``.
"""


@dataclass(frozen=True)
class Pacing:
    """How one worker spaces its calls. Travels to the worker inside each chunk (all chunks of a run share it).

    ``min_interval_s``, ``tokens_per_second`` and the politeness window are the
    ceiling, fixed by the plan. ``seconds_per_call`` and ``tokens_per_call`` are
    only starting points, replaced by what the worker measures. ``max_in_flight``
    is 1 where the limit counts connections or batches in flight, or where a
    per-worker politeness means one connection.
    """

    min_interval_s: float = 0.0
    jitter_s: float = 0.0
    tokens_per_second: float | None = None
    window_calls: int = 0  # politeness: at most this many calls ...
    window_s: float = 0.0  # ... between the end of one and the start of the last (0 = off)
    seconds_per_call: float = DEFAULT_SECONDS_PER_CALL
    tokens_per_call: float | None = None
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    workers: int = 1  # how many workers share the limit: a worker's share of a quota the service reports
    max_throttle_retries: int = 3
    max_retry_after_s: float = 60.0
    auth_fail_fast: int = 5

    def period(self, tokens_per_call: float | None = None) -> float:
        """Seconds between two calls at the ceiling (0 when nothing paces this worker)."""
        tokens = tokens_per_call or self.tokens_per_call or 0.0
        by_tokens = tokens / self.tokens_per_second if self.tokens_per_second else 0.0
        return max(self.min_interval_s, by_tokens)


class Pacer:
    """One worker's schedule on an injectable clock (tests run it on simulated time)."""

    __slots__ = (
        "_pacing",
        "_clock",
        "_sleep",
        "_random",
        "_held_until",
        "_spaced_until",
        "_tokens_until",
        "_unpaced",
        "_returns",
        "_factor",
        "_share",
        "_scale",
        "_floor_s",
        "_floor_until",
        "_last_start",
    )

    def __init__(
        self,
        pacing: Pacing,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self._pacing = pacing
        self._clock = clock
        self._sleep = sleep
        self._random = rng or random.Random()
        self._held_until = clock()  # a wait asked for: the staggered start, a Retry-After, a spent quota
        self._spaced_until = self._held_until  # the request spacing after the last start
        self._tokens_until = self._held_until  # the token clock: the last start plus what its calls cost
        self._unpaced = not (pacing.min_interval_s or pacing.jitter_s or pacing.tokens_per_second)
        self._returns = deque(maxlen=pacing.window_calls) if pacing.window_calls else None
        self._factor = 1.0  # the throttle loop's fraction of the ceiling (see aimd.py); never above 1
        self._share = 1.0  # the fraction of the ceiling the budget's leases allow (see pipeline/shares.py)
        self._scale = 1.0  # the two together: what every spacing is divided by
        self._floor_s = 0.0  # spacing a service's quota headers asked for, ...
        self._floor_until = 0.0  # ... until the quota resets
        self._last_start = -math.inf

    @property
    def unpaced(self) -> bool:
        """Nothing paces this worker now: no rate, no politeness, no tokens, no wait pending."""
        return self._unpaced

    def start_after(self, seconds: float) -> None:
        """Delay the first call (staggered start-up: see ``limits.start_delays``)."""
        if seconds > 0:
            self._unpaced = False
            self._held_until = max(self._held_until, self._clock() + seconds)

    def before_call(self, estimated_tokens: float = 0.0) -> None:
        """Sleep until the schedule allows a call, then charge that call to the schedule."""
        if self._unpaced:
            return  # nothing to pace: no rate, no politeness, no tokens, no Retry-After pending
        now = self._clock()
        ready = self._next_start()
        if ready > now:
            self._sleep(ready - now)
            now = self._clock()  # sleep can overshoot; space the next call from the real start
        spacing = self._pacing.min_interval_s / self._scale
        if self._floor_until > now:
            spacing = max(spacing, self._floor_s)
        if self._pacing.jitter_s:
            spacing += self._random.uniform(0, self._pacing.jitter_s)
        self._spaced_until = now + spacing
        self._last_start = now
        self._tokens_until = now + self._token_seconds(estimated_tokens)

    def wait_s(self) -> float:
        """Seconds until the schedule allows the next call (0: now)."""
        if self._unpaced:
            return 0.0
        return max(0.0, self._next_start() - self._clock())

    def after_call(self) -> None:
        """Note when a call returned (politeness windows count from returns, see ``Pacing``)."""
        if self._returns is not None:
            self._returns.append(self._clock())

    def reconcile(self, estimated_tokens: float, actual_tokens: float) -> None:
        """Pay back (or charge) the estimate's error on the token clock.

        Only the token clock moves: the request spacing and any wait asked
        for stay. A refund may take the token clock back past the last start
        (two over-charged calls returned within one interval), and the next
        call may then start as soon as the spacing allows; the clock never
        banks time before that start (``before_call`` restarts it from
        ``now``), so tokens started over any window stay within the rate x
        the window plus one call's charge. Clamping refunds at the last
        start instead lost 10 % of the rate when estimates were 2x high.
        """
        self._tokens_until += self._token_seconds(actual_tokens) - self._token_seconds(estimated_tokens)

    def hold(self, seconds: float) -> None:
        """Wait at least ``seconds`` before the next call (Retry-After)."""
        self._unpaced = False
        self._held_until = max(self._held_until, self._clock() + seconds)

    def slow_to(self, factor: float) -> None:
        """Run at ``factor`` (0 < factor <= 1) of the planned ceiling: the throttle loop's lever."""
        self._factor = min(1.0, max(factor, 1e-3))
        self._rescale()

    def share(self, fraction: float, phase_s: float = 0.0) -> None:
        """Run at ``fraction`` (0 < fraction <= 1) of the ceiling: this backfill's share of a budget it shares.

        A smaller share holds from the very next call: the spacing already
        promised at the last start is stretched to the new one, so no call
        goes out at the old pace once the worker has heard of a newcomer.
        ``phase_s`` is the worker's place in the staggered start (its delay
        at the whole ceiling): a smaller share moves it as much as the period
        grew, so the workers' calls stay spread over the longer period instead
        of bunched in the part of it the old one covered.
        """
        before, share_before = self._scale, self._share
        self._share = min(1.0, max(fraction, 1e-3))
        self._rescale()
        if self._scale < before and self._last_start > -math.inf:
            shift = phase_s * (1 / self._share - 1 / share_before)
            spaced = self._last_start + self._pacing.min_interval_s / self._scale + shift
            self._spaced_until = max(self._spaced_until, spaced)
            self._tokens_until = self._last_start + (self._tokens_until - self._last_start) * before / self._scale

    def _rescale(self) -> None:
        self._scale = self._factor * self._share
        if self._scale < 1.0:
            self._unpaced = False

    def heed(self, signal: ServiceSignal, tokens_per_call: float | None) -> None:
        """Slow down *before* a quota runs out, as the service's rate-limit headers say it will.

        The worker spreads its share (1 / workers) of what remains over the
        time until the quota resets; a spent quota means waiting for the reset.
        A header can only lower the pace: the spacing it asks for is a floor
        under the planned one, never a replacement for it.
        """
        now = self._clock()
        floor = 0.0
        for quota, per_call in ((signal.requests, 1.0), (signal.tokens, tokens_per_call)):
            if not per_call or quota.reset_s is None or quota.remaining is None:
                continue
            if quota.exhausted:
                self.hold(quota.reset_s)
            elif quota.rate:
                floor = max(floor, per_call * self._pacing.workers / quota.rate)
                self._floor_until = now + quota.reset_s
        if floor:
            self._unpaced = False
            self._floor_s = floor
            self._spaced_until = max(self._spaced_until, self._last_start + floor)

    def finish(self) -> None:
        """Keep the slot until the schedule allows another call.

        Without this, a worker that ends right after a call would let the next
        worker on the same slot (a thread, a Burla node) call at once: two calls
        inside one interval.
        """
        remaining = self._next_start() - self._clock()
        if remaining > 0:
            self._sleep(remaining)

    def spacing(self) -> float:
        """The least time between two call starts of this worker right now (requests only, no tokens)."""
        floor = self._floor_s if self._floor_until > self._clock() else 0.0
        return max(self._pacing.min_interval_s / self._scale, floor)

    def calls_per_second(self, tokens_per_call: float | None) -> float | None:
        """The pace this schedule allows now, or None when it does not pace at all."""
        period = self._pacing.period(tokens_per_call) / self._scale
        return 1 / period if period > 0 else None

    def _next_start(self) -> float:
        """The earliest the next call may start: every wait, spacing, token debt and politeness window honoured."""
        ready = max(self._held_until, self._spaced_until, self._tokens_until)
        if self._returns is not None and len(self._returns) == self._returns.maxlen:
            ready = max(ready, self._returns[0] + self._pacing.window_s)
        return ready

    def _token_seconds(self, tokens: float) -> float:
        rate = self._pacing.tokens_per_second
        return tokens / (rate * self._scale) if rate and tokens else 0.0

    def __repr__(self) -> str:
        ahead = self._next_start() - self._clock()
        return (
            f"<Pacer every {self._pacing.period() / self._scale:.4g} s "
            f"(factor {self._factor:.3f}, share {self._share:.3f}), "
            f"next call in {max(0.0, ahead):.3g} s>"
        )
