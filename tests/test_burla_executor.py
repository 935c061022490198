"""BurlaExecutor, through Burla's own pre-flight, pickling and call contract.

No Burla cluster can run here (it needs a cloud account), so these tests
replace only Burla's network layer (``_execute_job_wrapped``): everything in
front of it — input wrapping, the environment scan, the call-time import
check, by-value pickling, signal handlers, the result generator — is Burla's
real code (burla==1.8.4, pinned in pyproject.toml because the test reaches
into internals).
"""

import pickle
import random
import subprocess
import sys
import threading
import types
from pathlib import Path

import burla._env_scan as env_scan
import burla._remote_parallel_map as rpm
import cloudpickle
import cloudpickle.cloudpickle as cloudpickle_internals
import httpx
import pytest
from burla._node import NodeDisconnected

import assets  # noqa: F401 - load every project module, so Burla's scan covers them all
import paceline.definitions  # noqa: F401
import pipeline.cli  # noqa: F401
import resources  # noqa: F401
from pipeline import executors
from pipeline.chunks import Chunk
from pipeline.executors import BurlaExecutor, ChunkSequence, ExecutorError
from pipeline.limits import Pacing
from pipeline.localservices import start_http_api
from pipeline.runner import make_chunk_function
from pipeline.work import FunctionWork

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _connect_to(url):
    return lambda: httpx.Client(base_url=url, timeout=5)


def _get_item(client, item):
    if item.id == "boom":
        raise RuntimeError("bug in call")
    response = client.get(f"/items/{item.id}")
    response.raise_for_status()
    return response.json()


def _chunks(n_chunks: int, per_chunk: int = 3) -> list[Chunk]:
    return [
        Chunk("burla_test", 0, "run", c, [f"{c}-{i}" for i in range(per_chunk)], [None] * per_chunk, Pacing())
        for c in range(n_chunks)
    ]


@pytest.fixture(scope="module")
def api():
    with start_http_api() as service:
        yield service


def test_burla_preflight_accepts_the_chunk_function_and_it_runs_without_dagster(api, tmp_path):
    function = executors._sequence_function(make_chunk_function(FunctionWork(_connect_to(api.url), _get_item)))
    scan = env_scan.scan_environment()
    names = env_scan.modules_to_pickle_by_value(scan)
    assert any(n.startswith("pipeline") for n in names), "the project travels by value, as on a real cluster"
    assert "paceline" not in scan.requirements, "Burla would try to pip-install paceline on the workers"
    env_scan.raise_on_call_time_local_imports(function, scan, names)
    payload = rpm._pickle_function(function, names)
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(PROJECT_ROOT)],
        input=payload + cloudpickle.dumps(ChunkSequence(_chunks(2))),
        capture_output=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.split() == [b"0", b"3", b"3", b"1", b"3", b"3", b"shipped"], "one call, two chunks, two results"


# A stand-in for a Burla worker: no Dagster, and the project only from the sources
# shipped inside the function payload (the editable install is taken off sys.path).
WORKER = """
import io, pickle, sys, tempfile, zipfile
sys.path = [p for p in sys.path if p.rstrip("/") != sys.argv[1]]
sys.modules["dagster"] = None
import cloudpickle
magic = %r
data = sys.stdin.buffer.read()
names, sources, function_bytes = pickle.loads(data[len(magic):])
chunk_bytes = data[len(magic) + len(pickle.dumps((names, sources, function_bytes), protocol=pickle.HIGHEST_PROTOCOL)):]
shipped = tempfile.mkdtemp()
zipfile.ZipFile(io.BytesIO(sources)).extractall(shipped)
sys.path.insert(0, shipped)
fn = cloudpickle.loads(function_bytes)
results = fn(cloudpickle.loads(chunk_bytes))
import pipeline
for result in sorted(results, key=lambda r: r.chunk_id):
    print(result.chunk_id, sum(result.ok), len(result.item_id))
print("shipped" if pipeline.__file__.startswith(shipped) else "installed")
""" % (rpm._FUNCTION_PAYLOAD_MAGIC,)


def _load_like_a_worker(payload: bytes):
    """Unpickle as a Burla worker would: a process that has never seen the project's classes.

    Unpickled in the process that pickled them, cloudpickle would find each
    class sent by value among its own and overwrite that class's methods with
    the shipped copies, whose module globals are copies too: later tests in
    this process would then write a worker's memory where no one reads it.
    So the class tracker is emptied for the load, and put back after it.
    """
    _names, _sources, function_bytes = pickle.loads(payload[len(rpm._FUNCTION_PAYLOAD_MAGIC) :])
    tracked = cloudpickle_internals._DYNAMIC_CLASS_TRACKER_BY_ID  # the loads below takes cloudpickle's lock itself
    saved = dict(tracked)
    tracked.clear()
    try:
        return cloudpickle.loads(function_bytes)
    finally:
        tracked.clear()
        tracked.update(saved)


class FakeNodes:
    """Stands in for Burla's network layer: runs the pickled function, returns results unordered."""

    def __init__(self, disconnect_after: int | None = None):
        self.disconnect_after = disconnect_after
        self.calls: list[dict] = []

    async def __call__(self, job_id, return_queue, function_, inputs, by_value_module_names, raise_errors, **kw):
        self.calls.append(
            {"max_parallelism": kw["max_parallelism"], "raise_errors": raise_errors, "n_inputs": len(inputs)}
        )
        remote = _load_like_a_worker(rpm._pickle_function(function_, by_value_module_names))
        order = list(range(len(inputs)))
        random.Random(7).shuffle(order)
        for returned, index in enumerate(order):
            if self.disconnect_after is not None and returned == self.disconnect_after:
                raise NodeDisconnected(types.SimpleNamespace(instance_name="node-1"))
            try:
                return_queue.put(remote(cloudpickle.loads(cloudpickle.dumps(inputs[index]))))
            except Exception as error:  # what Burla's node client does with raise_errors=False
                error.burla_input_index = index
                if raise_errors:
                    raise
                return_queue.put(error)


@pytest.fixture
def fake_cluster(monkeypatch):
    def install(nodes: FakeNodes) -> FakeNodes:
        monkeypatch.setattr(rpm, "_execute_job_wrapped", nodes)
        monkeypatch.setattr(rpm.ClusterClient, "patch_job_sync", staticmethod(lambda *a, **k: None))
        monkeypatch.setattr(rpm, "log_job_failure_telemetry", lambda *a, **k: None)
        return nodes

    return install


def _work_with_a_bad_chunk(api):
    inner = make_chunk_function(FunctionWork(_connect_to(api.url), _get_item))

    def run_paceline_chunk(chunk):
        if chunk.chunk_id == 2:
            raise MemoryError("worker ran out of memory")  # escapes the runner, like a crash
        return inner(chunk)

    return run_paceline_chunk


def test_unordered_results_and_worker_exceptions_map_back_to_their_chunks(api, fake_cluster):
    nodes = fake_cluster(FakeNodes())
    chunks = _chunks(5)
    results = list(BurlaExecutor().map(_work_with_a_bad_chunk(api), chunks, max_parallelism=3))
    assert nodes.calls == [{"max_parallelism": 3, "raise_errors": False, "n_inputs": 3}], "5 chunks dealt to 3 calls"
    by_chunk = {r.chunk_id: r for r in results}
    assert sorted(by_chunk) == [0, 1, 2, 3, 4]
    assert by_chunk[2].status == ["worker_error"] * 3 and all(by_chunk[2].retryable)
    assert all(all(by_chunk[c].ok) for c in (0, 1, 3, 4))
    assert sorted(i for r in results for i in r.item_id) == sorted(i for c in chunks for i in c.item_ids)


def test_lost_node_keeps_returned_chunks_and_records_the_rest(api, fake_cluster):
    fake_cluster(FakeNodes(disconnect_after=2))
    chunks = _chunks(6)
    results = list(
        BurlaExecutor(chunks_per_call=1).map(
            make_chunk_function(FunctionWork(_connect_to(api.url), _get_item)), chunks, max_parallelism=2
        )
    )
    ok_chunks = [r for r in results if all(r.ok)]
    lost = [r for r in results if not any(r.ok)]
    assert len(ok_chunks) == 2 and len(lost) == 4
    assert all(s == "executor_error" for r in lost for s in r.status)
    assert all("NodeDisconnected" in e for r in lost for e in r.error)
    assert sorted(r.chunk_id for r in results) == list(range(6))


def test_a_lost_node_loses_only_the_chunks_of_the_calls_it_had_not_returned(api, fake_cluster):
    nodes = fake_cluster(FakeNodes(disconnect_after=2))
    chunks = _chunks(12)
    results = list(
        BurlaExecutor(chunks_per_call=2).map(
            make_chunk_function(FunctionWork(_connect_to(api.url), _get_item)), chunks, max_parallelism=2
        )
    )
    assert nodes.calls[0]["n_inputs"] == 6, "12 chunks in calls of 2"
    by_chunk = {r.chunk_id: r for r in results}
    assert sorted(by_chunk) == list(range(12)), "every chunk has a result"
    kept = {c for c, r in by_chunk.items() if all(r.ok)}
    lost = {c for c, r in by_chunk.items() if all(s == "executor_error" for s in r.status)}
    assert len(kept) == 4 and len(lost) == 8 and kept | lost == set(range(12))
    calls = [{s.chunks[0].chunk_id, s.chunks[1].chunk_id} for s in executors.deal(chunks, 2, 2)]
    assert all(call <= kept or call <= lost for call in calls), "a call's chunks come back together or not at all"


def test_chunks_are_dealt_so_each_worker_starts_with_a_chunk_of_the_first_wave():
    chunks = _chunks(10)
    sequences = executors.deal(chunks, workers=3, per_call=2)
    assert [[c.chunk_id for c in s.chunks] for s in sequences] == [[0, 3], [1, 4], [2, 5], [6, 9], [7], [8]]
    assert sorted(c.chunk_id for s in sequences for c in s.chunks) == list(range(10)), "each chunk exactly once"


def test_a_job_that_never_starts_is_an_error_and_records_nothing(fake_cluster):
    fake_cluster(FakeNodes(disconnect_after=0))
    with pytest.raises(ExecutorError, match="nothing was recorded"):
        list(BurlaExecutor().map(make_chunk_function(FunctionWork(lambda: None, _get_item)), _chunks(3), 2))


def test_burla_must_be_called_from_the_main_thread():
    errors = []

    def run():
        try:
            list(BurlaExecutor().map(make_chunk_function(FunctionWork(lambda: None, _get_item)), _chunks(1), 1))
        except ExecutorError as error:
            errors.append(str(error))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


def test_without_a_cluster_burla_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no Burla credentials
    with pytest.raises(ExecutorError, match="burla login"):
        list(BurlaExecutor().map(make_chunk_function(FunctionWork(lambda: None, _get_item)), _chunks(2), 2))
