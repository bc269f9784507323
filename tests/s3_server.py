"""A real S3 server over HTTP on loopback for the bucket tests: moto's server mode.

`moto_server` starts one per session (port chosen by the OS); `s3` resets it, points the standard
AWS environment at it for one test only (endpoint, fake keys, response checksums validated only
when required), creates a bucket and returns its URI. Request checksums are left at the SDK's
default, so uploads carry the checksums `S3Store` sends (`aws_env`, for subprocesses, still asks for
them only when required, as many S3-compatible servers expect). No client is mocked: the code under
test talks HTTP to the server as it would to AWS or MinIO.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

ACCESS_KEY = "AKIALORAMTESTKEY0001"
SECRET_KEY = "loram-test-secret-never-to-be-logged-7f3a"
BUCKET = "loram-test"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """The server's endpoint URL, `http://127.0.0.1:PORT`."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def aws_env(endpoint: str) -> dict[str, str]:
    """The environment a process needs to use the test server (for subprocesses too)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty bucket on a freshly reset server, with the AWS environment set for this test: `s3://loram-test`."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")).read()
    for key, value in aws_env(moto_server).items():
        monkeypatch.setenv(key, value)
    for key in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REQUEST_CHECKSUM_CALCULATION",
    ):
        monkeypatch.delenv(key, raising=False)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}"
