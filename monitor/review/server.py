"""Run the review app with uvicorn: on its own, or in a thread beside the pipeline.

The review service's ``/metrics`` (with ``/healthz`` and ``/readyz``) is served by a
listener of its own on ``review.metrics_host:review.metrics_port`` (default
127.0.0.1:9109), never on the public review port: queue depths per stream and login
counters are for Prometheus, not for whoever can reach the UI.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from monitor.config import ConfigError, Settings
from monitor.ops import (
    OpsServer,
    ReadinessCollector,
    listening_socket,
    quiet_accept_flood,
    serve_until_signalled,
    socket_url,
)
from monitor.startup import open_store_answering

log = logging.getLogger(__name__)


def start_metrics(app: Any, host: str, port: int) -> OpsServer:
    """Serve the review app's metrics registry on ``host:port`` (a daemon thread)."""
    ctx = app.state.review

    def ready() -> dict[str, bool]:
        return {"database": bool(ctx.store.ping())}

    ctx.metrics.registry.register(ReadinessCollector(ready))
    try:
        server = OpsServer(host, port, ctx.metrics.registry, ready).start()
    except OSError as e:
        raise ConfigError(f"review.metrics_host/metrics_port: cannot listen on {host}:{port}: {e.strerror}") from None
    log.info("review /metrics at %s/metrics", server.url)
    return server


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """``oversight serve``: the review app in the foreground, its metrics listener beside it."""
    import uvicorn

    from monitor.review.app import create_app

    host = host or settings.review.host
    port = settings.review.port if port is None else port
    with listening_socket(host, port, "review.host/port") as sock:
        store = open_store_answering(settings.database, sock)
        app = create_app(settings, store)
        metrics = start_metrics(app, settings.review.metrics_host, settings.review.metrics_port)
        log.info("review UI at %s/", socket_url(sock))
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", proxy_headers=False, server_header=False)
        )
        try:
            serve_until_signalled(server, sock, "review-http")
        finally:
            metrics.stop()
            store.close()
        log.info("review UI stopped")


class BackgroundServer:
    """uvicorn in a daemon thread (the embedded default runs review and pipeline in one process).

    With ``metrics=(host, port)`` the review metrics listener runs too (``oversight run --review``).
    """

    def __init__(self, app: Any, host: str, port: int, metrics: tuple[str, int] | None = None):
        import uvicorn

        # proxy_headers=False as `oversight serve` has it: uvicorn trusts X-Forwarded-For from
        # 127.0.0.1 by default, so a client over a tunnel or port-forward chose the address login
        # throttling counts by (review.trusted_proxies is the one way to trust a proxy).
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", server_header=False, lifespan="off", proxy_headers=False
        )
        self._server = uvicorn.Server(config)
        quiet_accept_flood()
        self._thread = threading.Thread(target=self._server.run, name="review-http", daemon=True)
        self._app = app
        self._metrics_listen = metrics
        self.metrics: OpsServer | None = None
        self.host = host

    def start(self, timeout_s: float = 15.0) -> BackgroundServer:
        if self._metrics_listen is not None:
            self.metrics = start_metrics(self._app, *self._metrics_listen)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                if self.metrics is not None:
                    self.metrics.stop()
                raise RuntimeError("the review server did not start (is the port free?)")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        servers = getattr(self._server, "servers", [])
        for srv in servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self.metrics is not None:
            self.metrics.stop()
