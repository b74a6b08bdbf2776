"""Local stand-ins for the outside world: Vast.ai, Arkindex and S3.

The simulators are independent oracles: they import nothing from the agent's modules
(ponos_tasks.* outside this package), so a misreading of an API written once on each side
shows up as a failing test instead of passing on both.
"""
