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
import inspect
import socket
import threading

from prometheus_client import CollectorRegistry, start_http_server

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
        others scrape: ``advertise_host`` or ``host`` (this machine's name for a wildcard)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.http_server = server
        if not advertise_host and host in ("", "0.0.0.0", "::", "[::]"):
            advertise_host = socket.gethostname()
        return f"{advertise_host or host}:{server.server_port}"


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
