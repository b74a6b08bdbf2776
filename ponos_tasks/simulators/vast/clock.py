"""Simulated time: the real monotonic clock multiplied by `time_scale`.

`time_scale` is simulated seconds per real second, so at 20 a 60 s image pull takes 3 s.
Simulated time starts at 0 when the simulator is built; `epoch()` maps it onto wall-clock
seconds for fields that clients compare with `time.time()` (start_date).
"""

import time


class SimClock:
    def __init__(self, time_scale: float = 1.0):
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.time_scale = float(time_scale)
        self._mono0 = time.monotonic()
        self._wall0 = time.time()

    def now(self) -> float:
        """Simulated seconds since the simulator started."""
        return (time.monotonic() - self._mono0) * self.time_scale

    def epoch(self, sim_t: float) -> float:
        """Wall-clock epoch seconds for a simulated instant (real seconds, unscaled offset)."""
        return self._wall0 + sim_t / self.time_scale

    def real_seconds(self, sim_seconds: float) -> float:
        return sim_seconds / self.time_scale
