"""The Arkindex simulator: the Ponos agent and worker endpoints of Arkindex, over real HTTP.

from ponos_tasks.simulators.arkindex import ArkindexSimulator
with ArkindexSimulator(farms={farm_id: seed}) as sim:   # starts its own S3 when no s3_url
    sim.url, sim.farm_id, sim.seed
"""

from ponos_tasks.simulators.arkindex.models import (
    AGENT_TRANSITIONS,
    TERMINAL_STATES,
    expected_derivation,
)
from ponos_tasks.simulators.arkindex.server import ArkindexSimulator

__all__ = ["AGENT_TRANSITIONS", "TERMINAL_STATES", "ArkindexSimulator", "expected_derivation"]
