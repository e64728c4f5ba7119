"""Fixtures (imported by the test modules: a second conftest.py would shadow tests/conftest.py's
importable name): an S3 server on loopback (moto) and the environment pointing NDS at it."""

from __future__ import annotations

import logging
import os

import pytest

BUCKET = "nds-test"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on 127.0.0.1 (random port) with one bucket; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    # Dummy credentials: moto accepts any, and nothing real may leak into a test.
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """NDS_S3_ENDPOINT_URL set for this test only."""
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", s3_server)
    return s3_server
