"""One worker's part of a training job: pull → compute → push, on its data shard.

The data schedule is global: every epoch the whole training set is permuted with a
seed derived from the job seed and the epoch, cut into global batches of
``batch_size``, and each worker takes its contiguous part of every global batch.
So in sync mode the shards apply exactly the gradient of each global batch (a
weighted average of the workers' parts), the schedule in-process training uses.

Each step sends one push to every shard at once (in parallel), and the new
parameters ride back on the replies: one round trip per step. Deeper pipelining —
computing step t while step t-1's push is in flight — was measured and dropped: on
MNIST with SGD momentum 0.9 and 2 async workers it cut 3-epoch accuracy from 97.6% to
81% (the extra step of staleness compounds with momentum) for a 7% speed-up.

Usage (the worker node does this for each task the master sends)::

    TrainingTask(task, master_client, device="cpu", metrics=node_metrics).run(cancelled_event, finished_lookup)
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

from graph.registry import RunContext
from protos import codec
from pstrain.runtime import datasets
from pstrain.runtime import metrics as metrics_mod
from pstrain.runtime.plan import TrainPlan
from pstrain.runtime.step import StepRunner
from pstrain.transport import rpc
from pstrain.transport.ps_client import ParameterServerClient
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class SliceRef:
    variable: str
    key: str
    shard: int
    start: int
    stop: int


class TaskCancelled(Exception):
    pass


class TrainingTask:
    def __init__(self, task, master, device: str = "cpu", report_interval: float = 1.0, push_retries: int = 5,
                 metrics: WorkerMetrics | None = None):
        self.task = task
        self.master = master
        self.job = task.job
        self.index = task.worker_index
        self.workers = sorted(task.workers)
        self.position = self.workers.index(self.index)
        self.train = task.train
        self.device = task.train.device if task.train.device not in ("", "auto") else device
        self.report_interval = report_interval
        self.push_retries = push_retries
        graph = codec.graph_from_proto(task.graph)
        self.plan = TrainPlan(graph, task.features, task.labels, task.loss, task.prediction, dict(task.grads),
                              tuple(task.state_variables))
        self.slices = [SliceRef(s.variable, s.key, s.shard, s.start, s.stop) for s in task.slices]
        self.by_shard = {s: [sl for sl in self.slices if sl.shard == s] for s in range(len(task.shard_addresses))}
        self.shards = [ParameterServerClient(a, timeout=60.0) for a in task.shard_addresses]
        self.params = {
            v: np.empty(graph.nodes[v].shape, graph.nodes[v].dtype) for v in {sl.variable for sl in self.slices}
        }
        self.version = 0
        self.metrics = (metrics or WorkerMetrics()).task(self.job, self.index)
        self._pending_report = None  # () -> cancelled?, of the report in flight

    # ---- parameter exchange ----------------------------------------------------------------
    def _assemble(self, parts: dict[str, np.ndarray]) -> None:
        for sl in self.slices:
            part = parts.get(sl.key)
            if part is None:
                continue
            target = self.params[sl.variable]
            if target.ndim == 0:
                target[...] = part
            else:
                target[sl.start : sl.stop] = part

    def _slice_for_shard(self, values: dict, shard: int) -> dict:
        out = {}
        for sl in self.by_shard[shard]:
            v = values.get(sl.variable)
            if v is not None:
                out[sl.key] = v if np.ndim(v) == 0 else v[sl.start : sl.stop]
        return out

    def _pull_all(self, step: int, min_version: int) -> None:
        started = time.perf_counter()
        for client in self.shards:
            resp = self._retry(lambda c=client: c.pull_response(self.job, self.index, step, min_version, timeout=600.0))
            self.metrics.transferred(received=resp.ByteSize())
            self._assemble(codec.read_named(resp.params))
            self.version = max(self.version, resp.version)
        self.metrics.pull(time.perf_counter() - started)

    def _exchange(self, step: int, grads: dict, updates: dict, weight: float, min_version: int) -> None:
        """Push (with pull) to every shard at once and assemble the parameters that come
        back: the other shards' calls are in flight while the last one runs here (a
        future for every call would start a gRPC polling thread per step). The tensors
        travel through shared memory where the shard shares this host, else as raw
        frames (protos/tensorwire.py); gRPC carries the call either way."""
        calls = []
        for s, client in enumerate(self.shards):
            calls.append(client.start_push_pull(
                self.job, self.index, step, self._slice_for_shard(grads, s), self._slice_for_shard(updates, s),
                weight=weight, min_version=min_version, timeout=600.0, rpc_timeout=660.0,
                wait=s == len(self.shards) - 1,
            ))
        for call in calls:
            try:
                version, params = call.result()
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                # Pushes are idempotent (job, worker, step): resending is safe.
                version, params = self._retry(call.retry)
            self.metrics.transferred(sent=call.sent, received=call.received)
            self._assemble(params)
            self.version = max(self.version, version)

    def _share_memory(self) -> None:
        """Offer every shard a shared-memory segment for the pushes (taken where the
        shard is on this host), with room for this worker's slices both ways."""
        for s, client in enumerate(self.shards):
            nbytes = sum(v.nbytes for v in self._slice_for_shard(self.params, s).values())
            room = 2 * nbytes + 65536  # gradients and state updates out (or parameters back), headers
            try:
                client.use_shared_memory(self.job, f"pstrain-{self.job}-w{self.index}-s{s}-{os.getpid()}", room, room)
            except OSError as exc:  # e.g. /dev/shm is full: frames still work
                log.warning("no shared memory for shard %d (%s); pushing over gRPC", s, exc)

    def _retry(self, call):
        delay = 0.2
        for attempt in range(self.push_retries + 1):
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.push_retries:
                    raise
                log.warning("retrying after %s", rpc.describe(exc))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self, cancelled: threading.Event, finished) -> None:
        """Train, report, and (if chosen) evaluate the final model. ``finished`` is a
        callable returning the evaluator index once the master says the job is done."""
        try:
            self._train(cancelled)
            evaluator = self._wait_finished(cancelled, finished)
            if evaluator == self.index:
                self._pull_all(step=0, min_version=0)
                loss, acc = self._evaluate()
                self.metrics.validation(loss, acc)
                self.master.report(self.job, self.index, self._last_step, self._last_epoch, loss,
                                   {"val_loss": loss, "val_accuracy": acc}, final=True)
        except TaskCancelled:
            log.info("job %s cancelled", self.job)
        except Exception as exc:  # noqa: BLE001 - reported to the master
            log.exception("job %s failed on worker %d", self.job, self.index)
            detail = rpc.describe(exc) if isinstance(exc, grpc.RpcError) else f"{type(exc).__name__}: {exc}"
            try:
                self.master.report(self.job, self.index, 0, 0, 0.0, {}, error=detail)
            except Exception:  # noqa: BLE001
                pass
        finally:
            self.metrics.end()
            for c in self.shards:
                c.close()

    def _train(self, cancelled: threading.Event) -> None:
        t = self.train
        self.data = datasets.load(self.task.data.dataset)
        x, y = self.data.x_train, self.data.y_train
        dtype = self.plan.graph.nodes[self.plan.features].dtype
        x = x.astype(dtype, copy=False)
        runner = self.runner = StepRunner(self.plan, backend=self.device)
        n, bs, k = len(x), int(t.batch_size), len(self.workers)
        steps_per_epoch = max(math.ceil(n / bs), 1)
        sync = t.mode == "sync"
        self._pull_all(step=0, min_version=0)
        self._share_memory()
        loss_sum = correct = seen = 0.0
        last_report, step_times = time.monotonic(), []
        self._last_step, self._last_epoch = 0, 0
        batches = _Batches(x, y, bs, self.position, k)
        for epoch in range(int(t.epochs)):
            batches.start_epoch(datasets.epoch_permutation(n, int(t.seed), epoch) if t.shuffle else np.arange(n))
            for s in range(steps_per_epoch):
                if cancelled.is_set():
                    raise TaskCancelled()
                step = epoch * steps_per_epoch + s
                started = time.perf_counter()
                xb, yb = batches.gather(s)
                grads, updates = {}, {}
                if len(xb):
                    out = runner.train_step(xb, yb, self.params, RunContext(True, step, int(t.seed) + self.position))
                    if not np.isfinite(out.loss):
                        raise FloatingPointError(f"loss became {out.loss} at step {step}; lower the learning rate")
                    grads, updates = out.grads, out.updates
                    loss_sum += out.loss * len(xb)
                    correct += metrics_mod.correct(t.loss_name, out.prediction, yb) if t.loss_name else 0.0
                    seen += len(xb)
                # The gradient's share of the global batch: the sync average's weight, and
                # in async/SSP the factor the shard scales it by.
                weight = len(xb) / max(batches.global_size(s), 1)
                # Sync waits for the barrier (version step + 1); async/SSP take whatever
                # the shards hold (SSP's bound is enforced by the shards).
                pushed = time.perf_counter()
                self._exchange(step, grads, updates, weight, step + 1 if sync else 0)
                done = time.perf_counter()
                self.metrics.push(done - pushed)
                self.metrics.step(done - started, len(xb))
                step_times.append(done - started)
                self._last_step, self._last_epoch = step + 1, epoch
                now = time.monotonic()
                if now - last_report >= self.report_interval:
                    self._report(step + 1, epoch, loss_sum, correct, seen, step_times)
                    last_report, step_times = now, []
            extra = {}
            if self.position == 0:  # one worker tracks validation per epoch
                vloss, vacc = self._evaluate()
                extra = {"val_loss": vloss, "val_accuracy": vacc}
                self.metrics.validation(vloss, vacc)
            self._report((epoch + 1) * steps_per_epoch, epoch + 1, loss_sum, correct, seen, step_times, extra)
            loss_sum = correct = seen = 0.0
            step_times = []
            self._last_epoch = epoch + 1
        self._settle_report()
        self.master.report(self.job, self.index, self._last_step, self._last_epoch, 0.0, {}, done=True)

    def _report(self, step, epoch, loss_sum, correct, seen, step_times, extra=None) -> None:
        metrics = dict(extra or {})
        if seen and self.train.loss_name:
            metrics["accuracy"] = correct / seen
        if seen:
            self.metrics.train(loss_sum / seen, metrics.get("accuracy"))
        step_time = float(np.mean(step_times)) if step_times else 0.0
        # Not waited for: the master records it (SQLite) while the next steps run; its
        # answer (cancelled?) is read before the next report, which keeps them in order.
        self._settle_report()
        self._pending_report = self.master.report(self.job, self.index, step, epoch, loss_sum / max(seen, 1), metrics,
                                                  step_time, wait=False)

    def _settle_report(self) -> None:
        """Wait for the report in flight; TaskCancelled if the master answered that the job was cancelled."""
        pending, self._pending_report = self._pending_report, None
        if pending is not None and pending():
            raise TaskCancelled()

    def _evaluate(self) -> tuple[float, float]:
        x, y = self.data.x_test, self.data.y_test
        dtype = self.plan.graph.nodes[self.plan.features].dtype
        loss_sum = correct = 0.0
        for s in range(0, len(x), 1000):
            xb, yb = x[s : s + 1000].astype(dtype, copy=False), y[s : s + 1000]
            loss, pred = self.runner.eval_step(xb, yb, self.params)
            loss_sum += loss * len(xb)
            if self.train.loss_name:
                correct += metrics_mod.correct(self.train.loss_name, pred, yb)
        return loss_sum / max(len(x), 1), correct / max(len(x), 1)

    def _wait_finished(self, cancelled: threading.Event, finished) -> int:
        while True:
            if cancelled.is_set():
                raise TaskCancelled()
            evaluator = finished()
            if evaluator is not None:
                return evaluator
            time.sleep(0.05)


class _Batches:
    """This worker's part of each global batch of an epoch, gathered into one reused
    buffer (a fresh 1.6 MB batch per step costs more than the gather itself)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, position: int, workers: int):
        self.x, self.y, self.bs = x, y, batch_size
        self.position, self.workers = position, workers
        self.order = np.arange(len(x))
        size = len(datasets.shard_indices(batch_size, position, workers))
        self._xb, self._yb = np.empty((size,) + x.shape[1:], x.dtype), np.empty((size,) + y.shape[1:], y.dtype)

    def start_epoch(self, order: np.ndarray) -> None:
        self.order = order

    def global_size(self, s: int) -> int:
        return len(self.order[s * self.bs : (s + 1) * self.bs])

    def gather(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of step ``s`` of the epoch; the next gather overwrites them."""
        global_idx = self.order[s * self.bs : (s + 1) * self.bs]
        local = global_idx[datasets.shard_indices(len(global_idx), self.position, self.workers)]
        if len(local) != len(self._xb):  # a short last batch: its own arrays
            return self.x[local], self.y[local]
        # mode="clip": the indices are in range, and "raise" would gather into a temporary first.
        np.take(self.x, local, axis=0, out=self._xb, mode="clip")
        np.take(self.y, local, axis=0, out=self._yb, mode="clip")
        return self._xb, self._yb
