"""VastSimulator: the HTTP server in a thread plus a ticker for local processes and events."""

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
        churn: bool = False,
        faults: list[dict] | tuple = (),
        access_log: bool = False,
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
            churn=churn,
            faults=faults,
            url_getter=lambda: self.url,
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
