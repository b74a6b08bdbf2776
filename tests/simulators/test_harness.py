"""ponos_tasks.simulators.harness: the admin client against a real local stack, and a
LocalRun that stops everything it started."""

from __future__ import annotations

import shutil

import pytest
import requests

from ponos_tasks.simulators.harness import OVERRIDING_ENV, LocalRun, SimAdmin
from ponos_tasks.simulators.stack import redis_answers

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (a private Redis)"
)


def test_local_run_admin_client_and_stop(tmp_path):
    run = LocalRun(time_scale=50, logs_dir=tmp_path / "logs")
    with run:
        assert run.redis is not None and redis_answers(run.redis_url)
        assert run.redis_url.startswith("redis://127.0.0.1:")
        admin = run.admin
        assert isinstance(admin, SimAdmin)
        assert (admin.vast_url, admin.arkindex_url) == (run.stack.vast_url, run.stack.arkindex_url)

        ids = admin.process(
            "p",
            [
                {"slug": "a", "image": "registry.example/w:1"},
                {"slug": "b", "image": "registry.example/w:1", "parents": ["a"]},
            ],
        )
        assert list(ids) == ["a", "b"]
        one = admin.one_task()
        assert set(admin.tasks()) == {*ids.values(), one}
        assert admin.task(one)["slug"] == "task"
        assert admin.task_log(one) is None
        assert admin.accepted_agent_states(one) == [] == admin.refused_agent_states(one)

        admin.set_market({1: 0.2, 2: 0.1})
        assert sorted(o["machine_id"] for o in admin.offers()) == [1, 2]
        admin.faults({"fault": "create_lost", "label": "nobody", "times": 1})
        admin.clear_faults()
        assert admin.ledger() == [] and admin.instances() == [] and admin.events() == []
        assert admin.stats()["live_instances"] == 0
        assert admin.vast("ledger")["total_cost"] == 0

        config = run.agent_config(sync_interval=2, vast_api={"max_instances": 3})
        assert config["redis_url"] == run.redis_url
        assert config["vast_api"]["max_instances"] == 3
        assert config["vast_api"]["url"] == run.stack.vast_url
        assert run.agent_env == {name: "" for name in OVERRIDING_ENV}
        redis_url, vast_url, workdir = run.redis_url, run.stack.vast_url, run.workdir
    assert not redis_answers(redis_url)
    with pytest.raises(requests.ConnectionError):
        requests.get(vast_url + "/_sim/stats", timeout=2)
    assert not workdir.exists()


def test_admin_needs_urls():
    with pytest.raises(ValueError):
        SimAdmin()
