"""The work contract is explicit: every optional hook has its default, and one call at a time is a flag."""

import ast
from pathlib import Path

import httpx
import pytest

from pipeline.pacing.headers import ServiceSignal
from pipeline.pacing.listen import Listener
from pipeline.work import FunctionWork, Work, WorkHooks
from pipeline.workloads import HttpWork, KeyRangeWork, S3ToPostgresWork

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"


class _JustTwoMethods:
    """A work written against the two required methods only."""

    def connect(self):
        return None

    def call(self, client, item):
        return item.id


def test_a_work_with_only_connect_and_call_gets_every_default():
    hooks = WorkHooks.of(_JustTwoMethods())
    assert (hooks.one_call_at_a_time, hooks.max_in_flight, hooks.conventions) == (False, None, ())
    assert (hooks.cost, hooks.usage, hooks.secrets) == (None, None, ())
    assert hooks.broken(httpx.Client()) is False
    closed = httpx.Client()
    closed.close()
    assert hooks.broken(closed) is True, "the default: the client says it is closed"


def test_a_subclass_inherits_the_defaults_and_empty_secrets_are_dropped():
    work = FunctionWork(lambda: None, lambda client, item: None, secret_values=("", "s3cret"))
    assert Work in type(work).__mro__ and work.max_in_flight is None
    assert WorkHooks.of(work).secrets == ("s3cret",)


@pytest.mark.parametrize(
    ("work", "one_at_a_time"),
    [
        (KeyRangeWork(dsn="postgresql://u@h/db", query="SELECT 1 WHERE %(lo)s < %(hi)s"), True),
        (
            S3ToPostgresWork(dsn="postgresql://u@h/db", bucket="b", table="t", columns=("id",)),
            True,
        ),
        (HttpWork(url_template="{base}/items/{id}", base="http://x"), False),
        (FunctionWork(lambda: None, lambda client, item: None, one_call_at_a_time=True), True),
    ],
)
def test_one_call_at_a_time_is_what_the_work_says(work, one_at_a_time):
    assert WorkHooks.of(work).one_call_at_a_time is one_at_a_time


def test_a_listener_hands_each_call_what_its_own_response_said():
    listener = Listener()
    transport = httpx.MockTransport(lambda request: httpx.Response(200, headers={"Retry-After": "3"}))
    client = httpx.Client(transport=transport)
    assert listener.listen(client)
    assert listener.take() is None, "nothing heard before a call"
    client.get("http://service/items/1")
    assert listener.take() == ServiceSignal(retry_after_s=3.0)
    assert listener.take() is None, "taken once"
    assert not Listener().listen(object()), "a client that is not httpx says nothing"


def test_planner_store_and_executors_do_not_import_the_runner():
    for name in ("plan.py", "manifests.py", "executors.py", "chunks.py", "rows.py"):
        tree = ast.parse((PIPELINE / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "pipeline.runner" not in imported, f"pipeline/{name} imports the runner"
