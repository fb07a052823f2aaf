"""Prometheus metrics of the master process, served on its own /metrics port.

=================================== ========= ============ ==================================================
name                                type      labels       meaning
=================================== ========= ============ ==================================================
pstrain_jobs_pending                gauge     (none)       jobs waiting for workers and shards
pstrain_jobs_running                gauge     (none)       jobs training
pstrain_jobs_succeeded              gauge     (none)       jobs finished successfully (since the db was created)
pstrain_jobs_failed                 gauge     (none)       jobs that failed
pstrain_jobs_cancelled              gauge     (none)       jobs cancelled by users
pstrain_live_nodes                  gauge     role         registered nodes with a recent heartbeat (ps, worker)
pstrain_live_workers                gauge     job          workers still training the job (0 once it ended)
pstrain_job_step                    gauge     job          the job's global step (highest any worker reported)
pstrain_job_epoch                   gauge     job          the job's epoch
pstrain_job_loss                    gauge     job          the latest training loss a worker reported
pstrain_job_accuracy                gauge     job          the latest training accuracy a worker reported
pstrain_job_val_loss                gauge     job          validation loss (each epoch's and the final one)
pstrain_job_val_accuracy            gauge     job          validation accuracy (likewise)
pstrain_worker_step_time_seconds    gauge     job, worker  a worker's mean step time over its last report
                                                           (compare workers to spot stragglers)
pstrain_request_queue_depth         gauge     role         RPCs in progress in the master (role="master";
                                                           open WatchJob streams count)
pstrain_node_restarts_total         counter   role         nodes that registered again (same worker name or shard
                                                           address): restarted, or back after being declared lost
pstrain_worker_slot_moves_total     counter   job, worker  times a worker slot went to another process
                                                           (its process was lost, a new one joined, psctl scale)
=================================== ========= ============ ==================================================

One state per gauge (not a ``state`` label): labels are limited to job, shard,
worker and role. A job's series appear with its first value and are dropped once
``KEEP_ENDED_JOBS`` newer jobs have ended.

Usage::

    metrics = MasterMetrics()
    metrics.progress("job-000001", worker=0, step=120, epoch=1, loss=0.4, metrics={"accuracy": 0.9})
    address = metrics.serve("0.0.0.0", 9464)
"""
from __future__ import annotations

from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

from protos.observability import KEEP_ENDED_JOBS, ServiceMetrics  # noqa: F401

ROLE = "master"
NODE_ROLES = ("ps", "worker")
JOB_STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
# Report metrics (ProgressReport.metrics keys) -> their gauge.
_JOB_METRICS = {"accuracy": "pstrain_job_accuracy", "val_loss": "pstrain_job_val_loss",
                "val_accuracy": "pstrain_job_val_accuracy"}

ALL_METRICS = (
    *(f"pstrain_jobs_{state.lower()}" for state in JOB_STATES),
    "pstrain_live_nodes",
    "pstrain_live_workers",
    "pstrain_job_step",
    "pstrain_job_epoch",
    "pstrain_job_loss",
    "pstrain_job_accuracy",
    "pstrain_job_val_loss",
    "pstrain_job_val_accuracy",
    "pstrain_worker_step_time_seconds",
    "pstrain_request_queue_depth",
    "pstrain_worker_slot_moves_total",
    "pstrain_node_restarts_total",
)
HISTOGRAMS = ()


class MasterMetrics(ServiceMetrics):
    """The metric families of the master process (its own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        super().__init__(registry)
        r = self.registry
        self.jobs = {s: Gauge(f"pstrain_jobs_{s.lower()}", f"Jobs in state {s}.", registry=r) for s in JOB_STATES}
        self.live_nodes = Gauge("pstrain_live_nodes", "Registered nodes with a recent heartbeat.", ["role"],
                                registry=r)
        self.live_workers = Gauge("pstrain_live_workers", "Workers still training a job.", ["job"], registry=r)
        self.job_step = Gauge("pstrain_job_step", "A job's global step.", ["job"], registry=r)
        self.job_epoch = Gauge("pstrain_job_epoch", "A job's epoch.", ["job"], registry=r)
        self.job_loss = Gauge("pstrain_job_loss", "A job's latest training loss.", ["job"], registry=r)
        self._by_name = {
            name: Gauge(name, f"A job's latest {key.replace('_', ' ')}.", ["job"], registry=r)
            for key, name in _JOB_METRICS.items()
        }
        self.worker_step_time = Gauge("pstrain_worker_step_time_seconds",
                                      "A worker's mean step time over its last progress report.", ["job", "worker"],
                                      registry=r)
        self.queue_depth = Gauge("pstrain_request_queue_depth", "RPCs in progress in this process.", ["role"],
                                 registry=r)
        self._in_flight = self.queue_depth.labels(ROLE)
        self.node_restarts = Counter("pstrain_node_restarts", "Nodes that registered again (same worker name or "
                                     "shard address): restarted, or back after being declared lost.", ["role"],
                                     registry=r)
        for role in NODE_ROLES:
            self.node_restarts.labels(role)  # at 0 from the start
        self.slot_moves = Counter("pstrain_worker_slot_moves", "Times a worker slot went to another process.",
                                  ["job", "worker"], registry=r)

    def watch(self, job_counts: Callable[[], Mapping[str, int]], live_nodes: Callable[[str], int]) -> None:
        """Read the job and node gauges from the coordinator at each scrape: ``job_counts()``
        maps state names to job counts, ``live_nodes(role)`` counts a role's live nodes."""
        for state, gauge in self.jobs.items():
            gauge.set_function(lambda s=state: job_counts().get(s, 0))
        for role in NODE_ROLES:
            self.live_nodes.labels(role).set_function(lambda r=role: live_nodes(r))

    def restarted(self, role: str) -> None:
        self.node_restarts.labels(role).inc()

    def slots(self, job: str, workers) -> None:
        """A job's worker slots start with no moves (series at 0, so a rate is defined)."""
        for k in workers:
            self._child(job, self.slot_moves, (job, str(k)))

    def slot_moved(self, job: str, worker: int) -> None:
        self._child(job, self.slot_moves, (job, str(worker))).inc()

    def live(self, job: str, workers: int) -> None:
        self._child(job, self.live_workers, (job,)).set(workers)

    def progress(self, job: str, worker: int, step: int, epoch: int, loss: float | None = None,
                 metrics: Mapping[str, float] | None = None, step_time: float = 0.0) -> None:
        """A worker's progress report as the job now stands (``loss`` None: none reported)."""
        self._child(job, self.job_step, (job,)).set(step)
        self._child(job, self.job_epoch, (job,)).set(epoch)
        if loss is not None:
            self._child(job, self.job_loss, (job,)).set(loss)
        for key, value in (metrics or {}).items():
            name = _JOB_METRICS.get(key)
            if name is not None:
                self._child(job, self._by_name[name], (job,)).set(value)
        if step_time > 0:
            self._child(job, self.worker_step_time, (job, str(worker))).set(step_time)
