"""The chunk runner: the code a worker executes, locally or on Burla.

It holds the promises that matter most, so it is small and paranoid:

* pace before every call (spacing, jitter, tokens), so N workers x one
  worker's rate never exceeds the target, whatever the other workers do;
* keep as many calls in flight as that pace needs at the latency measured
  (``pacing.inflight``), so a slow service still gets its target rate, and
  take the next chunk as soon as the current one's last call is sent, so a
  worker never idles while a chunk's last calls are out;
* charge the token budget what calls really cost (``pacing.cost``);
* read what every refusal meant once (``refusals``, through
  ``outcomes.classify``) and hand that verdict to the policies: a throttled
  item waits its turn aside while the worker goes on, and slows the worker
  only when the throttle was about its pace (``policies.throttle``);
* replace a client that broke mid-run, and wait for room when a database
  refuses a login (``connection``), instead of failing the chunks' items;
* give every item exactly one row, whatever happens, including a failing
  ``connect()`` and a runner that dies half-way;
* stop early when the first calls all fail for their credentials
  (``policies.credentials``), instead of recording a million 401s, and at
  once when the account is out of credit.

Nothing here imports Dagster; everything here pickles with cloudpickle.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from pipeline.chunks import Chunk, ChunkResult, ChunkWorker, fill_failed
from pipeline.connection import ChunkClient, ConnectionLost
from pipeline.leases import ShareTicket, ShareWatch, Watches
from pipeline.outcomes import CallAgain, Failure, Permanent, classify, redact, scrub
from pipeline.pacing.cost import TokenCost
from pipeline.pacing.headers import ServiceSignal
from pipeline.pacing.inflight import InFlightLimit
from pipeline.pacing.listen import Listener
from pipeline.pacing.memory import Learned, WorkerMemory
from pipeline.pacing.schedule import Pacer, Pacing
from pipeline.policies.credentials import CredentialGuard
from pipeline.policies.throttle import ThrottlePolicy
from pipeline.work import Item, Work, WorkHooks

MIN_LOOK_S = 0.005
"""Shortest wait before a worker with every slot taken looks again whether more may open (a fast pace's spacing
would otherwise make it spin)."""


def make_chunk_function(work: Work) -> PacedWorker:
    """What executors run: a worker (``chunks.ChunkWorker``) that carries the work, and its workers' memories, by value."""
    return PacedWorker(work)


class PacedWorker(ChunkWorker):
    """The runner as a worker: each ``run`` is one worker taking chunks one after another (``_WorkerLoop``).

    Each run takes a worker memory no other running worker holds, and gives
    it back when it ends: the next run starts from what the last one learned.
    An executor that loads the worker once per machine (Burla) gives each of
    its calls the memory of the one before; one that runs it from several
    threads (the local executor) gets one memory per live worker, never
    shared by two.
    """

    def __init__(self, work: Work):
        self.work = work
        self._idle: list[WorkerMemory] = []  # list.pop and list.append are atomic: no lock on a worker's path
        self._watches = Watches()  # one reader of the leases per process, whatever the workers it runs

    def run(self, chunks: Iterator[Chunk], emit: Callable[[ChunkResult], None]) -> None:
        try:
            memory = self._idle.pop()
        except IndexError:
            memory = WorkerMemory()
        try:
            run_worker(self.work, chunks, emit, memory, watches=self._watches)
        finally:
            self._idle.append(memory)


def run_chunk(work: Work, chunk: Chunk, memory: WorkerMemory | None = None) -> ChunkResult:
    """A worker given one chunk: exactly one row per item; ``memory`` is the worker's, kept for its next chunk."""
    results: list[ChunkResult] = []
    run_worker(work, iter((chunk,)), results.append, memory or WorkerMemory())
    return results[0]


def run_worker(
    work: Work,
    chunks: Iterator[Chunk],
    emit: Callable[[ChunkResult], None],
    memory: WorkerMemory,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    watches: Watches | None = None,
) -> None:
    """One worker over ``chunks`` (one run and pacing: one executor map); each result goes to ``emit`` when whole.

    ``watches`` are the lease watches this worker shares with the others of its process.
    """
    first = next(chunks, None)
    if first is None:
        return
    loop = _WorkerLoop(
        work, WorkHooks.of(work), first.pacing, memory.of_run(first.run_id), emit, clock, sleep, first.share, watches
    )
    loop.run(itertools.chain((first,), chunks))


class _Held:
    """A chunk the worker has taken and not yet handed over: its result so far, and how many rows make it whole."""

    __slots__ = ("chunk", "result", "size", "emitted")

    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self.result = ChunkResult(chunk.backfill, chunk.attempt, chunk.run_id, chunk.chunk_id)
        self.size = len(chunk.item_ids)
        self.emitted = False


class _Try:
    """One item on its way through the worker: its chunk, its estimate, its tries so far, its last throttle."""

    __slots__ = ("item", "estimate", "owner", "charge", "tries", "retry_after", "failure")

    def __init__(self, item: Item, estimate: float | None, owner: _Held):
        self.item = item
        self.estimate = estimate
        self.owner = owner
        self.charge = 0.0
        self.tries = 0
        self.retry_after: float | None = None
        self.failure: Failure | None = None  # its last throttle, recorded if it never goes through


class _Outcome(NamedTuple):
    """What a call hands back to the dispatcher."""

    attempt: _Try
    value: Any
    error: Exception | None
    started: float
    finished: float
    heard: ServiceSignal | None  # what the service said in its headers (``pacing.listen``)


_encode_json = json.JSONEncoder(default=str).encode


def _timed_call(call: Callable[[Any, Item], Any], client: Any, attempt: _Try, listener: Listener | None) -> _Outcome:
    """Run one call and time it: the same function inline and on the worker's call threads.

    ``listener``: the one hooked on this client, whose headers the outcome carries (None: not httpx).
    """
    started = time.time()
    try:
        value = call(client, attempt.item)
    except Exception as error:  # noqa: BLE001 - every failure becomes a row
        return _Outcome(attempt, None, error, started, time.time(), listener and listener.take())
    return _Outcome(attempt, value, None, started, time.time(), listener and listener.take())


class _WorkerLoop:
    """One worker's dispatcher: picks the next item, paces it, calls it, hands what came back to its policies.

    The pace, the in-flight budget, the policies, what the service said and
    the client belong to the worker, not to a chunk: when the worker has sent
    its chunk's last call it takes the next chunk at once, while the last
    calls are still out, so a slow service does not leave it idle at every
    chunk boundary. The ceiling is unchanged (one pacer per worker), and so
    is the connection count (one client per worker). Each chunk is handed to
    ``emit`` the moment its last item has a row, so each is still its own
    manifest and checkpoint.

    All bookkeeping (rows, the pacer, the policies) happens on this one
    thread; call threads only run ``work.call`` and hand back an outcome. With
    one slot (the usual case for a fast service, and always for connections)
    calls run inline, with no thread hop at all. What a failure means is read
    once (``outcomes.classify``, through ``pipeline.refusals``), and the
    throttle policy, the credential guard and the reconnect policy act on that
    one reading.
    """

    def __init__(
        self,
        work: Work,
        hooks: WorkHooks,
        pacing: Pacing,
        memory: WorkerMemory,
        emit: Callable[[ChunkResult], None],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        share: ShareTicket | None = None,
        watches: Watches | None = None,
    ):
        self._pacing, self._memory, self._emit = pacing, memory, emit
        self._share, self._watches, self._shares = share, watches or Watches(), None
        self._stagger = 0.0  # this worker's place in the staggered start, kept for a start after a wait for its share
        self._secrets = hooks.secrets
        self._clock, self._sleep = clock, sleep
        self._call = work.call
        self._cost_fn = hooks.cost
        self._usage_fn = hooks.usage
        self._conventions = hooks.conventions
        learned = memory.learned
        self.pacer = Pacer(pacing, clock, sleep)
        latency = learned.latency_s if learned else pacing.seconds_per_call
        self.slots = InFlightLimit(_slot_cap(hooks, pacing), latency)
        self.cost = TokenCost(
            learned.tokens_per_call if learned and learned.tokens_per_call else pacing.tokens_per_call
        )
        self._counts_returns = bool(pacing.window_calls)  # politeness windows count from returns
        self._charges_tokens = bool(pacing.tokens_per_second or self._cost_fn or self._usage_fn)
        self.throttle = ThrottlePolicy(pacing, learned.pace_factor if learned else 1.0)
        self.credentials = CredentialGuard(pacing.auth_fail_fast, proven=learned is not None)
        self.pacer.slow_to(self.throttle.factor)
        self._connection = ChunkClient(work, sleep, memory=memory, hooks=hooks, clock=clock)
        self._connected = False
        self._listener = Listener()
        self._heard_by: Listener | None = None
        self._chunks: Iterator[Chunk] = iter(())
        self._taken = 0
        self._held: list[_Held] = []  # taken, not yet emitted: one while the worker is busy, two or more at a boundary
        self._current: _Held | None = None  # the chunk whose items are being handed out
        self._fresh: deque[Item] = deque()  # the current chunk's items not yet tried
        self._again: deque[_Try] = deque()  # items of earlier chunks whose call asked to go again (``CallAgain``)
        self._done: queue.SimpleQueue[_Outcome | BaseException] = queue.SimpleQueue()
        self._pool: ThreadPoolExecutor | None = None
        self._sent: dict[int, float] = {}  # calls on the call threads: id(try) -> when they were handed over
        self._gate = _SendGate()
        self._in_flight = 0
        self._reconnect = False
        self._stopped = False

    def run(self, chunks: Iterator[Chunk]) -> None:
        """Run every chunk of ``chunks``; whatever happens, each chunk taken is emitted with one row per item."""
        self._chunks = chunks
        try:
            if self._share is not None:
                self._shares = self._watches.of(self._share)
            self._loop()
            if self._held:  # a bug, if ever: the rows still say so, and every item has one
                self._give_up(Failure("runner_error", True, "the worker ended without a row for this item"))
        except BaseException as error:  # the runner itself died: record the rest, then let it go
            self._give_up(Failure("runner_error", True, redact(repr(error), self._secrets) or ""))
            if not isinstance(error, Exception):
                raise
        finally:
            self.close()

    def _loop(self) -> None:
        while not self._stopped:
            if not self._fresh and self._take_next():
                continue
            if self._unpaced_and_plain():
                self._run_unpaced()
                continue
            if self._in_flight:
                self._settle_finished()
            if self._reconnect:
                self._replace_client()
                continue
            slots = self._slots()
            if self._in_flight >= slots:
                self._settle_or_look_again(slots)
                continue
            if self._in_flight and self._settle_while_waiting():
                continue
            if self._fresh and not (self.throttle or self._again) and self._cost_fn is None:  # the common case
                attempt = _Try(self._fresh.popleft(), None, self._current)  # type: ignore[arg-type]
            else:
                attempt = self._next_ready()
                if attempt is None:
                    if not self._wait_for_work():
                        break
                    continue
            if self._charges_tokens:
                attempt.charge = self.cost.charge(attempt.estimate)
            if self._shares is not None:
                self._wait_for_share(self._shares)
            self.pacer.before_call(attempt.charge)
            attempt.tries += 1
            self._in_flight += 1
            if slots == 1 and self._in_flight == 1:
                self._settle(_timed_call(self._call, self._connection.client, attempt, self._heard_by))
            else:
                self._submit(attempt)
        if not self._stopped:
            self.pacer.finish()

    def _unpaced_and_plain(self) -> bool:
        """Nothing to pace, count or hear, and nothing set aside: the hot loop can take the next items."""
        return (
            bool(self._fresh)
            and self.pacer.unpaced
            and not (self.throttle or self._again or self._in_flight or self._reconnect or self._charges_tokens)
            and not self._counts_returns
            and self._heard_by is None
            and self._shares is None
        )

    def _run_unpaced(self) -> None:
        """The hot loop, for work nothing paces (a connection-limited load): one call at a time, inline.

        It runs once per item of a million-item backfill, so it calls as few
        functions per item as it can; any failure goes through the general
        path, and anything that makes the worker paced (a Retry-After to wait)
        hands the rest back to the general loop.
        """
        fresh, call, client, succeed = self._fresh, self._call, self._connection.client, self._succeed
        owner: _Held = self._current  # type: ignore[assignment]
        result = owner.result
        while fresh and self.pacer.unpaced and not (self.throttle or self._reconnect or self._stopped):
            item = fresh.popleft()
            started = time.time()
            try:
                value = call(client, item)
            except Exception as error:  # noqa: BLE001 - every failure becomes a row
                attempt = _Try(item, None, owner)
                attempt.tries = 1
                self._fail(attempt, error, started, time.time())
                continue
            succeed(result, item, 1, 0.0, None, value, started, time.time())
        self._finish_if_whole(owner)

    def _slots(self) -> int:
        """Calls that may be in flight now, by Little's law on the latency measured so far.

        Once the service has answered and until it has accepted a call of
        this worker, the credential guard caps them (see ``policies.credentials``).
        """
        if self.slots.cap == 1 or self.pacer.unpaced:
            return 1
        waiting = self._clock() - min(self._sent.values()) if self._sent else 0.0
        return self.credentials.slots(self.slots.limit(self.pacer.calls_per_second(self.cost.per_call), waiting))

    def _settle_or_look_again(self, slots: int) -> None:
        """Every slot is taken: settle the next call back, or look again when a slot may have opened.

        While the oldest call is still out, the latency is at least that long
        (``InFlightLimit.limit``), so a worker whose first answers from a slow
        service are still on their way opens slots as they wait, once a pace
        interval, instead of only when an answer comes back.
        """
        if slots >= self.slots.cap or self.pacer.unpaced:
            self._settle(self._done.get())
            return
        try:
            self._settle(self._done.get(timeout=max(self.pacer.spacing(), MIN_LOOK_S)))
        except queue.Empty:
            return

    def _settle_while_waiting(self) -> bool:
        """The next call must wait: settle what comes back meanwhile. True: the schedule may have moved.

        A call that returns during the wait can move the schedule either way
        (a refund for tokens over-charged, a throttle, a quota header), so
        the worker hears it before its next call rather than after.
        """
        wait = self.pacer.wait_s()
        if wait <= 0:
            return False
        try:
            outcome = self._done.get(timeout=wait)
        except queue.Empty:
            return False  # the wait is over (on an injected clock: the pacer sleeps it)
        self._settle(outcome)
        return True

    def _wait_for_share(self, shares: ShareWatch) -> None:
        """Pace at this backfill's share of a budget it shares with others; while that share is none, wait.

        It is none before the lease is active (every other worker must have
        seen it first), while the last read of the leases is too old to
        vouch for, and once the lease lapsed (``pipeline.shares``).
        """
        waited = False
        while True:
            allowed = shares.fraction()
            if allowed.value > 0:
                self.pacer.share(allowed.value, self._stagger)
                if waited:  # the workers all waited for the same moment: stagger their first calls again
                    self.pacer.start_after(self._stagger / allowed.value)
                return
            waited = True
            self._sleep(min(self._share.timing.reread_s, max(MIN_LOOK_S, allowed.until - time.time())))

    def close(self) -> None:
        """Let go of the call threads (a stopped worker does not wait for calls nobody will read), then the client."""
        if self._pool is not None:
            self._pool.shutdown(wait=not self._stopped and not self._in_flight, cancel_futures=True)
        self._connection.close()

    # -- taking chunks ---------------------------------------------------------------------------

    def _take_next(self) -> bool:
        """Take the worker's next chunk, if there is one. True: the loop has something new to look at."""
        chunk = next(self._chunks, None)
        if chunk is None:
            self._chunks = iter(())  # an exhausted source is not asked again
            return False
        if chunk.pacing != self._pacing or chunk.run_id != self._memory.run_id:
            raise ValueError(f"chunk {chunk.chunk_id} is of another run or pacing than the worker's first chunk")
        held = _Held(chunk)
        self._held.append(held)
        if not self._taken:
            self._stagger = chunk.start_delay_s
            self.pacer.start_after(chunk.start_delay_s)  # the staggered start: only a worker's first chunk
        self._taken += 1
        if held.size and (self._connected or self._connect(held)):
            self._current = held
            self._fresh = deque(chunk.items())
        self._finish_if_whole(held)  # empty, or failed to connect
        return True

    def _connect(self, held: _Held) -> bool:
        """Open the worker's client; when it cannot be opened, every item of ``held`` gets the reason as its row."""
        try:
            client = self._connection.open()
        except ConnectionLost as lost:  # no room in the database for the whole wait budget
            self._fill(held, self._scrubbed(lost.failure))
            return False
        except Exception as error:  # noqa: BLE001 - a connect failure fails the chunk that needed it
            # Retryable (the database was down, the network blipped) unless the work said it is permanent.
            retryable = not isinstance(error, Permanent)
            self._fill(held, Failure("connect_failed", retryable, redact(classify(error).error, self._secrets) or ""))
            return False
        self._connected = True
        self._heard_by = self._listener if self._listener.listen(client) else None
        return True

    def _finish_if_whole(self, held: _Held) -> None:
        """Hand a chunk over the moment its last item has a row (once)."""
        if held.emitted or len(held.result.rows) != held.size:
            return
        held.emitted = True
        self._held.remove(held)
        learned = Learned(self.slots.latency_s, self.cost.per_call, self.throttle.factor)
        self._memory.learned = held.result.learned = learned
        self._emit(held.result)

    def _fill(self, held: _Held, failure: Failure) -> None:
        """Every item of ``held`` without a row gets ``failure`` (none of them was tried)."""
        fill_failed(held.result, held.chunk, failure, set(held.result.item_id))

    # -- choosing the next call --------------------------------------------------------------

    def _next_ready(self) -> _Try | None:
        """An item asked to go again comes first, then a throttled one whose wait is over, else the next fresh one."""
        if self._again:
            return self._again.popleft()
        due = self.throttle.due(self._clock())
        if due is not None:
            return due
        owner: _Held = self._current  # type: ignore[assignment]
        while self._fresh:
            item = self._fresh.popleft()
            try:
                estimate = self._cost_fn(item) if self._cost_fn else None
            except Exception as error:  # noqa: BLE001 - an item the estimate cannot read is this item's failure
                now = time.time()
                owner.result.add_failure(item.id, now, now, 0, self._scrubbed(classify(error)))
                self._finish_if_whole(owner)
                continue
            return _Try(item, estimate, owner)
        return None

    def _wait_for_work(self) -> bool:
        """Nothing can start now: wait for a call to return or a throttled item to be due. False: all done."""
        if self._in_flight:
            self._settle(self._done.get())
            return True
        for attempt in self.throttle.leave_to_retry_round(self._clock()):
            self._record_throttled(attempt)
        due = self.throttle.next_due()
        if due is None:
            return False
        self._sleep(max(0.0, due - self._clock()))
        return True

    def _record_throttled(self, attempt: _Try) -> None:
        """The row of an item still throttled: failed-retryable, with its tries and the longest Retry-After."""
        now = time.time()
        failure = self._scrubbed(attempt.failure or Failure("http_429", True, "throttled", 429))
        attempt.owner.result.add_failure(attempt.item.id, now, now, attempt.tries, failure, attempt.retry_after)
        self._finish_if_whole(attempt.owner)

    def _submit(self, attempt: _Try) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.slots.cap, thread_name_prefix="paceline-calls")
        self._sent[id(attempt)] = self._clock()
        client, done, gate, spacing = self._connection.client, self._done, self._gate, self.pacer.spacing()
        call, listener = self._call, self._heard_by

        def send() -> None:
            gate.enter(spacing)
            try:
                done.put(_timed_call(call, client, attempt, listener))
            except BaseException as died:  # not a failure of the call: the worker dies of it, as it would inline
                done.put(died)
                raise

        self._pool.submit(send)

    # -- settling what came back ----------------------------------------------------------------

    def _settle_finished(self) -> None:
        while self._in_flight:
            try:
                outcome = self._done.get_nowait()
            except queue.Empty:
                return
            self._settle(outcome)

    def _settle(self, outcome: _Outcome | BaseException) -> None:
        if isinstance(outcome, BaseException):  # a call thread died of it (``_submit``): so does the worker
            raise outcome
        attempt, value, error, started, finished, heard = outcome
        self._in_flight -= 1
        self._sent.pop(id(attempt), None)
        if self._counts_returns:
            self.pacer.after_call()
        if self.slots.cap > 1 and not self.pacer.unpaced:  # latency only matters to a paced worker
            self.slots.on_sample(finished - started)
        if heard is not None:
            self.pacer.heed(heard, self.cost.per_call)
        if self._stopped:
            return  # the worker was already stopped (credentials, credit): its chunks' rows are written
        if error is None:
            self._succeed(
                attempt.owner.result,
                attempt.item,
                attempt.tries,
                attempt.charge,
                attempt.estimate,
                value,
                started,
                finished,
                attempt,
            )
        else:
            self._fail(attempt, error, started, finished)
        self._finish_if_whole(attempt.owner)

    def _succeed(
        self,
        result: ChunkResult,
        item: Item,
        tries: int,
        charge: float,
        estimate: float | None,
        value: Any,
        started: float,
        finished: float,
        attempt: _Try | None = None,
    ) -> None:
        self._connection.on_success()
        self.credentials.on_outcome(refused=False, ok=True)
        if self.throttle.on_success(attempt, tries == 1, self._clock()):
            self.pacer.slow_to(self.throttle.factor)
        actual = None if self._usage_fn is None else _reported_usage(self._usage_fn, value)
        if actual is not None:
            self.pacer.reconcile(charge, actual)
            self.cost.on_usage(actual, estimate)
        try:
            payload = None if value is None else scrub(_encode_json(value), self._secrets)
        except (TypeError, ValueError) as error:  # a payload JSON cannot hold is a bug in call: permanent
            result.add_failure(item.id, started, finished, tries, self._scrubbed(classify(error)))
            return
        result.add_ok(item.id, started, finished, tries, payload, actual if actual is not None else estimate)

    def _fail(self, attempt: _Try, error: Exception, started: float, finished: float) -> None:
        if isinstance(error, CallAgain):  # a paced request for a prerequisite: the item itself goes next
            attempt.tries -= 1
            if attempt.owner is self._current:
                self._fresh.appendleft(attempt.item)
            else:
                self._again.append(attempt)
            if error.after_s > 0:
                self.pacer.hold(error.after_s)
            return
        failure = classify(error, self._conventions)
        if failure.retry_after is not None:
            attempt.retry_after = max(attempt.retry_after or 0.0, failure.retry_after)
        if failure.out_of_credit:
            self._stop_out_of_credit(failure)
            return
        if failure.throttled:
            if self._throttled(attempt, failure):
                return
        else:
            self.throttle.on_other_failure()
        broken = not failure.throttled and self._connection.broken(failure)
        if broken:  # the call failed because its client died under it: a later try may well succeed
            self._reconnect = True
            failure = dataclasses.replace(failure, retryable=True)
        failure = self._scrubbed(failure)
        attempt.owner.result.add_failure(
            attempt.item.id, started, finished, attempt.tries, failure, attempt.retry_after
        )
        attempt.owner.result.credential_refusals += failure.auth
        if self.credentials.on_outcome(refused=failure.auth):
            self._abort_for_credentials(failure)

    def _throttled(self, attempt: _Try, failure: Failure) -> bool:
        """Hand a throttle to the throttle policy. False when the item's tries are used up: record its row."""
        step = self.throttle.on_throttle(attempt, attempt.tries, failure, self._clock())
        self.pacer.slow_to(self.throttle.factor)
        if step.hold_s:
            self.pacer.hold(step.hold_s)
        attempt.failure = failure
        return step.defer_until is not None

    # -- the rare paths -------------------------------------------------------------------------

    def _replace_client(self) -> None:
        """Let the calls in flight on the broken client finish (they get their rows), then reconnect."""
        while self._in_flight:
            self._settle(self._done.get())
        self._reconnect = False
        if self._stopped:
            return
        try:
            client = self._connection.replace()
            self._heard_by = self._listener if self._listener.listen(client) else None
        except ConnectionLost as lost:
            self._fail_the_rest(self._scrubbed(lost.failure))

    def _fail_the_rest(self, failure: Failure) -> None:
        """The client is gone for good: every item held without a row gets ``failure`` (throttled ones keep their tries).

        The worker goes on: its next chunk opens a new client, as a new worker would.
        """
        now = time.time()
        for attempt in [*self.throttle.take_all(), *self._again]:
            attempt.owner.result.add_failure(attempt.item.id, now, now, attempt.tries, failure, attempt.retry_after)
        self._again.clear()
        self._fresh.clear()
        self._connected = False
        for held in list(self._held):
            self._fill(held, failure)
            self._finish_if_whole(held)

    def _give_up(self, failure: Failure) -> None:
        """Every chunk still held gets ``failure`` for each item without a row, and is emitted; the worker stops."""
        self._stopped = True
        for held in list(self._held):
            self._fill(held, failure)
            self._finish_if_whole(held)

    def _abort_for_credentials(self, failure: Failure) -> None:
        for held in self._held:
            held.result.auth_aborted = True
        self._give_up(Failure("auth_aborted", True, failure.error, failure.http_status))

    def _stop_out_of_credit(self, failure: Failure) -> None:
        """The account cannot pay: no more calls, and the run stops (``backfill.run_attempt``).

        Every item held without a row gets an ``out_of_credit`` row,
        retryable and never counted as an attempt spent: a rerun of this
        attempt after a top-up calls exactly those, and keeps the rows these
        chunks finished.
        """
        failure = self._scrubbed(failure)
        for held in self._held:
            held.result.out_of_credit = failure.error
        self._give_up(failure)

    def _scrubbed(self, failure: Failure) -> Failure:
        return dataclasses.replace(failure, error=redact(failure.error, self._secrets) or "")


class _SendGate:
    """Calls handed to call threads start no closer together than the pacer spaced them.

    The pacer spaces calls when it hands them over; a busy CPU can delay a call
    thread and then let several go at once, which the service would count in
    one window. The gate re-spaces them where they really start.
    """

    __slots__ = ("_lock", "_next")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0.0

    def enter(self, spacing: float) -> None:
        with self._lock:  # held while waiting: the next call could not start before this one anyway
            now = time.monotonic()
            if self._next > now:
                time.sleep(self._next - now)
                now = time.monotonic()
            self._next = now + spacing


def _slot_cap(hooks: WorkHooks, pacing: Pacing) -> int:
    """Calls that may share the chunk's client: 1 for a client that runs one call at a time."""
    if pacing.window_calls or hooks.one_call_at_a_time:
        return 1
    if hooks.max_in_flight is None:
        return max(1, pacing.max_in_flight)
    return max(1, min(pacing.max_in_flight, hooks.max_in_flight))


def _reported_usage(usage: Callable[[Any], float | None] | None, value: Any) -> float | None:
    """Tokens the response says it used; a payload without them falls back to the estimate."""
    try:
        return usage(value) if usage else None
    except Exception:  # noqa: BLE001 - the call succeeded; only the reconciliation is lost
        return None
