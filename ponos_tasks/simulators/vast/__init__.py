"""Vast.ai simulator: a real HTTP server faithful to reference/vast-api.md (see §11).

    from ponos_tasks.simulators.vast import VastSimulator
    with VastSimulator(seed=0, time_scale=20.0) as sim:
        sim.url  # "http://127.0.0.1:PORT"
"""

from ponos_tasks.simulators.vast.simulator import VastSimulator

__all__ = ["VastSimulator"]
