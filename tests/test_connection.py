"""Which failures mean the chunk's client is gone, for every kind of client the built-in workloads hold."""

import httpx
import pytest

from pipeline.connection import ChunkClient
from pipeline.outcomes import Failure
from pipeline.work import FunctionWork
from pipeline.workloads.scrape import ScrapeWork

A_CALL_FAILED = Failure("exception", False, "RuntimeError: Cannot send a request, as the client has been closed.")


def _opened(work) -> ChunkClient:
    connection = ChunkClient(work)
    connection.open()
    return connection


@pytest.mark.parametrize(
    "work",
    [
        FunctionWork(lambda: httpx.Client(), lambda client, item: None),
        ScrapeWork(selectors={"h": "h1"}),
    ],
    ids=["httpx client", "scrape session"],
)
def test_a_closed_client_is_broken_and_an_open_one_is_not(work):
    connection = _opened(work)
    assert not connection.broken(A_CALL_FAILED), "one failed call on a live client is that call's problem"
    connection.client.close()
    assert connection.broken(A_CALL_FAILED), "a closed client fails every later call: replace it"
    connection.close()


def test_a_transport_failure_always_replaces_the_client():
    connection = _opened(FunctionWork(lambda: object(), lambda client, item: None))
    assert connection.broken(Failure("connection", True, "ConnectError: [Errno 111] Connection refused"))
