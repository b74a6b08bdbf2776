"""Pure parts of the Vast.ai client: error bodies, Retry-After, typed results, retry decisions.

Everything that talks HTTP is in test_vast_client.py, against the simulator.
"""

import email.utils
import json
import socket
import time

import pytest
import requests

from ponos_tasks.vast import (
    CreatedInstance,
    Instance,
    Offer,
    VastClient,
    VastError,
    VastRateLimited,
    VastServerError,
    _never_sent,
    parse_error_body,
    parse_retry_after,
)


@pytest.mark.parametrize(
    ("text", "content_type", "error", "msg"),
    [
        (
            '{"success": false, "error": "invalid_args", "msg": "bad id"}',
            "application/json",
            "invalid_args",
            "bad id",
        ),
        (
            '{"error": "invalid_request", "msg": "Invalid json body"}',
            "application/json",
            "invalid_request",
            "Invalid json body",
        ),
        ('{"message": "only message"}', "application/json", None, "only message"),
        (
            '{"detail": "API requests too frequent endpoint threshold=4.5"}',
            "application/json",
            None,
            "API requests too frequent endpoint threshold=4.5",
        ),
        (
            '{"success": false, "error": "rate_limit_exceeded", "msg": "API requests too frequent '
            'endpoint threshold=3.0"}',
            "application/json",
            "rate_limit_exceeded",
            "API requests too frequent endpoint threshold=3.0",
        ),
        (
            '{"msg": "error 404/3603: no_such_ask Instance type by id 1234567 is not available."}',
            "application/json",
            "no_such_ask",
            "error 404/3603: no_such_ask Instance type by id 1234567 is not available.",
        ),
        (
            '{"msg": "error 400/3467: Invalid args: id is required"}',
            "application/json",
            None,
            "error 400/3467: Invalid args: id is required",
        ),
        ('{"error": "invalid_token"}', "application/json", "invalid_token", "invalid_token"),
        (
            '{"detail": [{"loc": ["body"], "msg": "bad"}]}',
            "application/json",
            None,
            '[{"loc": ["body"], "msg": "bad"}]',
        ),
        ("API requests too frequent", "text/plain", None, "API requests too frequent"),
        # JSON-looking text served as text/plain is still understood
        (
            '{"error": "auth_error", "msg": "Invalid user key"}',
            "text/plain",
            "auth_error",
            "Invalid user key",
        ),
        (
            "<html><head><title>502 Bad Gateway</title></head><body><h1>502</h1></body></html>",
            "text/html",
            None,
            "502 Bad Gateway",
        ),
        (
            "<html><body><script>x()</script><h1>Service\n  Unavailable</h1></body></html>",
            "text/html; charset=utf-8",
            None,
            "Service Unavailable",
        ),
        ("", "text/plain", None, "(empty body)"),
        ("not json {", "application/json", None, "not json {"),
    ],
)
def test_parse_error_body_shapes(text, content_type, error, msg):
    assert parse_error_body(text, content_type) == (error, msg)


def test_parse_error_body_truncates_long_messages():
    _, msg = parse_error_body("x" * 5000, "text/plain")
    assert len(msg) <= 300 and msg.endswith("…")


def test_parse_retry_after():
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_rate_limited_retryable_rules():
    assert VastRateLimited("x", status=429).retryable
    assert VastRateLimited("x", status=429, retry_after=60).retryable
    assert not VastRateLimited("x", status=429, retry_after=61).retryable
    assert not VastRateLimited("x", status=429, error="search_quota_exceeded").retryable
    assert VastServerError("x", status=503).retryable
    assert not VastServerError("x", status=500).retryable
    assert not VastError("x", status=400).retryable


def test_error_message_carries_status_code_and_context():
    exc = VastError(
        "Instance 3 not found.",
        status=404,
        error="no_such_instance",
        context="DELETE /api/v0/instances/3/",
    )
    assert (
        str(exc) == "DELETE /api/v0/instances/3/ HTTP 404 no_such_instance: Instance 3 not found."
    )
    assert (exc.status, exc.error, exc.msg) == (404, "no_such_instance", "Instance 3 not found.")


def test_offer_tolerates_unknown_and_missing_fields():
    offer = Offer.from_dict(
        {
            "id": 42,
            "machine_id": "7",
            "gpu_name": "RTX 4090 ",
            "num_gpus": 1,
            "gpu_ram": 24564,
            "dph_total": "0.35",
            "reliability2": 0.99,
            "geolocation": "Bulgaria, BG\n",
            "brand_new_field": {"x": 1},
        }
    )
    assert offer.id == 42 and offer.machine_id == 7 and offer.host_id is None
    assert offer.gpu_name == "RTX 4090" and offer.geolocation == "Bulgaria, BG"
    assert offer.dph_total == 0.35 and offer.reliability == 0.99
    assert offer.cuda_max_good is None and offer.disk_space is None
    assert offer.raw["brand_new_field"] == {"x": 1}
    with pytest.raises(AttributeError):
        offer.id = 1  # frozen


def test_instance_strips_strings_converts_env_and_keeps_unknown_status():
    row = {
        "id": 9,
        "label": "ponos-abc-1",
        "machine_id": 3,
        "actual_status": "hibernating",
        "intended_status": "running",
        "cur_state": "running",
        "next_state": "running",
        "status_msg": "Error response from daemon: OCI runtime create failed: x\n",
        "public_ipaddr": "1.2.3.4\n",
        "local_ipaddrs": "10.0.0.5 172.17.0.2\n",
        "extra_env": [["PONOS_TASK", "abc"], ["-p 8080:8080", "1"], ["broken"], ["N", None]],
        "start_date": 1700000000.5,
        "dph_total": 0.4,
        "something_new": 1,
    }
    inst = Instance.from_dict(row)
    assert inst.actual_status == "hibernating"  # unknown status kept, no crash
    assert inst.public_ipaddr == "1.2.3.4"
    assert inst.raw["local_ipaddrs"] == "10.0.0.5 172.17.0.2"
    assert inst.env == {"PONOS_TASK": "abc", "-p 8080:8080": "1", "N": ""}
    assert inst.raw["extra_env"] == inst.env
    assert inst.status_msg_is_fatal
    assert inst.start_date == 1700000000.5 and inst.raw["something_new"] == 1
    assert row["public_ipaddr"] == "1.2.3.4\n"  # the input is not modified
    bare = Instance.from_dict({"id": "10"})
    assert bare.id == 10 and bare.label is None and bare.actual_status is None
    assert bare.env == {} and not bare.status_msg_is_fatal
    # What the agent stores (to_dict, as JSON) reads back whole without cleaning it again.
    stored = Instance.from_stored(json.loads(json.dumps(inst.to_dict())))
    assert stored == inst and stored.raw == inst.raw and stored.env == inst.env
    assert stored.public_ipaddr == "1.2.3.4" and stored.status_msg_is_fatal


def test_created_instance_hides_the_instance_key_from_repr():
    created = CreatedInstance(id=5, instance_api_key="secret-instance-key", started=True)
    assert "secret-instance-key" not in repr(created)


def test_never_sent_distinguishes_refused_connections_from_lost_answers():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(requests.ConnectionError) as refused:
        requests.put(f"http://127.0.0.1:{port}/", data="{}", timeout=2)
    assert _never_sent(refused.value)
    lost = requests.ConnectionError(
        requests.packages.urllib3.exceptions.ProtocolError(
            "Connection aborted.", ConnectionResetError()
        )
    )
    assert not _never_sent(lost)
    assert not _never_sent(requests.ReadTimeout("read timed out"))
    assert _never_sent(requests.ConnectTimeout("connect timed out"))


def test_client_repr_and_errors_never_show_the_key():
    client = VastClient("http://127.0.0.1:9/", "super-secret-key")
    assert "super-secret-key" not in repr(client)
    assert client._scrub("echo super-secret-key back") == "echo *** back"
