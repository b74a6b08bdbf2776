"""No secret shown (issue 8, §2.10): every place a secret could reach, checked on one run.

The places: the task's published log, the agent's log lines (caplog, every logger, libraries
included), the messages of the exceptions the clients raise, and a Sentry event (captured by
a local transport: nothing leaves the process). The secrets: the seed, the Vast.ai API key,
the task token, the instance's own API key (`instance_api_key`, CONTAINER_API_KEY inside),
the registry password and the signature of the pre-signed log URL.
"""

import json
import logging
import re

import pytest
import sentry_sdk
from sentry_sdk.transport import Transport

from ponos_tasks.app import init_sentry
from ponos_tasks.arkindex import ArkindexAgentClient, ArkindexError, MemoryCredentialStore
from ponos_tasks.logs import install_log_scrubbing, redact, scrub_event, strip_url_queries
from ponos_tasks.vast import VastClient, VastError
from tests.agent_harness import Admin, Harness, make_context, wipe
from tests.conftest import free_port
from tests.fixtures_stack import running_stack

SIGNATURE = "d3adb33fd3adb33fd3adb33fd3adb33fd3adb33fd3adb33f"
REGISTRY_PASSWORD = "registry-pass-7x9"


def signed_url(port: int) -> str:
    return (
        f"http://127.0.0.1:{port}/ponos-logs/task.log?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Expires=3600&X-Amz-Signature={SIGNATURE}"
    )


class CaptureTransport(Transport):
    """Keeps the envelopes Sentry would send (serialized), sends nothing."""

    def __init__(self, options=None):
        super().__init__(options)
        self.sent: list[str] = []

    def capture_envelope(self, envelope):
        for item in envelope.items:
            self.sent.append(item.get_bytes().decode("utf-8", errors="replace"))


@pytest.fixture(scope="module")
def stack(redis_url):
    with running_stack(redis_url, 100.0) as stack:
        yield stack


@pytest.fixture
def ctx(stack, redis_url):
    context = make_context(
        stack,
        redis_url,
        sentry={"dsn": "http://publickey@127.0.0.1:9/1"},
        vast_api={
            "registries": [
                {
                    "host": "registry.example",
                    "username": "u",
                    "password": REGISTRY_PASSWORD,
                }
            ]
        },
    )
    yield context
    wipe(context)


@pytest.fixture
def sentry_capture():
    transports = []

    def start(config, **options):
        transport = CaptureTransport()
        transports.append(transport)
        if options.pop("plain", False):  # the init before the fix, for the control check
            sentry_sdk.init(dsn=config.sentry.dsn, transport=transport, **options)
        else:
            init_sentry(config, transport=transport, **options)
        return transport

    yield start
    sentry_sdk.init()  # no DSN: Sentry off again for the other tests


def upload_that_fails(client: ArkindexAgentClient, url: str, token: str) -> None:
    """A client call whose locals hold secrets (the signed URL, a log quoting the token)."""
    text = f"task output with token {token}\n"
    client.upload_logs(url, text)


def test_no_secret_in_log_lines_exceptions_published_log_or_sentry(
    ctx, stack, caplog, sentry_capture
):
    caplog.set_level(logging.DEBUG)
    admin = Admin(stack)
    command = (
        "sh -c 'echo ikey=$CONTAINER_API_KEY; echo token=$ARKINDEX_TASK_TOKEN; "
        f"echo seed={stack.seed}; exit 0'"
    )
    task_id = admin.one_task(
        command=command,
        env={"SIM_PULL_SECONDS": "5", "SIM_RUN_MODE": "local"},
    )
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: harness.done(task_id), timeout=60)
    [instance] = [i for i in admin.instances() if task_id in (i["label"] or "")]
    token = instance["env"]["ARKINDEX_TASK_TOKEN"]
    instance_key = instance["instance_api_key"]
    assert admin.task(task_id)["state"] == "completed"
    published = admin.task_log(task_id)
    assert "ikey=[REDACTED]" in published and "token=[REDACTED]" in published

    # Exceptions, and the retry lines they cause: a signed URL nobody answers (S3 down).
    client = ArkindexAgentClient(
        stack.arkindex_url, "farm", ctx.config.seed, MemoryCredentialStore(), max_wait=0.01
    )
    url = signed_url(free_port())
    messages = []
    transport = sentry_capture(ctx.config)
    try:
        upload_that_fails(client, url, token)
    except ArkindexError as error:
        messages.append(str(error))
        sentry_sdk.capture_exception(error)
    vast = VastClient(f"http://127.0.0.1:{free_port()}", "vast-key-xyz", max_attempts=2)
    try:
        vast.list_instances()
    except VastError as error:
        messages.append(str(error))
        sentry_sdk.capture_exception(error)
    sentry_sdk.flush()
    assert len(messages) == 2 and transport.sent
    assert any("Retrying" in r.getMessage() for r in caplog.records)  # tenacity's lines

    places = {
        "published log": published,
        "agent log lines": "\n".join(r.getMessage() for r in caplog.records) + caplog.text,
        "exception messages": "\n".join(messages),
        "sentry events": "\n".join(transport.sent),
    }
    secrets = {
        "seed": ctx.config.seed,
        "vast api key": ctx.config.vast_api.api_key,
        "task token": token,
        "instance key": instance_key,
        "registry password": REGISTRY_PASSWORD,
        "log URL signature": SIGNATURE,
    }
    shown = [
        f"{what} in {where}"
        for where, text in places.items()
        for what, value in secrets.items()
        if value in text
    ]
    assert shown == []


def test_sentry_event_without_local_variables_or_known_secrets(ctx, sentry_capture):
    """A client call whose locals hold a task token and a signed URL raises; the event
    captured through init_sentry holds neither; with the old init (locals on, no scrubber)
    the same event does (the check can fail)."""
    token = "task-token-0123456789"
    client = ArkindexAgentClient(
        "http://127.0.0.1:9/", "farm", ctx.config.seed, MemoryCredentialStore(), max_wait=0.01
    )
    url = signed_url(free_port())

    def capture(**options):
        transport = sentry_capture(ctx.config, **options)
        try:
            upload_that_fails(client, url, token)
        except ArkindexError as error:
            sentry_sdk.capture_exception(error)
        # A message quoting a secret the process handled (remembered by task_secrets).
        sentry_sdk.capture_message(f"seen {token} and {ctx.config.seed}")
        sentry_sdk.flush()
        return "\n".join(transport.sent)

    from ponos_tasks.logs import remember_secrets

    remember_secrets([token])
    before = capture(plain=True)
    assert token in before and SIGNATURE in before  # locals and message, unscrubbed
    after = capture()
    assert '"vars"' not in after
    for secret in (token, SIGNATURE, ctx.config.seed):
        assert secret not in after
    assert "[REDACTED]" in after


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "PUT https://s3.example/b/k?X-Amz-Signature=abc&x=1 failed",
            "https://s3.example/b/k?[REDACTED] failed",
        ),
        (
            "HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: /b/k?sig=1 (Caused",
            "url: /b/k?[REDACTED] (Caused",
        ),
        ("'http://h/p?q=1'", "'http://h/p?[REDACTED]'"),
        ("what? /x and a/b?c, no URL", "what? /x and a/b?c, no URL"),
        ("https://h/p#frag", "https://h/p#frag"),
    ],
)
def test_strip_url_queries(text, expected):
    assert expected in strip_url_queries(text)


def test_every_log_record_is_stripped(caplog):
    install_log_scrubbing()
    caplog.set_level(logging.INFO)
    logging.getLogger("urllib3.connectionpool").warning(
        "Retrying after connection broken by %r: %s", "X", "/key?X-Amz-Signature=" + SIGNATURE
    )
    assert SIGNATURE not in caplog.text and "/key?[REDACTED]" in caplog.text


def test_scrub_event_reaches_keys_lists_and_nested_values():
    event = {
        "exception": {"values": [{"value": f"token tok-secret-1 at https://h/x?s={SIGNATURE}"}]},
        "extra": {"tok-secret-1": ["a", ("b", "tok-secret-1")], "n": 3},
    }
    text = json.dumps(scrub_event(event, ["tok-secret-1"]))
    assert "tok-secret-1" not in text and SIGNATURE not in text and '"n": 3' in text
    assert redact("x", []) == "x" and re.search(r"\[REDACTED\]", text)
