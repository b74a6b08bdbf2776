"""Local stand-ins for the outside world: Vast.ai, Arkindex and S3.

The simulators are independent oracles: they import nothing from the agent's modules
(ponos_tasks.* outside this package), so a misreading of an API written once on each side
shows up as a failing test instead of passing on both. (`harness`, the admin client and the
local run that starts the agent's processes next to them, is the one exception: it drives
the agent through ponos_tasks.supervisor.)

All of it is the `sim` extra (`pip install 'ponos-vast[sim]'`); the agent never imports it.
"""
