"""VastSimulator: the HTTP server in a thread plus a ticker for local processes and events.

Every knob defaults to how Vast.ai behaves (docs/reference.md §1.5 gives each default and the
public fact behind it); tests speed the clock up (`time_scale`) or pick a short but realistic
value, they do not switch the behaviour off:

- `log_delay` (3 s): median delay before a request_logs result_url can be read; with
  probability `log_tail_p` (0.05) the delay is minutes instead (30–300 s).
- `log_default_tail` (1000): lines a request_logs without `tail` answers (None: all).
- `select_filters` (True): the v1 instance list applies `select_filters` (False: refuses any,
  400, as an API that dropped them would; the flat sync then cannot work).
- `read_lag` (5 s): a new instance is missing from show/list for up to this long.
- `stop_delay` ((2, 8) s): a stop takes effect that long after the call.
- `restart_delay` (20 s): an exited container (intended running) restarts after it, doubling
  at each restart in a row up to 5 minutes.
- `image_sizes` ({}): image -> GB for the pull model (else images.py's per-image default);
  `cached_images` (()): images every host already has (a ~30 s start instead of a pull).
- `search_quota` (10 000): searches per key per simulated UTC day.
- `rate_limits` (True): minimum intervals, create's penalty, search's burst and quota.
- `slow_cheap_hosts` (0): the cheapest fraction of the machines ($/GPU/h) get a slow line
  (inet_down 20–100 Mbit/s) and a reliability of 0.70–0.90: a market where the cheapest
  hosts pull slowly and fail often (benchmarks/market.py).
- `reliability_failures` (0): a start fails with probability this × (1 − the machine's
  reliability) (an OCI error at once, or a pull that stalls part way), and a host that
  started the task may go down mid-run for good (rate this × −ln(reliability) per hour of
  running; `host_down`); 1 reads Vast.ai's reliability (its historical uptime) as the
  chance a start works and the chance the host stays up through an hour of running. Off by default so that a test's outcome does not
  depend on the draw; a test of start failures injects its faults by label instead.
"""

import threading

from werkzeug.serving import WSGIRequestHandler, make_server

from ponos_tasks.simulators.vast.server import create_app
from ponos_tasks.simulators.vast.state import VastState

TICK_SECONDS = 0.05  # real seconds between two background advances


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


class VastSimulator:
    """A Vast.ai API on loopback. `time_scale` = simulated seconds per real second."""

    def __init__(
        self,
        seed: int = 0,
        time_scale: float = 20.0,
        api_key: str = "sim-key",
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limits: bool = True,
        run_mode: str = "scripted",
        log_delay: float = 3.0,
        log_tail_p: float = 0.05,
        log_default_tail: int | None = 1000,
        select_filters: bool = True,
        read_lag: float = 5.0,
        stop_delay: tuple = (2.0, 8.0),
        restart_delay: float = 20.0,
        image_sizes: dict | None = None,
        cached_images: tuple | list = (),
        search_quota: int | None = 10_000,
        churn: bool = False,
        faults: list[dict] | tuple = (),
        access_log: bool = False,
        slow_cheap_hosts: float = 0.0,
        reliability_failures: float = 0.0,
    ):
        if run_mode not in ("scripted", "local"):
            raise ValueError("run_mode must be 'scripted' or 'local'")
        self.host = host
        self.port = port
        self.api_key = api_key
        self.state = VastState(
            seed=seed,
            time_scale=time_scale,
            api_key=api_key,
            rate_limits=rate_limits,
            run_mode=run_mode,
            log_delay=log_delay,
            log_tail_p=log_tail_p,
            log_default_tail=log_default_tail,
            select_filters=select_filters,
            read_lag=read_lag,
            stop_delay=stop_delay,
            restart_delay=restart_delay,
            image_sizes=image_sizes,
            cached_images=cached_images,
            search_quota=search_quota,
            churn=churn,
            faults=faults,
            url_getter=lambda: self.url,
            slow_cheap_hosts=slow_cheap_hosts,
            reliability_failures=reliability_failures,
        )
        self.app = create_app(self.state)
        self._server = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._handler = WSGIRequestHandler if access_log else _QuietHandler

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "VastSimulator":
        self._server = make_server(
            self.host, self.port, self.app, threaded=True, request_handler=self._handler
        )
        self.port = self._server.server_port
        serve = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True, name="vast-sim-http"
        )
        ticker = threading.Thread(target=self._tick, daemon=True, name="vast-sim-ticker")
        self._threads = [serve, ticker]
        for thread in self._threads:
            thread.start()
        return self

    def _tick(self) -> None:
        while not self._stopping.wait(TICK_SECONDS):
            self.state.tick()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        with self.state.lock:
            self.state.fleet.shutdown()

    def __enter__(self) -> "VastSimulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
