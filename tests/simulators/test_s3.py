"""S3Server: moto in server mode on loopback, pre-signed URLs, snapshot to its data_dir."""

import uuid

import pytest
import requests

from ponos_tasks.simulators.s3 import S3Server, ensure_bucket, s3_client


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


def test_listens_on_loopback_ephemeral_port(s3):
    assert s3.url.startswith("http://127.0.0.1:")
    assert not s3.url.endswith(":5000")


def test_presigned_put_read_back_byte_for_byte(s3):
    client = s3.client()
    ensure_bucket(client, "test-bucket")
    ensure_bucket(client, "test-bucket")  # idempotent
    key = f"{uuid.uuid4()}.log"
    body = ("ligne 1 — éàü 漢字 🚀\n" * 20000).encode()
    url = client.generate_presigned_url(
        "put_object", Params={"Bucket": "test-bucket", "Key": key}, ExpiresIn=600
    )
    assert url.startswith(s3.url + "/test-bucket/")
    assert requests.put(url, data=body, timeout=30).status_code == 200
    assert client.get_object(Bucket="test-bucket", Key=key)["Body"].read() == body


def test_client_requires_endpoint():
    with pytest.raises(ValueError):
        s3_client("")


def test_data_dir_snapshot_and_restore(tmp_path):
    key = f"{uuid.uuid4()}/artifact.bin"
    with S3Server(data_dir=tmp_path) as server:
        client = server.client()
        ensure_bucket(client, "test-persist")
        client.put_object(Bucket="test-persist", Key=key, Body=b"\x00\x01payload")
    assert (tmp_path / "test-persist" / key).read_bytes() == b"\x00\x01payload"
    # moto keeps its objects in memory for the whole process: delete them so that the
    # restore below is what brings the object back.
    with S3Server() as server:
        server.client().delete_object(Bucket="test-persist", Key=key)
    with S3Server(data_dir=tmp_path) as server:
        body = server.client().get_object(Bucket="test-persist", Key=key)["Body"].read()
    assert body == b"\x00\x01payload"
