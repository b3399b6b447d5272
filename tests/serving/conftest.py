"""Fixtures shared by the serving tests."""

import pytest


@pytest.fixture()
def s3(monkeypatch):
    """A local S3 server (moto's, on 127.0.0.1) with one bucket; lsst-resources and boto3 pointed at it."""
    import boto3
    from moto.server import ThreadedMotoServer
    from server_helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in (("S3_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="survey")
    yield client
    server.stop()
