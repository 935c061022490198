"""A local S3 endpoint for demos and tests: moto's server, in a thread of this process.

    with start_s3() as s3:
        client = s3.client()                 # boto3 S3 client for this endpoint
        client.create_bucket(Bucket="events")

moto accepts any credentials; ``env`` holds the dummy ones (and the region)
that boto3 needs to sign requests, for processes that must find them in the
environment, such as ``pipeline.items.S3Prefix``. State lives in memory and
is shared by every moto server in the process; it is gone when the process exits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "paceline-local",
    "AWS_SECRET_ACCESS_KEY": "paceline-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Handle:
    """A running moto S3 endpoint at ``url``; ``stop()`` shuts it down."""

    url: str
    _server: Any = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Dummy credentials and region for boto3 (moto does not check them)."""
        return dict(CREDENTIALS)

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint, signed with the dummy credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def stop(self) -> None:
        """Shut the server down; safe to call twice."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> S3Handle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_s3() -> S3Handle:
    """Start moto's S3 server on a free local port (its per-request log lines are silenced)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Handle(f"http://{host}:{port}", server)
