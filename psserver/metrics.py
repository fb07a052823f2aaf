"""Prometheus metrics of a parameter-server process, served on its own /metrics port.

=================================== ========= =========== ===================================================
name                                type      labels      meaning
=================================== ========= =========== ===================================================
pstrain_shard_variable_bytes        gauge     job, shard  bytes of the variables the shard holds
pstrain_shard_version               gauge     job, shard  updates applied so far (sync: completed steps)
pstrain_apply_duration_seconds      histogram job, shard  applying one update (sync: averaging the step's
                                                          gradients, then the optimizer)
pstrain_gradient_staleness          histogram job, shard  async/ssp: versions the shard moved on between a
                                                          worker's last pull and its push being applied
pstrain_sync_barrier_wait_seconds   histogram job, shard  sync: a step's first push until its barrier completes
pstrain_received_bytes_total        counter   job, role   serialized requests received (role="ps")
pstrain_sent_bytes_total            counter   job, role   serialized responses sent (role="ps")
pstrain_request_queue_depth         gauge     role        RPCs in progress in this process (role="ps")
pstrain_rejected_requests_total     counter   job, shard  pushes and pulls refused, every reason
pstrain_rejected_<reason>_total     counter   job, shard  the same, one counter per reason in REJECT_REASONS
=================================== ========= =========== ===================================================

Requests over the gRPC message limit are refused by gRPC before the servicer sees
them, so ``oversize`` counts only responses the shard refused to send (a pull whose
parameters exceed ``PSTRAIN_MAX_MESSAGE_BYTES``); the client's error reports the rest.

Every process has its own registry (tests run several servers in one process). A
job's series exist from ``InitShard`` on, all at zero, so dashboards see them before
the first event; they are dropped once ``KEEP_ENDED_JOBS`` newer jobs have ended.

Usage::

    metrics = PSMetrics()
    shard_metrics = metrics.shard("job-000001", 0)   # a Shard's observer
    address = metrics.serve("0.0.0.0", 0)            # "host:port" to register with the master
"""
from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.observability import KEEP_ENDED_JOBS, ServiceMetrics  # noqa: F401

ROLE = "ps"
REJECT_REASONS = (
    "unknown_variable", "shape", "dtype", "non_finite",  # the push's contents (pstrain.runtime.store)
    "unknown_worker", "stale_step", "out_of_order", "bad_step", "bad_weight",  # who sent it, when (psserver.shard)
    "bad_min_version",  # a pull for a version far beyond the shard's (psserver.shard)
    "oversize",  # a response over the gRPC message limit (psserver.service)
)
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0, 60.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)

ALL_METRICS = (
    "pstrain_shard_variable_bytes",
    "pstrain_shard_version",
    "pstrain_apply_duration_seconds",
    "pstrain_gradient_staleness",
    "pstrain_sync_barrier_wait_seconds",
    "pstrain_received_bytes_total",
    "pstrain_sent_bytes_total",
    "pstrain_request_queue_depth",
    "pstrain_rejected_requests_total",
    *(f"pstrain_rejected_{reason}_total" for reason in REJECT_REASONS),
)
HISTOGRAMS = ("pstrain_apply_duration_seconds", "pstrain_gradient_staleness", "pstrain_sync_barrier_wait_seconds")


class ShardMetrics:
    """One shard's series: what ``psserver.shard.Shard`` reports as it works."""

    def __init__(self, metrics: PSMetrics, job: str, shard: int):
        labels = (job, str(shard))
        child = functools.partial(metrics._child, job)
        self._apply = child(metrics.apply_duration, labels)
        self._staleness = child(metrics.staleness, labels)
        self._barrier = child(metrics.barrier_wait, labels)
        self._version = child(metrics.version, labels)
        self._variable_bytes = child(metrics.variable_bytes, labels)
        self._rejected = child(metrics.rejected, labels)
        self._by_reason = {r: child(c, labels) for r, c in metrics.rejected_by_reason.items()}

    def held(self, nbytes: int, version: int) -> None:
        self._variable_bytes.set(nbytes)
        self._version.set(version)

    def applied(self, seconds: float, version: int) -> None:
        self._apply.observe(seconds)
        self._version.set(version)

    def stale(self, versions: int) -> None:
        self._staleness.observe(versions)

    def barrier(self, seconds: float) -> None:
        self._barrier.observe(seconds)

    def rejected(self, reason: str) -> None:
        self._rejected.inc()
        counter = self._by_reason.get(reason)
        if counter is not None:
            counter.inc()


class PSMetrics(ServiceMetrics):
    """The metric families of one parameter-server process (its own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        super().__init__(registry)
        r = self.registry
        js = ["job", "shard"]
        self.variable_bytes = Gauge("pstrain_shard_variable_bytes", "Bytes of the variables a shard holds.", js,
                                    registry=r)
        self.version = Gauge("pstrain_shard_version", "Updates a shard has applied (sync: completed steps).", js,
                             registry=r)
        self.apply_duration = Histogram("pstrain_apply_duration_seconds", "Time to apply one update to a shard.", js,
                                        buckets=DURATION_BUCKETS, registry=r)
        self.staleness = Histogram(
            "pstrain_gradient_staleness",
            "Async/SSP: versions a shard moved on between a worker's pull and its gradient being applied.",
            js, buckets=STALENESS_BUCKETS, registry=r,
        )
        self.barrier_wait = Histogram("pstrain_sync_barrier_wait_seconds",
                                      "Sync: time from a step's first push until its barrier completes.", js,
                                      buckets=DURATION_BUCKETS, registry=r)
        self.received_bytes = Counter("pstrain_received_bytes_total", "Serialized request bytes received.",
                                      ["job", "role"], registry=r)
        self.sent_bytes = Counter("pstrain_sent_bytes_total", "Serialized response bytes sent.", ["job", "role"],
                                  registry=r)
        self.queue_depth = Gauge("pstrain_request_queue_depth", "RPCs in progress in this process.", ["role"],
                                 registry=r)
        self.rejected = Counter("pstrain_rejected_requests_total", "Requests a shard refused, every reason.", js,
                                registry=r)
        self.rejected_by_reason = {
            reason: Counter(f"pstrain_rejected_{reason}_total", f"Requests a shard refused: {reason}.", js, registry=r)
            for reason in REJECT_REASONS
        }
        self._in_flight = self.queue_depth.labels(ROLE)

    def shard(self, job: str, shard: int) -> ShardMetrics:
        """The observer of a new shard; creates all its series (at zero)."""
        self._child(job, self.received_bytes, (job, ROLE))
        self._child(job, self.sent_bytes, (job, ROLE))
        return ShardMetrics(self, job, shard)

    def transferred(self, job: str, received: int, sent: int) -> None:
        """Count one RPC's serialized request and response sizes."""
        self._child(job, self.received_bytes, (job, ROLE)).inc(received)
        self._child(job, self.sent_bytes, (job, ROLE)).inc(sent)


