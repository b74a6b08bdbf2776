"""Vast.ai simulator: a real HTTP server faithful to the Vast.ai API as docs/reference.md §1
describes it.

    from ponos_tasks.simulators.vast import VastSimulator
    with VastSimulator(seed=0, time_scale=20.0) as sim:
        sim.url  # "http://127.0.0.1:PORT"

Modules: clock (simulated time), market (seeded offers), query (search evaluation),
instances (status fields on simulated time, billing), localrun (local subprocesses),
render (instance JSON), faults (knobs), ratelimit (minimum intervals), state (the operations
under one lock, the rate limits under their own), server (Flask routes and /_sim/ admin
API), simulator (VastSimulator), cli (`ponos-vast sim vast`).

Scripted instances read SIM_DURATION, SIM_LOG_LINES, SIM_EXIT_CODE, SIM_FINAL_LINES,
SIM_SELF_STOP, SIM_PULL_SECONDS, SIM_IMAGE_SIZE_GB and SIM_RUN_MODE from their env (see
instances.py). The defaults are as slow and strict as Vast.ai (simulator.py lists the knobs;
docs/reference.md §1.5 gives each default and the public fact behind it); images (image sizes,
host caches, pull times) is in images.py.
"""

from ponos_tasks.simulators.vast.simulator import VastSimulator

__all__ = ["VastSimulator"]
