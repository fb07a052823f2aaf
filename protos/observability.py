"""What every service's metrics share: a per-process registry, per-job series that go
away once enough newer jobs have ended, the /metrics HTTP server, and RPC in-flight
counting (pstrain_request_queue_depth).

Usage (a service's metrics.py)::

    class PSMetrics(ServiceMetrics):
        def __init__(self, registry=None):
            super().__init__(registry)
            self.steps = Counter(..., registry=self.registry)
"""
from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import inspect
import os
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

KEEP_ENDED_JOBS = 10  # ended jobs whose series are still exported


class ServiceMetrics:
    """Base of MasterMetrics, PSMetrics and WorkerMetrics. Subclasses set
    ``self._in_flight`` (a gauge child) if they count RPCs."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.http_server = None
        self._series: dict[str, set] = {}  # job -> (metric, label values) it created
        self._ended: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()

    def _child(self, job: str, metric, labels: tuple):
        """``metric.labels(*labels)``, remembered so the series goes when ``job`` does."""
        with self._lock:
            self._series.setdefault(job, set()).add((metric, labels))
        return metric.labels(*labels)

    def end_job(self, job: str) -> None:
        """The job ended; its series go once KEEP_ENDED_JOBS newer jobs have ended."""
        with self._lock:
            if job in self._ended:
                return
            self._ended.append(job)
            while len(self._ended) > KEEP_ENDED_JOBS:
                for metric, labels in self._series.pop(self._ended.popleft(), ()):
                    metric.remove(*labels)

    def track(self, servicer):
        """Make ``servicer``'s RPC methods count themselves in pstrain_request_queue_depth."""
        return track_in_flight(servicer, self._in_flight)

    def serve(self, host: str, port: int, advertise_host: str = "") -> str:
        """Serve /metrics on ``host:port`` (0 picks a free port); returns the address
        others scrape: ``advertise_host`` or ``host`` (this machine's name for a wildcard).
        Only /metrics answers; with ``PSTRAIN_METRICS_TOKEN`` (or ``_FILE``) set, only to
        ``Authorization: Bearer <token>``."""
        server = serve_metrics(self.registry, host, port, metrics_token())
        self.http_server = server
        if not advertise_host and host in ("", "0.0.0.0", "::", "[::]"):
            advertise_host = socket.gethostname()
        return f"{advertise_host or host}:{server.server_port}"


def metrics_token() -> str:
    """The bearer token /metrics requires ("" = none): ``PSTRAIN_METRICS_TOKEN`` or the
    file ``PSTRAIN_METRICS_TOKEN_FILE`` names."""
    token = os.environ.get("PSTRAIN_METRICS_TOKEN", "")
    path = os.environ.get("PSTRAIN_METRICS_TOKEN_FILE", "")
    if not token and path:
        try:
            with open(path) as f:
                token = f.read()
        except OSError as exc:
            raise ValueError(f"cannot read the metrics token from {path}: {exc.strerror}") from None
    return token.strip()


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes every few seconds: not worth a log line each
        pass


def metrics_app(registry: CollectorRegistry, token: str = ""):
    """The WSGI app behind /metrics: the registry's exposition at /metrics only, and with
    ``token``, only to ``Authorization: Bearer <token>`` (compared in constant time)."""
    exposition = make_wsgi_app(registry)
    digest = hashlib.sha256(token.encode()).digest() if token else b""

    def app(environ, start_response):
        if environ.get("PATH_INFO", "") not in ("/metrics", "/metrics/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"pstrain serves /metrics only\n"]
        if digest:
            given = environ.get("HTTP_AUTHORIZATION", "")
            presented = given[len("Bearer "):].strip() if given.startswith("Bearer ") else ""
            if not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), digest):
                start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
                return [b"/metrics needs Authorization: Bearer <the metrics token>\n"]
        return exposition(environ, start_response)

    return app


def serve_metrics(registry: CollectorRegistry, host: str, port: int, token: str = "") -> WSGIServer:
    """Start the /metrics HTTP server in a daemon thread; returns it (``server_port``)."""
    server_class = _MetricsServer
    if ":" in host:  # an IPv6 address
        server_class = type("_MetricsServer6", (_MetricsServer,), {"address_family": socket.AF_INET6})
    server = make_server(host, port, metrics_app(registry, token), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="pstrain-metrics", daemon=True).start()
    return server


def track_in_flight(servicer, gauge):
    """Wrap each RPC method of a gRPC servicer (CamelCase names) so ``gauge`` counts the
    calls in progress, streaming ones until their stream ends; returns ``servicer``."""

    def wrap(method):
        @functools.wraps(method)
        def call(request, context):
            with gauge.track_inprogress():
                result = method(request, context)
            return stream(result) if inspect.isgenerator(result) else result

        def stream(results):
            with gauge.track_inprogress():
                yield from results

        return call

    for name, method in inspect.getmembers(servicer, inspect.ismethod):
        if name[:1].isupper():
            setattr(servicer, name, wrap(method))
    return servicer
