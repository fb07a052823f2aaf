"""A worker node: registers with the master, heartbeats, and runs the worker slots it
is given, each in its own thread (a node may run several slots of one job: it took
over the slots of a lost process, or the job was scaled to fewer processes).

The master may ask for a slot back (``release`` in a heartbeat reply): its task stops
after the step it is computing and reports where the slot stands, and the master
hands the slot to another process.

Usage (normally ``python -m worker``)::

    node = WorkerNode(WorkerConfig(master="127.0.0.1:50051"))
    node.start(); node.run(stop_event)   # start() also serves /metrics (WorkerConfig.metrics_port)
"""
from __future__ import annotations

import logging
import queue
import threading

from pstrain.kernels import get_backend
from pstrain.runtime.spec import SlotRef, TaskSpec
from pstrain.transport.membership import NodeMembership
from pstrain.transport.security import service_credentials
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
        self.membership = NodeMembership(config.master, "worker", name=config.name, on_response=self._on_heartbeat,
                                         credentials=service_credentials("worker", config.tls_dir))
        self._running: dict[tuple[str, int], tuple[SlotRef, threading.Event, threading.Thread]] = {}
        self._release_on_start: dict[tuple[str, int], int] = {}  # (job, slot) -> owner epoch asked back early

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
        for slot in resp.release:
            with self.lock:
                running = self._running.get((slot.job, slot.worker))
                if running is None or running[0].owner_epoch != slot.owner_epoch:
                    # Asked back before its task started (it is still queued): release it on start.
                    self._release_on_start[(slot.job, slot.worker)] = slot.owner_epoch
                    continue
            log.info("job %s: releasing worker slot %d after its current step", slot.job, slot.worker)
            running[1].set()

    def cancel_all(self) -> None:
        """Stop every running task (the process is shutting down)."""
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
                self._start_task(task)
        finally:
            self.cancel_all()
            with self.lock:
                threads = [t for _, _, t in self._running.values()]
            for t in threads:
                t.join(timeout=10)
            self.membership.stop()
            server = getattr(self.metrics, "http_server", None)
            if server is not None:
                server.shutdown()
                server.server_close()

    def _start_task(self, task: TaskSpec) -> None:
        key = (task.job, task.worker_index)
        slot = SlotRef(task.job, task.worker_index, task.owner_epoch)
        released = threading.Event()
        with self.lock:
            if self._release_on_start.pop(key, None) == task.owner_epoch:
                log.info("job %s: worker slot %d was asked back before it started; releasing it at once",
                         task.job, task.worker_index)
                released.set()
            old = self._running.get(key)
            if old is not None:  # an older assignment of the same slot still winding down
                old[1].set()
            thread = threading.Thread(target=self._run_task, args=(task, slot, released),
                                      name=f"task-{task.job}-w{task.worker_index}", daemon=True)
            self._running[key] = (slot, released, thread)
            self._publish_running()
        if task.start_step:
            log.info("job %s: taking over worker slot %d of %d from step %d (owner epoch %d)", task.job,
                     task.worker_index, len(task.workers), task.start_step, task.owner_epoch)
        else:
            log.info("job %s: starting as worker %d of %d", task.job, task.worker_index, len(task.workers))
        thread.start()

    def _publish_running(self) -> None:
        """Tell the membership what runs here: a restarted master re-attaches us. Caller holds the lock."""
        self.membership.running = [s for s, _, _ in self._running.values()]

    def _run_task(self, task: TaskSpec, slot: SlotRef, released: threading.Event) -> None:
        job = task.job
        try:
            TrainingTask(task, self.membership.client, self.device, self.config.report_interval,
                         metrics=self.metrics).run(self._cancel_event(job), lambda: self.finished.get(job), released)
        finally:
            with self.lock:
                key = (job, task.worker_index)
                if key in self._running and self._running[key][0] == slot:
                    del self._running[key]
                self._publish_running()
                if not any(k[0] == job for k in self._running):
                    self.finished.pop(job, None)
