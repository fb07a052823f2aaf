"""A worker node: registers with the master, heartbeats, and runs the tasks it is given
one at a time.

Usage (normally ``python -m worker``)::

    node = WorkerNode(WorkerConfig(master="127.0.0.1:50051"))
    node.start(); node.run(stop_event)   # start() also serves /metrics (WorkerConfig.metrics_port)
"""
from __future__ import annotations

import logging
import queue
import threading

from pstrain.kernels import get_backend
from pstrain.transport.membership import NodeMembership
from worker.config import WorkerConfig
from worker.metrics import WorkerMetrics
from worker.task import TrainingTask

log = logging.getLogger(__name__)


class WorkerNode:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.device = get_backend(config.device).name  # resolve "auto" once, fail early for "cuda"
        self.tasks: queue.Queue = queue.Queue()
        self.cancelled: dict[str, threading.Event] = {}
        self.finished: dict[str, int] = {}
        self.lock = threading.Lock()
        self.metrics = WorkerMetrics()
        self.membership = NodeMembership(config.master, "worker", name=config.name, on_response=self._on_heartbeat)

    def _cancel_event(self, job: str) -> threading.Event:
        with self.lock:
            return self.cancelled.setdefault(job, threading.Event())

    def _on_heartbeat(self, resp) -> None:
        for task in resp.tasks:
            self._cancel_event(task.job)
            self.tasks.put(task)
        for job in resp.cancelled_jobs:
            self._cancel_event(job).set()
        for f in resp.finished:
            with self.lock:
                self.finished[f.job] = f.evaluator

    def cancel_all(self) -> None:
        """Stop the running task (the process is shutting down)."""
        with self.lock:
            for event in self.cancelled.values():
                event.set()

    def start(self) -> None:
        """Serve /metrics (unless metrics_port is -1), register with the master and start
        heartbeating (raises OSError if the metrics port is taken, ConnectionError if the
        master is unreachable)."""
        c = self.config
        if c.metrics_port >= 0:
            self.membership.metrics_address = self.metrics.serve(c.host, c.metrics_port, c.advertise_host)
        self.membership.start()

    def run(self, stop: threading.Event) -> None:
        """Run tasks until ``stop`` is set (call ``start`` first)."""
        try:
            while not stop.is_set():
                try:
                    task = self.tasks.get(timeout=0.2)
                except queue.Empty:
                    continue
                job = task.job
                log.info("job %s: starting as worker %d of %d", job, task.worker_index, len(task.workers))
                self.membership.running = [(job, task.worker_index)]  # a restarted master re-attaches us
                try:
                    TrainingTask(task, self.membership.client, self.device, self.config.report_interval,
                                 metrics=self.metrics).run(
                        self._cancel_event(job), lambda j=job: self.finished.get(j)
                    )
                finally:
                    self.membership.running = []
                with self.lock:
                    self.finished.pop(job, None)
        finally:
            self.membership.stop()
            server = getattr(self.metrics, "http_server", None)
            if server is not None:
                server.shutdown()
                server.server_close()
