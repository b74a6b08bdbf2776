"""Settings for the pure tests: the product's defaults (from a minimal configuration), with
the values a test names. heartbeat_stale alone sets creating_stale and running_stale too."""

from ponos_tasks.config import AgentConfig
from ponos_tasks.settings import Settings

MINIMAL_CONFIG = {
    "url": "http://127.0.0.1:1",
    "farm_id": "00000000-0000-4000-8000-000000000000",
    "seed": "seed",
    "vast_api": {"api_key": "key"},
}


def settings_with(**values) -> Settings:
    if "heartbeat_stale" in values:
        values.setdefault("creating_stale", values["heartbeat_stale"])
        values.setdefault("running_stale", values["heartbeat_stale"])
    return Settings.from_config(AgentConfig.model_validate(MINIMAL_CONFIG)).but(**values)
