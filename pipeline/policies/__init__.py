"""The worker loop's policies: each answers one question about what came back, on an injectable clock.

The runner (``pipeline.runner``) dispatches; these decide. Each is fed one
call per outcome and reads no clock of its own, so each is tested on
simulated time (``tests/test_policies.py``):

* ``throttle``    the service said "slow down": set the item aside, wait, or slow the worker;
* ``credentials`` every call so far was refused for its key: stop before recording a million refusals.

Reconnecting a broken client, and waiting for room when a database refuses a
login, is ``pipeline.connection``.
"""
