"""Fixtures for the Arkindex simulator tests: one S3 server per module, one simulator per test."""

import pytest

from ponos_tasks.simulators.arkindex import ArkindexSimulator
from ponos_tasks.simulators.s3 import S3Server


@pytest.fixture(scope="module")
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture
def sim(s3_server):
    with ArkindexSimulator(s3_url=s3_server.url) as simulator:
        yield simulator
