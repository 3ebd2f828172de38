"""Run the ingest API with uvicorn: in the foreground (``oversight ingest serve``), or in a thread
(tests, and any program that embeds it: :class:`IngestServer`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

from monitor.config import ConfigError, Settings
from monitor.ingest.app import IngestContext, build_context, create_app
from monitor.ops import listening_socket, serve_until_signalled, socket_url
from monitor.startup import open_store_answering
from monitor.store import Store

log = logging.getLogger(__name__)


def _uvicorn_config(app: Any, host: str, port: int) -> Any:
    import uvicorn

    # No proxy headers (nothing here trusts X-Forwarded-*), no server header.
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", proxy_headers=False, server_header=False, lifespan="off"
    )


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """``oversight ingest serve``: the API in the foreground until SIGTERM or Ctrl-C."""
    import uvicorn

    host = host or settings.ingest.host
    port = settings.ingest.port if port is None else port
    with listening_socket(host, port, "ingest.host/port") as sock:
        store = open_store_answering(settings.database, sock)
        ctx = build_context(settings, store=store)
        server = uvicorn.Server(_uvicorn_config(create_app(ctx), host, port))
        log.info("ingest API at %s/v1/episodes (hand-off: %s)", socket_url(sock), ctx.handoff.kind)
        try:
            if not serve_until_signalled(server, sock, "ingest-http"):
                raise ConfigError(f"ingest.host/port: cannot serve on {host}:{port}")
        finally:
            ctx.close()
            store.close()
        log.info("ingest API stopped")


class IngestServer:
    """The ingest API in a daemon thread, on ``ingest.host``/``ingest.port`` (port 0: a free one)::

    with IngestServer(settings).start() as srv:
        httpx.post(srv.url + "/v1/episodes", ...)
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        registry: CollectorRegistry | None = None,
        ctx: IngestContext | None = None,
    ):
        self.ctx = ctx if ctx is not None else build_context(settings, store=store, registry=registry)
        self.host = settings.ingest.host
        self._server = _server(create_app(self.ctx), self.host, settings.ingest.port)
        self._thread = threading.Thread(target=self._server.run, name="ingest-http", daemon=True)

    def start(self, timeout_s: float = 15.0) -> IngestServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.ctx.close()
                raise RuntimeError("the ingest server did not start (is the port free?)")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        for srv in getattr(self._server, "servers", []):
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.ctx.close()

    def __enter__(self) -> IngestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _server(app: Any, host: str, port: int) -> Any:
    import uvicorn

    return uvicorn.Server(_uvicorn_config(app, host, port))
