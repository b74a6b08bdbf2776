"""S3Server: moto in server mode on loopback behind a proxy that checks pre-signed URLs
(expiry, signature) and can go down; snapshot to its data_dir."""

import time
import uuid
from xml.etree import ElementTree

import pytest
import requests

from ponos_tasks.simulators.harness import SimAdmin
from ponos_tasks.simulators.s3 import S3Server, ensure_bucket, presigned_signature, s3_client


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


# ---- the checking proxy in front of moto: pre-signed URLs are verified as S3 does


def _presigned_put(s3, key=None, expires=600, client=None):
    client = client or s3.client()
    ensure_bucket(client, "test-bucket")
    key = key or f"{uuid.uuid4()}.log"
    url = client.generate_presigned_url(
        "put_object", Params={"Bucket": "test-bucket", "Key": key}, ExpiresIn=expires
    )
    return key, url


def _error(resp):
    root = ElementTree.fromstring(resp.content)
    return root.findtext("Code"), root.findtext("Message"), root


def test_presigned_get_with_response_content_type_passes(s3):
    client = s3.client()
    ensure_bucket(client, "test-bucket")
    key = f"{uuid.uuid4()}.tar.zst"
    client.put_object(Bucket="test-bucket", Key=key, Body=b"archive")
    url = client.generate_presigned_url(
        "get_object",
        Params={"Bucket": "test-bucket", "Key": key, "ResponseContentType": "application/zstd"},
        ExpiresIn=600,
    )
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200 and resp.content == b"archive"
    assert resp.headers["Content-Type"] == "application/zstd"


def test_expired_url_gets_s3_access_denied(s3):
    key, url = _presigned_put(s3, expires=3600)
    assert requests.put(url, data=b"first", timeout=10).status_code == 200
    s3.advance(3601)
    try:
        resp = requests.put(url, data=b"second", timeout=10)
        assert resp.status_code == 403
        code, message, root = _error(resp)
        assert (code, message) == ("AccessDenied", "Request has expired")
        assert root.findtext("X-Amz-Expires") == "3600"
        assert root.findtext("Expires") and root.findtext("ServerTime")
        # A fresh URL works at the same (advanced) time.
        _, fresh = _presigned_put(s3, key=key)
    finally:
        s3.advance(-3601)
    # Nothing reached moto: the object is still the first upload.
    assert s3.client().get_object(Bucket="test-bucket", Key=key)["Body"].read() == b"first"
    assert requests.put(fresh, data=b"third", timeout=10).status_code == 200


def test_expiry_in_real_time(s3):
    _, url = _presigned_put(s3, expires=1)
    time.sleep(2.1)
    resp = requests.put(url, data=b"late", timeout=10)
    assert resp.status_code == 403 and _error(resp)[1] == "Request has expired"


@pytest.mark.parametrize(
    "alter",
    [
        lambda url: url.replace(".log?", ".other?"),  # another key
        lambda url: url.replace("X-Amz-Expires=600", "X-Amz-Expires=6000"),  # a longer life
        lambda url: url[:-4] + ("0000" if not url.endswith("0000") else "1111"),  # signature
        lambda url: url + "&extra=1",  # an unsigned parameter added
    ],
    ids=["key", "expires", "signature", "extra-param"],
)
def test_altered_url_gets_signature_does_not_match(s3, alter):
    _, url = _presigned_put(s3)
    resp = requests.put(alter(url), data=b"x", timeout=10)
    assert resp.status_code == 403
    assert _error(resp)[0] == "SignatureDoesNotMatch"


def test_wrong_method_or_secret_is_refused(s3):
    _, url = _presigned_put(s3)
    assert requests.get(url, timeout=10).status_code == 403  # signed for PUT
    forged = s3_client(s3.url, secret_key="not-the-secret")
    _, url = _presigned_put(s3, client=forged)
    resp = requests.put(url, data=b"x", timeout=10)
    assert resp.status_code == 403 and _error(resp)[0] == "SignatureDoesNotMatch"
    unknown = s3_client(s3.url, access_key="AKIDUNKNOWN")
    url = unknown.generate_presigned_url(
        "put_object", Params={"Bucket": "test-bucket", "Key": "k"}, ExpiresIn=60
    )
    resp = requests.put(url, data=b"x", timeout=10)
    assert resp.status_code == 403 and _error(resp)[0] == "InvalidAccessKeyId"


def test_down_knob_503_then_back(s3):
    _, url = _presigned_put(s3)
    admin = SimAdmin(
        vast_url="http://127.0.0.1:9", arkindex_url="http://127.0.0.1:9", s3_url=s3.url
    )
    before = admin.s3_stats()["refused_down"]
    admin.s3_down(1.5)
    try:
        resp = requests.put(url, data=b"x", timeout=10)
        assert resp.status_code == 503 and _error(resp)[0] == "ServiceUnavailable"
        assert admin.s3_stats()["refused_down"] == before + 1
        time.sleep(1.6)
        assert requests.put(url, data=b"x", timeout=10).status_code == 200
        admin.s3_down(60)
        assert requests.put(url, data=b"x", timeout=10).status_code == 503
    finally:
        admin.s3_up()
    assert requests.put(url, data=b"x", timeout=10).status_code == 200
    admin.close()


def test_signature_check_is_sigv4_of_the_reference():
    # AWS's documented example (S3 API reference, "Authenticating Requests: Using Query
    # Parameters", GET /test.txt on examplebucket): the signature it publishes.
    params = [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"),
        ("X-Amz-Date", "20130524T000000Z"),
        ("X-Amz-Expires", "86400"),
        ("X-Amz-SignedHeaders", "host"),
    ]
    signature = presigned_signature(
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "GET",
        "/test.txt",
        params,
        {"host": "examplebucket.s3.amazonaws.com"},
        "20130524T000000Z",
        "20130524/us-east-1/s3/aws4_request",
        "host",
    )
    assert signature == "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"


def test_slow_knob_stores_the_object_then_answers_late(s3):
    key, url = _presigned_put(s3)
    admin = SimAdmin(
        vast_url="http://127.0.0.1:9", arkindex_url="http://127.0.0.1:9", s3_url=s3.url
    )
    before = admin.s3_stats()["slow_answers"]
    admin.s3_slow(1.5, times=1)
    with pytest.raises(requests.ReadTimeout):
        requests.put(url, data=b"stored anyway", timeout=0.5)
    assert admin.s3_stats()["slow_answers"] == before + 1
    body = s3.client().get_object(Bucket="test-bucket", Key=key)["Body"].read()
    assert body == b"stored anyway"
    started = time.monotonic()
    assert requests.put(url, data=b"x", timeout=10).status_code == 200  # times=1: used up
    assert time.monotonic() - started < 1.0
    admin.close()
