"""``/healthz`` and ``/metrics`` over HTTP, from a small threaded WSGI server.

It runs in its own threads, so a scrape is answered even while the daemon's loop is
busy — and ``/healthz`` can then say that the loop has stopped ticking.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

Health = Callable[[], tuple[bool, dict[str, Any]]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every 15 s would drown the daemon's own log


class StatusServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        self._metrics = make_wsgi_app(registry)
        self._health = health
        self._server = make_server(host, port, self._app, server_class=_Server, handler_class=_QuietHandler)
        self.address = f"{host}:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path in ("/healthz", "/health"):
            ok, details = self._health()
            body = json.dumps({"status": "ok" if ok else "unhealthy", **details}, default=str).encode()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        body = b"not found: try /healthz or /metrics\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
