"""Prometheus metrics of a worker process, served on its own /metrics port.

=================================== ========= ============ ==================================================
name                                type      labels       meaning
=================================== ========= ============ ==================================================
pstrain_steps_total                 counter   job, worker  training steps done
pstrain_samples_total               counter   job, worker  training examples processed
pstrain_loss                        gauge     job, worker  mean training loss since the last progress report
pstrain_accuracy                    gauge     job, worker  training accuracy since the last progress report
pstrain_val_loss                    gauge     job, worker  validation loss (each epoch's evaluation and the
                                                           final one; only the evaluating worker)
pstrain_val_accuracy                gauge     job, worker  validation accuracy (likewise)
pstrain_step_duration_seconds       histogram job, worker  one step: compute, then push and pull
pstrain_push_duration_seconds       histogram job, worker  a step's push+pull round trip to all shards
pstrain_pull_duration_seconds       histogram job, worker  the pulls outside steps (start, final evaluation)
pstrain_sent_bytes_total            counter   job, role    serialized push requests sent (role="worker")
pstrain_received_bytes_total        counter   job, role    serialized push and pull responses (role="worker")
=================================== ========= ============ ==================================================

Every process has its own registry. A job's counters and histograms exist (at zero)
from the start of its task; its gauges from their first value. Series are dropped
once ``KEEP_ENDED_JOBS`` newer jobs have ended.

Usage::

    metrics = WorkerMetrics()
    task_metrics = metrics.task("job-000001", 0)
    task_metrics.step(0.012, samples=32)
    address = metrics.serve("0.0.0.0", 0)   # "host:port" to register with the master
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.observability import KEEP_ENDED_JOBS, ServiceMetrics  # noqa: F401

ROLE = "worker"
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0)

ALL_METRICS = (
    "pstrain_steps_total",
    "pstrain_samples_total",
    "pstrain_loss",
    "pstrain_accuracy",
    "pstrain_val_loss",
    "pstrain_val_accuracy",
    "pstrain_step_duration_seconds",
    "pstrain_push_duration_seconds",
    "pstrain_pull_duration_seconds",
    "pstrain_sent_bytes_total",
    "pstrain_received_bytes_total",
)
HISTOGRAMS = ("pstrain_step_duration_seconds", "pstrain_push_duration_seconds", "pstrain_pull_duration_seconds")


class TaskMetrics:
    """One job's series on this worker (what ``worker.task.TrainingTask`` records)."""

    def __init__(self, metrics: WorkerMetrics, job: str, worker: int):
        self._m, self._job = metrics, job
        self._labels = (job, str(worker))
        child = self._child
        self._steps, self._samples = child(metrics.steps), child(metrics.samples)
        self._step_time = child(metrics.step_duration)
        self._push_time, self._pull_time = child(metrics.push_duration), child(metrics.pull_duration)
        self._sent = metrics._child(job, metrics.sent_bytes, (job, ROLE))
        self._received = metrics._child(job, metrics.received_bytes, (job, ROLE))

    def _child(self, metric):
        return self._m._child(self._job, metric, self._labels)

    def step(self, seconds: float, samples: int) -> None:
        self._steps.inc()
        self._samples.inc(samples)
        self._step_time.observe(seconds)

    def push(self, seconds: float) -> None:
        self._push_time.observe(seconds)

    def pull(self, seconds: float) -> None:
        self._pull_time.observe(seconds)

    def transferred(self, sent: int = 0, received: int = 0) -> None:
        self._sent.inc(sent)
        self._received.inc(received)

    def train(self, loss: float, accuracy: float | None) -> None:
        self._child(self._m.loss).set(loss)
        if accuracy is not None:
            self._child(self._m.accuracy).set(accuracy)

    def validation(self, loss: float, accuracy: float) -> None:
        self._child(self._m.val_loss).set(loss)
        self._child(self._m.val_accuracy).set(accuracy)

    def end(self) -> None:
        self._m.end_job(self._job)


class WorkerMetrics(ServiceMetrics):
    """The metric families of one worker process (its own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        super().__init__(registry)
        r = self.registry
        jw = ["job", "worker"]
        self.steps = Counter("pstrain_steps_total", "Training steps done.", jw, registry=r)
        self.samples = Counter("pstrain_samples_total", "Training examples processed.", jw, registry=r)
        self.loss = Gauge("pstrain_loss", "Mean training loss since the last progress report.", jw, registry=r)
        self.accuracy = Gauge("pstrain_accuracy", "Training accuracy since the last progress report.", jw,
                              registry=r)
        self.val_loss = Gauge("pstrain_val_loss", "Loss on the validation data at the last evaluation.", jw,
                              registry=r)
        self.val_accuracy = Gauge("pstrain_val_accuracy", "Accuracy on the validation data at the last evaluation.",
                                  jw, registry=r)
        self.step_duration = Histogram("pstrain_step_duration_seconds", "One training step: compute, push and pull.",
                                       jw, buckets=DURATION_BUCKETS, registry=r)
        self.push_duration = Histogram("pstrain_push_duration_seconds",
                                       "A step's push (with the pull riding on it) round trip to all shards.", jw,
                                       buckets=DURATION_BUCKETS, registry=r)
        self.pull_duration = Histogram("pstrain_pull_duration_seconds",
                                       "Pulls of all shards outside steps (start, final evaluation).", jw,
                                       buckets=DURATION_BUCKETS, registry=r)
        self.sent_bytes = Counter("pstrain_sent_bytes_total", "Serialized request bytes sent.", ["job", "role"],
                                  registry=r)
        self.received_bytes = Counter("pstrain_received_bytes_total", "Serialized response bytes received.",
                                      ["job", "role"], registry=r)

    def task(self, job: str, worker: int) -> TaskMetrics:
        """The series of this worker's part of ``job``; creates its counters and histograms."""
        return TaskMetrics(self, job, worker)
