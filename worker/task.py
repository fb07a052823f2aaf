"""One worker's part of a training job: pull → compute → push, on its data shard.

The training loop is the one in-process ``model.fit`` runs (pstrain/runtime/loop.py:
a global data schedule, each worker taking its contiguous part of every global
batch), here against the job's shards (``ShardedParameterClient``); this module adds
the master's side: progress reports, per-epoch validation, cancellation and the final
evaluation.

Each step sends one push to every shard at once (in parallel), and the new
parameters ride back on the replies: one round trip per step. Deeper pipelining —
computing step t while step t-1's push is in flight — was measured and dropped: on
MNIST with SGD momentum 0.9 and 2 async workers it cut 3-epoch accuracy from 97.6% to
81% (the extra step of staleness compounds with momentum) for a 7% speed-up.

A task runs one worker slot: part k of every global batch. A process taking a
running slot over (``TaskSpec.start_step`` > 0) starts there, with the parameters of
that step; a task asked to release its slot stops between two steps and reports the
slot's next step; a task whose slot another process took over (``Fenced``) stops
without pushing anything more.

Usage (the worker node does this for each task the master sends)::

    TrainingTask(task, master_client, device="cpu", metrics=node_metrics).run(cancelled_event, finished_lookup)
"""
from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np

from pstrain.runtime import datasets
from pstrain.runtime.loop import Callback, EpochTotals, Schedule, TrainingCancelled, TrainingLoop
from pstrain.runtime.modes import Mode
from pstrain.runtime.parameters import Fenced, RolledBack
from pstrain.runtime.placement import layout
from pstrain.runtime.plan import TrainPlan
from pstrain.runtime.spec import Device, TaskSpec
from pstrain.runtime.step import StepRunner
from pstrain.transport import rpc
from pstrain.transport.ps_client import ShardedParameterClient
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

# The loop's cancellation, under the name this module has always raised.
TaskCancelled = TrainingCancelled
# The master is restarting or unreachable: reports wait for it rather than fail the task.
MASTER_AWAY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class TrainingTask:
    """One task from the master, run to its end by ``run`` (see the module docstring)."""

    def __init__(self, task: TaskSpec, master, device: str = "cpu", report_interval: float = 1.0, push_retries: int = 5,
                 metrics: WorkerMetrics | None = None, master_wait: float = 300.0):
        self.task = task
        self.master = master
        self.job = task.job
        self.index = task.worker_index
        self.owner_epoch, self.start_step = task.owner_epoch, task.start_step
        self.workers = sorted(task.workers)
        self.position = self.workers.index(self.index)
        self.train = task.train
        # The job's device, unless it leaves the choice to the worker ("auto": this node's --device).
        self.device = device if task.train.device is Device.AUTO else task.train.device.value
        self.report_interval = report_interval
        self.plan = TrainPlan(task.graph, task.features, task.labels, task.loss, task.prediction, dict(task.grads),
                              tuple(task.state_variables))
        self.metrics = (metrics or WorkerMetrics()).task(self.job, self.index)
        self.push_retries = push_retries
        self.master_wait = master_wait
        self.params: ShardedParameterClient | None = None  # connected by run()
        self.loop: TrainingLoop | None = None  # made once the data is loaded
        self._last_step, self._last_epoch = task.start_step, 0  # the slot's next step, the epoch reached

    def run(self, cancelled: threading.Event, finished, released: threading.Event | None = None) -> None:
        """Train, report, and (if chosen) evaluate the final model. ``finished`` is a
        callable returning the evaluator index once the master says the job is done;
        ``released`` set: stop after the current step and report where the slot stands."""
        released = released or threading.Event()
        stop = _Either(cancelled, released)
        try:
            self.params = self._connect(stop)
            self._train(stop)
            evaluator = self._wait_finished(cancelled, finished)
            if evaluator == self.index:
                self._pull()
                loss, acc = self._evaluate()
                self.metrics.validation(loss, acc)
                self._deliver(lambda: self.report(self._last_step, self._last_epoch, loss,
                                                  self._validation(loss, acc), final=True))
        except TaskCancelled:
            if released.is_set() and not cancelled.is_set():
                log.info("job %s: worker slot %d released at step %d", self.job, self.index, self._last_step)
                self._deliver(lambda: self.report(self._last_step, self._last_epoch, 0.0, {}, released=True))
            else:
                log.info("job %s cancelled", self.job)
        except Fenced as exc:
            # Another process runs this slot now (this one was paused past the heartbeat
            # timeout, or the slot moved): nothing more of ours may reach the shards.
            log.warning("job %s worker %d: %s", self.job, self.index, exc)
        except Exception as exc:  # noqa: BLE001 - reported to the master
            log.exception("job %s failed on worker %d", self.job, self.index)
            try:
                self.report(0, 0, 0.0, {}, error=rpc.one_line(exc))
            except Exception:  # noqa: BLE001
                pass
        finally:
            self.metrics.end()
            if self.params is not None:
                self.params.close()

    def report(self, step: int, epoch: int, loss: float, metrics: dict, step_time: float = 0.0, **flags):
        """A progress report for this slot, as this process's ownership of it (``flags``:
        done, final, error, released, wait; see ``MasterClient.report``)."""
        return self.master.report(self.job, self.index, step, epoch, loss, metrics, step_time,
                                  owner_epoch=self.owner_epoch, **flags)

    def _connect(self, cancelled: threading.Event) -> ShardedParameterClient:
        """The job's shards, behind one client, laid out as the master placed the variables."""
        task, nodes = self.task, self.plan.graph.nodes
        variables = {s.variable: (nodes[s.variable].shape, nodes[s.variable].dtype) for s in task.slices}
        placement = layout(variables, [(s.variable, s.shard, s.start, s.stop) for s in task.slices],
                           len(task.shard_addresses))
        return ShardedParameterClient(self.job, self.index, list(task.shard_addresses), placement,
                                      timeout=600.0, rpc_timeout=660.0, retries=self.push_retries,
                                      on_transfer=self.metrics.transferred, retry_for=self.master_wait,
                                      stop=cancelled.is_set, owner_epoch=self.owner_epoch,
                                      credentials=getattr(self.master, "credentials", None))

    def _train(self, cancelled: threading.Event) -> None:
        t = self.train
        # One error for a path it cannot read, whatever the reason (which files exist here is not the submitter's business).
        self.data = datasets.load_for_job(self.task.dataset)
        dtype = self.plan.graph.nodes[self.plan.features].dtype
        x, y = self.data.x_train.astype(dtype, copy=False), self._targets(self.data.y_train, "y_train")
        self.loop = TrainingLoop(StepRunner(self.plan, backend=self.device), self.params,
                                 seed=int(t.seed) + self.position, accuracy_of=t.loss_name or None,
                                 sync=t.mode is Mode.SYNC)
        schedule = Schedule(len(x), int(t.batch_size), int(t.epochs), seed=int(t.seed), shuffle=t.shuffle,
                            position=self.position, workers=len(self.workers), min_steps_per_epoch=1)
        start_at = self.start_step
        try:
            # Taking a running slot over: in sync mode its next step needs the parameters
            # of exactly that version (the barrier before it waits for this slot).
            self._pull(start_at, start_at if t.mode is Mode.SYNC else 0)
        except RolledBack as back:
            start_at = self._resync(back)
        reporter = _Reporter(self, schedule.steps_per_epoch)
        while True:
            try:
                self.loop.run(x, y, schedule, [reporter], cancelled=cancelled, start_at=start_at)
                break
            except RolledBack as back:
                # A shard restarted from its checkpoint and the job's shards went back to a
                # version they all hold: compute again from there (the same batches and random
                # ops as the first time, so the result is what an uninterrupted run gives).
                log.warning("job %s worker %d: %s; computing again from step %d", self.job, self.index, back,
                            back.version)
                start_at = self._resync(back)
        reporter.settle()
        if self._deliver(lambda: self.report(self._last_step, self._last_epoch, 0.0, {}, done=True)):
            raise TaskCancelled()

    def _deliver(self, report):
        """Send a report the master must get (done, final): while the master is away (a
        restart), retry until it answers, for up to ``master_wait`` seconds."""
        deadline, delay = time.monotonic() + self.master_wait, 0.2
        while True:
            try:
                return report()
            except grpc.RpcError as exc:
                if exc.code() not in MASTER_AWAY or time.monotonic() > deadline:
                    raise
                log.warning("job %s: the master is not answering (%s); retrying the report", self.job,
                            rpc.describe(exc))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _resync(self, back: RolledBack) -> int:
        """After a rollback, pull until every shard holds the same version (the master rolls
        them back one by one) and return it: the step to compute again from."""
        deadline = time.monotonic() + self.master_wait
        while True:
            try:
                self._pull()
                versions = set(self.params.versions)
                if len(versions) == 1:
                    return versions.pop()
            except RolledBack:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job's shards did not come back to one version after {back} "
                                   f"(they hold {self.params.versions})")
            time.sleep(0.1)

    def _pull(self, step: int = 0, min_version: int = 0) -> None:
        started = time.perf_counter()
        self.loop.pull(step, min_version)
        self.metrics.pull(time.perf_counter() - started)

    def _evaluate(self) -> tuple[float, float]:
        dtype = self.plan.graph.nodes[self.plan.features].dtype
        return self.loop.evaluate(self.data.x_test.astype(dtype, copy=False), self._targets(self.data.y_test, "y_test"),
                                  batch_size=1000)

    def _validation(self, loss: float, accuracy: float) -> dict:
        """Validation metrics to report: accuracy only where the job counts it (a graph
        job without metrics=["accuracy"] does not)."""
        return {"val_loss": loss, "val_accuracy": accuracy} if self.train.loss_name else {"val_loss": loss}

    def _targets(self, y, key: str):
        """The dataset's targets as the graph's labels placeholder wants them (class ids,
        one-hot rows, or float rows of its shape); a mismatch names both."""
        labels = self.plan.graph.nodes[self.plan.labels]
        return datasets.fit_targets(y, labels.shape, labels.dtype, where=f"{self.task.dataset}: {key}")

    def _wait_finished(self, cancelled: threading.Event, finished) -> int:
        while True:
            if cancelled.is_set():
                raise TaskCancelled()
            evaluator = finished()
            if evaluator is not None:
                return evaluator
            time.sleep(0.05)


class _Reporter(Callback):
    """The worker's side of the loop: step metrics, a progress report to the master
    every ``report_interval`` seconds and at every epoch's end (with validation on
    the first worker)."""

    def __init__(self, task: TrainingTask, steps_per_epoch: int):
        self.task, self.steps_per_epoch = task, steps_per_epoch
        self.metrics = task.metrics
        self.step_times: list[float] = []
        self.last_report = time.monotonic()
        self._pending = None  # () -> cancelled?, of the report in flight

    def on_step_end(self, step: int, totals: EpochTotals, samples: int, seconds: float, exchange_seconds: float) -> None:
        self.metrics.push(exchange_seconds)
        self.metrics.step(seconds, samples)
        self.step_times.append(seconds)
        self.task._last_step, self.task._last_epoch = step + 1, totals.epoch
        now = time.monotonic()
        if now - self.last_report >= self.task.report_interval:
            self._report(step + 1, totals.epoch, totals)
            self.last_report = now

    def on_epoch_end(self, epoch: int, totals: EpochTotals) -> None:
        extra = {}
        if self.task.position == 0:  # one worker tracks validation per epoch
            vloss, vacc = self.task._evaluate()
            extra = self.task._validation(vloss, vacc)
            self.metrics.validation(vloss, vacc)
        self._report((epoch + 1) * self.steps_per_epoch, epoch + 1, totals, extra)
        self.task._last_epoch = epoch + 1

    def _report(self, step: int, epoch: int, totals: EpochTotals, extra: dict | None = None) -> None:
        metrics = dict(extra or {})
        if totals.seen and self.task.train.loss_name:
            metrics["accuracy"] = totals.correct / totals.seen
        if totals.seen:
            self.metrics.train(totals.loss_sum / totals.seen, metrics.get("accuracy"))
        step_time = float(np.mean(self.step_times)) if self.step_times else 0.0
        self.step_times = []
        # Not waited for: the master records it (SQLite) while the next steps run; its
        # answer (cancelled?) is read before the next report, which keeps them in order.
        self.settle()
        self._pending = self.task.report(step, epoch, totals.loss, metrics, step_time, wait=False)

    def settle(self) -> None:
        """Wait for the report in flight; TaskCancelled if the master answered that the job
        was cancelled (or that this worker was dropped from it). A master that does not
        answer (restarting) loses only this report: training goes on, and the next one
        carries the progress since."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            stop = pending()
        except grpc.RpcError as exc:
            if exc.code() not in MASTER_AWAY:
                raise
            log.warning("job %s: a progress report was not delivered (%s); training goes on", self.task.job,
                        rpc.describe(exc))
            return
        if stop:
            raise TaskCancelled()


class _Either:
    """Set when either event is: the loop's ``cancelled`` for a job cancelled or a slot released."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)
