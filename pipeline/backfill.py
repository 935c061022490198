"""A backfill, end to end: plan, run an attempt, find what failed, plan the retry.

These functions are what the Dagster assets and the CLI call; they hold no
Dagster code, so a backfill can also run from a script or a notebook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.advice import Advice, advise, advised_limit
from pipeline.background_compaction import DEFAULT_BACKGROUND, Background, Compactor
from pipeline.chunks import Chunk, ChunkResult
from pipeline.compaction import CompactionResult, compact_attempt, explain_files
from pipeline.defaults import DEFAULT_MAX_ATTEMPTS, DEFAULT_SHARE
from pipeline.errors import ConfigError, PacelineError
from pipeline.executors import Executor
from pipeline.items import ItemSource, NormalizeReport, normalize
from pipeline.leases import ShareChange
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, ExecutionPlan, Overrides, ServiceLimit, derive_plan
from pipeline.manifests import ManifestError, ManifestStore, check_name, result_table
from pipeline.outcomes import OUT_OF_CREDIT
from pipeline.plan import chunk_count, iter_chunks, make_plan
from pipeline.report import AttemptReport
from pipeline.runner import make_chunk_function
from pipeline.shares import LeaseTiming
from pipeline.sharing import make_room, share_preview, take_lease, ticket
from pipeline.work import Work


class AuthenticationFailed(PacelineError):
    """The service refused our credentials: stop before recording a million failures."""


class OutOfCredit(PacelineError):
    """The service's account cannot pay for more calls: stop, and leave the items for a rerun after a top-up."""


@dataclass(frozen=True)
class Backfill:
    """Everything Paceline needs to run one backfill.

    ``service`` names the external service; backfills that share a service
    share its limit: while they run at once, each gets a part of its budget
    in proportion to its ``share`` (a weight), and never less than
    ``min_share`` of the whole (``pipeline.shares``).
    """

    name: str
    source: ItemSource
    work: Work
    limit: ServiceLimit
    estimates: Estimates = Estimates()
    overrides: Overrides = Overrides()
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    share: float = DEFAULT_SHARE
    min_share: float = 0.0
    lease_timing: LeaseTiming = LeaseTiming()

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.max_attempts < 1:
            raise ConfigError(f"{self.name}: max_attempts must be at least 1, got {self.max_attempts}.")
        if not (isinstance(self.share, int | float) and 0 < self.share < float("inf")):
            raise ConfigError(
                f"{self.name}: share must be a positive number, got {self.share!r}. It is a weight: "
                "a backfill with share=3 gets three times the part of one with share=1 while both run."
            )
        if not (isinstance(self.min_share, int | float) and 0 <= self.min_share < 1):
            raise ConfigError(
                f"{self.name}: min_share must be in [0, 1), got {self.min_share!r}. It is the fraction of the "
                "service's budget this backfill keeps however many others run (0.2: a fifth)."
            )

    @property
    def service(self) -> str:
        return self.limit.name

    def execution_plan(self, item_count: int | None = None) -> ExecutionPlan:
        return derive_plan(self.limit, self.estimates, self.overrides, item_count)


@dataclass(frozen=True)
class PlanResult:
    plan: pa.Table
    normalized: NormalizeReport
    execution: ExecutionPlan
    path: str
    attempt: int

    @property
    def chunks(self) -> int:
        return chunk_count(self.plan)


@dataclass(frozen=True)
class Progress:
    chunks_done: int
    chunks_total: int
    items_done: int
    items_total: int
    ok: int
    last_chunk_items: int = 0


@dataclass(frozen=True)
class RunResult:
    report: AttemptReport
    counts: dict[str, int]
    skipped_chunks: int
    unreadable_manifests: list[str]
    execution: ExecutionPlan
    compaction: CompactionResult
    attempt_rows: int  # rows in the attempt's manifests, all its runs together
    advice: list[Advice] = field(default_factory=list)
    shares: list[ShareChange] = field(default_factory=list)  # the share of the service's budget, as it changed

    @property
    def max_retry_after(self) -> float:
        """The longest Retry-After the service asked for: a retry round should wait at least this."""
        return self.report.max_retry_after_s


def plan_backfill(backfill: Backfill, store: ManifestStore) -> PlanResult:
    """Read and normalise the items, derive the execution plan, write the chunk plan (attempt 0)."""
    execution_check = backfill.execution_plan()  # refuse a bad declaration before reading anything
    items, normalized = normalize(backfill.source.read())
    execution = backfill.execution_plan(items.num_rows) if items.num_rows else execution_check
    plan = make_plan(items, execution.chunk_size, execution.max_chunks_per_group)
    execution = explain_files(execution, chunk_count(plan))
    execution = dataclasses.replace(execution, explanation=[*execution.explanation, *share_preview(backfill, store)])
    path = store.plan_path(backfill.name, 0)
    _refuse_a_different_plan_over_manifests(backfill, store, path, plan)
    store.write_plan(backfill.name, 0, plan, backfill.max_attempts)
    return PlanResult(plan, normalized, execution, store.uri(path), 0)


def open_ledger(backfill: Backfill, store: ManifestStore) -> Ledger:
    """The ledger of one backfill, read with its ``max_attempts``: open it once per round and pass it on."""
    return Ledger(store, backfill.max_attempts, backfill.name)


def _refuse_a_different_plan_over_manifests(
    backfill: Backfill, store: ManifestStore, path: str, plan: pa.Table
) -> None:
    """Resume trusts chunk ids; a new item list under old manifests would skip the wrong items."""
    if not store.exists(path) or not store.manifest_files(backfill.name):
        return
    if store.read_table(path).select(["chunk_id", "item_id"]).equals(plan.select(["chunk_id", "item_id"])):
        return
    raise ManifestError(
        f"{backfill.name}: the items or the chunk size changed, but manifests of the earlier plan exist under "
        f"{store.uri(store.attempt_dir(backfill.name, 0)).rsplit('/attempt=', 1)[0]}. Resuming would skip the "
        "wrong items. Give the new run its own backfill name, or delete that folder (and the plan) to start over."
    )


def plan_retry(backfill: Backfill, store: ManifestStore, attempt: int, ledger: Ledger | None = None) -> PlanResult:
    """Plan attempt ``attempt`` from the items whose latest row is failed and retryable.

    If the round was planned already (a crashed round being resumed), its plan
    is kept. ``ledger`` is the backfill's ledger before the round
    (``open_ledger``), to be passed on to ``run_attempt``; without it one is
    opened here.
    """
    if attempt < 1:
        raise ConfigError(f"a retry round is attempt 1 or later, got {attempt}.")
    if store.exists(store.credit_path(backfill.name, attempt - 1)):
        raise ManifestError(
            f"{backfill.name}: attempt {attempt - 1} stopped because the service's account ran out of credit. "
            f"Run attempt {attempt - 1} again once the account is topped up (it calls only the items it did not "
            f"finish); plan attempt {attempt} after that."
        )
    path = store.plan_path(backfill.name, attempt)
    if store.exists(path):  # a round is planned once: rerunning it resumes its chunks, not new ones
        plan = store.read_table(path)
        execution = backfill.execution_plan(max(plan.num_rows, 1))
        return PlanResult(plan, NormalizeReport(plan.num_rows, 0, 0), execution, store.uri(path), attempt)
    with _given_or_opened(ledger, backfill, store) as before:
        failed = before.failed_items(backfill.name)
    original = store.read_table(store.plan_path(backfill.name, 0))
    payloads = original.select(["item_id", "payload", "group"])
    items = failed.select(["item_id"]).join(payloads, "item_id", join_type="left outer")
    items = items.take(pc.sort_indices(items["item_id"]))
    if pc.all(pc.is_null(items["group"])).as_py() is not False:
        items = items.drop_columns(["group"])
    execution = backfill.execution_plan(max(items.num_rows, 1))
    plan = make_plan(items, execution.chunk_size, execution.max_chunks_per_group)
    store.write_plan(backfill.name, attempt, plan, backfill.max_attempts)
    return PlanResult(plan, NormalizeReport(items.num_rows, 0, 0), execution, store.uri(path), attempt)


def run_attempt(
    backfill: Backfill,
    store: ManifestStore,
    executor: Executor,
    attempt: int = 0,
    run_id: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    ledger: Ledger | None = None,
    compaction: Background | None = DEFAULT_BACKGROUND,
) -> RunResult:
    """Run every unfinished chunk of an attempt and write each manifest as it finishes, compacting as it goes.

    Chunks that already have a readable manifest, compacted or not, are
    skipped (resume); unreadable manifests are reported and their chunks run
    again. Compaction merges the attempt's chunk files into a few large ones,
    so the ledger's questions stop costing one file each: each block as soon
    as its chunks are written, in the background within ``compaction``'s
    budget, so the attempt's end waits for its last block only (``None``:
    all blocks at the end, in this thread). A retry round paces itself from
    the round before, read from ``ledger`` (the one its plan came from) or
    from one opened here.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    plan = store.read_table(store.plan_path(backfill.name, attempt))
    declared = backfill
    if attempt > 0:
        with _given_or_opened(ledger, backfill, store) as before:
            backfill = paced_from_round_before(backfill, before, attempt)
    execution = backfill.execution_plan(max(plan.num_rows, 1))
    if backfill.limit != declared.limit:
        paced = (
            f"paced from the advice of attempt {attempt - 1}, which was throttled "
            f"(see `paceline advise`): requests_per_second={backfill.limit.requests_per_second:g}"
        )
        execution = dataclasses.replace(execution, explanation=[paced, *execution.explanation])
    scan = store.scan_chunks(backfill.name, attempt)
    stopped = stopped_for_credit(store, backfill.name, attempt, scan.finished)
    finished = scan.finished - stopped.keys()
    total_chunks = chunk_count(plan)
    done_items = int(pc.sum(pc.is_in(plan["chunk_id"], pa.array(sorted(finished), pa.int32()))).as_py() or 0)
    progress = Progress(len(finished), total_chunks, done_items, plan.num_rows, 0)
    function = make_chunk_function(backfill.work)
    credit = _CreditWatch(set(stopped))
    holder = take_lease(backfill, store, executor.name, execution, attempt, run_id)
    compactor = None
    try:
        if holder is not None:
            execution = make_room(backfill, execution, holder, plan.num_rows)
            holder.start()
            execution = dataclasses.replace(execution, explanation=[*execution.explanation, holder.describe()])
        chunks = iter_chunks(
            plan,
            backfill=backfill.name,
            attempt=attempt,
            run_id=run_id,
            pacing=execution.pacing,
            skip=finished,
            first_wave=execution.max_parallelism,
            share=ticket(holder, store, backfill),
        )
        chunks = (_left_by_credit(chunk, stopped) for chunk in credit.until_dry(chunks))
        credentials = _CredentialCheck(backfill, execution.pacing.auth_fail_fast)
        compactor = Compactor(store, backfill.name, attempt, finished, compaction) if compaction else None
        for result in executor.map(function, chunks, execution.max_parallelism):
            credit.note(result)
            if result.out_of_credit is not None:  # written, but not finished: a rerun continues it
                _write_chunk(store, result, stopped)
                continue
            for ready in credentials.admit(result):
                ok = _write_chunk(store, ready, stopped, compactor)
                progress = Progress(
                    progress.chunks_done + 1,
                    total_chunks,
                    progress.items_done + len(ready),
                    plan.num_rows,
                    progress.ok + ok,
                    len(ready),
                )
                if on_progress:
                    on_progress(progress)
        for refused in credentials.held_back:  # the run ended before it could tell: record them after all
            _write_chunk(store, refused, stopped, compactor)
        credit.record(store, backfill.name, attempt)
    except BaseException:
        if compactor is not None:
            compactor.stop()
        if holder is not None:
            holder.abandon()  # workers may still be calling: the lease expires after they stop
        raise
    if holder is not None:
        holder.release()  # every worker has returned: the others may have its part at once
    if credit.said is not None:
        if compactor is not None:
            compactor.stop()
        raise _out_of_credit(backfill, credit.said)
    compacted = compactor.finish() if compactor else compact_attempt(store, backfill.name, attempt)
    with open_ledger(backfill, store) as after:  # the round's own rows: written after any ledger before it
        report = after.attempt_report(backfill.name, attempt, run_id)
        counts = after.counts(backfill.name)
        rows = after.attempt_rows(backfill.name, attempt)
    advice = advise(report, declared.limit, declared.estimates)
    shares = holder.changes if holder is not None else []
    return RunResult(report, counts, len(finished), scan.unreadable, execution, compacted, rows, advice, shares)


@contextlib.contextmanager
def _given_or_opened(ledger: Ledger | None, backfill: Backfill, store: ManifestStore) -> Iterator[Ledger]:
    """The caller's ledger (left open for its next question), or one opened and closed here."""
    if ledger is not None:
        yield ledger
        return
    with open_ledger(backfill, store) as opened:
        yield opened


class _CreditWatch:
    """Stops handing out chunks once one ran dry, and keeps the list of chunks an empty account stopped.

    The chunks already running end at their next refused call; each chunk
    that ran dry is written with the rows it finished and an ``out_of_credit``
    row for every other item, so nothing is failed for good and no finished
    call is paid for twice. Their ids are kept beside the plans
    (``ManifestStore.credit_path``), so a rerun of the attempt after a top-up
    finds them without reading every manifest, and calls only those items
    (``stopped_for_credit``) and the chunks never started.
    """

    def __init__(self, dry: set[int]) -> None:
        self.said: str | None = None  # what the service said, once a chunk ran dry
        self.dry = dry  # chunks whose manifest holds out_of_credit rows

    def until_dry(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            if self.said is not None:
                return
            yield chunk

    def note(self, result: ChunkResult) -> None:
        if result.out_of_credit is None:
            self.dry.discard(result.chunk_id)
            return
        self.said = self.said or result.out_of_credit
        self.dry.add(result.chunk_id)

    def record(self, store: ManifestStore, backfill: str, attempt: int) -> None:
        path = store.credit_path(backfill, attempt)
        if self.dry:
            store.write_table(path, pa.table({"chunk_id": pa.array(sorted(self.dry), pa.int32())}))
        elif store.exists(path):
            store.remove(path)


def _out_of_credit(backfill: Backfill, said: str) -> OutOfCredit:
    return OutOfCredit(
        f"{backfill.name}: {backfill.service} says the account is out of credit or quota: {said} "
        "Paceline stopped the run instead of retrying into an empty account. Top up the account (or raise "
        "its spending limit), then run this attempt again: it calls only the items not done yet."
    )


def stopped_for_credit(store: ManifestStore, backfill: str, attempt: int, finished: set[int]) -> dict[int, pa.Table]:
    """Chunks of an attempt that an empty account stopped: chunk id -> the rows they did finish.

    ``finished`` are the chunks with a readable manifest (``scan_chunks``); a
    stopped chunk whose file does not read runs again whole, as any would.
    """
    path = store.credit_path(backfill, attempt)
    if not store.exists(path):
        return {}
    ids = [i for i in store.read_table(path)["chunk_id"].to_pylist() if i in finished]
    return {
        i: store.read_table(store.chunk_path(backfill, attempt, i)).filter(pc.field("status") != OUT_OF_CREDIT)
        for i in ids
    }


def _left_by_credit(chunk: Chunk, stopped: dict[int, pa.Table]) -> Chunk:
    """A chunk an empty account stopped comes back with only the items it did not finish."""
    finished = stopped.get(chunk.chunk_id)
    if finished is None:
        return chunk
    done = set(finished["item_id"].to_pylist())
    kept = [(i, p) for i, p in zip(chunk.item_ids, chunk.payloads) if i not in done]
    return dataclasses.replace(chunk, item_ids=[i for i, _ in kept], payloads=[p for _, p in kept])


def _write_chunk(
    store: ManifestStore, result: ChunkResult, stopped: dict[int, pa.Table], compactor: Compactor | None = None
) -> int:
    """Write a chunk's manifest, then tell the compactor it is finished; returns its ok rows.

    A continued chunk's file also keeps the rows its first run finished. The
    ok rows are counted on the Arrow table: the rows themselves are a list
    of tuples that a count would walk in Python.
    """
    path = store.chunk_path(result.backfill, result.attempt, result.chunk_id)
    table = result_table(result)
    finished = stopped.get(result.chunk_id)
    store.write_table(path, table if finished is None else pa.concat_tables([finished, table]))
    if compactor is not None:
        compactor.written(result.chunk_id)
    return sum(chunk.true_count for chunk in table["ok"].chunks)


def advice_for(backfill: Backfill, ledger: Ledger, attempt: int) -> list[Advice]:
    """What attempt ``attempt`` (all its runs) measured, as the declaration to use next time."""
    report = ledger.attempt_report(backfill.name, attempt, None)
    return advise(report, backfill.limit, backfill.estimates)


def paced_from_round_before(backfill: Backfill, ledger: Ledger, attempt: int) -> Backfill:
    """A retry round paces itself from the round before, so it does not repeat the storm that failed its items."""
    limit = advised_limit(advice_for(backfill, ledger, attempt - 1), backfill.limit)
    return backfill if limit == backfill.limit else dataclasses.replace(backfill, limit=limit)


class _CredentialCheck:
    """Stops a run whose first calls are all refused (401/403) before it records them.

    A chunk's runner stops after its own first refusals; this catches the same
    thing across chunks too small to tell on their own. Chunks whose every row
    was refused are held back until the run has a success; if the refused rows
    reach ``threshold`` first, the credentials are wrong: nothing of them is
    written, so a rerun with fixed credentials does every chunk.
    """

    def __init__(self, backfill: Backfill, threshold: int):
        self._backfill = backfill
        self._threshold = threshold
        self._proven = False
        self.held_back: list[ChunkResult] = []

    def admit(self, result: ChunkResult) -> list[ChunkResult]:
        """The chunks that can be written now (held-back ones first)."""
        if result.auth_aborted:
            self._refuse(result)
        if not self._proven and len(result) and result.credential_refusals == len(result):
            self.held_back.append(result)
            if sum(len(r) for r in self.held_back) >= self._threshold:
                self._refuse(result)
            return []
        self._proven = True
        ready, self.held_back = [*self.held_back, result], []
        return ready

    def _refuse(self, result: ChunkResult) -> None:
        statuses = sorted({s for s in result.http_status if s})
        raise AuthenticationFailed(
            f"{self._backfill.name}: the first calls were all refused (HTTP {', '.join(map(str, statuses))}). "
            "Check the credentials the backfill uses (for example the API token environment variable); "
            "nothing was recorded for the refused chunks, so a rerun will do them."
        )
