"""The training loop: the one pull → compute → push schedule that both in-process
``model.fit`` (over a ``LocalParameterClient``) and every distributed worker (over a
``ShardedParameterClient``) run.

The data schedule is global: every epoch the whole training set is permuted with
``epoch_permutation(n, seed, epoch)`` (or kept in order without shuffling), cut into
global batches of ``batch_size``, and worker ``position`` of ``workers`` takes its
contiguous part of every global batch (``shard_indices``). In sync mode the shards
then apply exactly the gradient of each global batch — a weighted average of the
workers' parts — which is what in-process training, the one-worker case, applies.

A step: gather this worker's part of the global batch, run forward and backward
(``StepRunner.train_step``), stop on a non-finite loss (nothing of it is pushed), and
push the gradient with weight ``local batch / global batch``; in sync mode the new
parameters must be version ``step + 1`` (the barrier), otherwise whatever the server
holds. Reporting, progress bars and validation are callbacks.

Usage::

    loop = TrainingLoop(StepRunner(plan), LocalParameterClient(store), seed=7, accuracy_of="mse")
    loop.run(x, y, Schedule(len(x), batch_size=32, epochs=3, seed=7), callbacks=[printer])
    loss, accuracy = loop.evaluate(x_test, y_test)
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from graph.registry import RunContext
from pstrain.runtime import datasets
from pstrain.runtime import metrics as metrics_mod
from pstrain.runtime.parameters import ParameterClient
from pstrain.runtime.step import StepRunner


class TrainingCancelled(Exception):
    """The run's ``cancelled`` event was set; the loop stopped between two steps."""


@dataclass(frozen=True)
class Schedule:
    """Which examples every step of a run trains on (see the module docstring).

    ``min_steps_per_epoch``: distributed workers take at least one (maybe empty)
    step per epoch, so every worker's step count matches the shards' even on an
    empty training set; ``model.fit`` takes none then.
    """

    examples: int
    batch_size: int
    epochs: int
    seed: int = 0
    shuffle: bool = True
    position: int = 0
    workers: int = 1
    min_steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        for name, low in (("examples", 0), ("batch_size", 1), ("epochs", 0), ("workers", 1), ("min_steps_per_epoch", 0)):
            value = getattr(self, name)
            if int(value) != value or value < low:
                raise ValueError(f"Schedule: {name} must be a whole number >= {low}, got {value!r}")
        if not 0 <= self.position < self.workers:
            raise ValueError(f"Schedule: position must be in [0, {self.workers}) (this worker among {self.workers}), "
                             f"got {self.position}")

    @property
    def steps_per_epoch(self) -> int:
        return max(-(-self.examples // self.batch_size), self.min_steps_per_epoch)

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the whole training set (the same on every worker)."""
        if self.shuffle:
            return datasets.epoch_permutation(self.examples, self.seed, epoch)
        return np.arange(self.examples)

    def global_size(self, step_in_epoch: int) -> int:
        """Examples in global batch ``step_in_epoch`` of an epoch (the last may be short)."""
        return max(min(self.batch_size, self.examples - step_in_epoch * self.batch_size), 0)

    def local_indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        """Indices into the training set of this worker's part of a global batch."""
        bs = self.batch_size
        batch = self.order(epoch)[step_in_epoch * bs : (step_in_epoch + 1) * bs]
        return batch[datasets.shard_indices(len(batch), self.position, self.workers)]


@dataclass
class EpochTotals:
    """What an epoch's steps add up to so far; the loop resets it every epoch."""

    epoch: int = 0
    loss_sum: float = 0.0  # sum over examples of the loss
    correct: float = 0.0   # correctly predicted examples (when the loop tracks accuracy)
    seen: int = 0          # examples trained on

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)


class Callback:
    """Hooks into ``TrainingLoop.run``; every method does nothing unless overridden.
    An exception raised by a hook ends the run (e.g. a report learning that the job
    was cancelled)."""

    def on_epoch_begin(self, epoch: int) -> None:
        pass

    def on_step_end(self, step: int, totals: EpochTotals, samples: int, seconds: float, exchange_seconds: float) -> None:
        """After step ``step`` (its parameters pushed and the new ones back): its
        ``samples`` examples, the whole step's ``seconds``, the push's share of them."""

    def on_epoch_end(self, epoch: int, totals: EpochTotals) -> None:
        pass


class TrainingLoop:
    """Steps of a ``StepRunner`` against a ``ParameterClient``.

    ``seed`` is mixed into the step's random ops (dropout masks); ``accuracy_of`` is
    the loss name accuracy is counted for (None: not counted); ``sync`` makes each
    step wait for the parameters of the step before (version ``step + 1``);
    ``reuse_batch_buffers`` gathers every batch into the same two arrays (see ``_Batches``).
    """

    def __init__(self, runner: StepRunner, client: ParameterClient, *, seed: int = 0, accuracy_of: str | None = None,
                 sync: bool = False, reuse_batch_buffers: bool = True):
        self.runner = runner
        self.client = client
        self.seed = int(seed)
        self.accuracy_of = accuracy_of or None
        self.sync = sync
        self.reuse_batch_buffers = reuse_batch_buffers
        self.params: Mapping[str, np.ndarray] | None = None  # the newest the client gave, set by pull()
        self.exchange_seconds = 0.0  # how long the last push_pull took

    def pull(self, step: int = 0, min_version: int = 0) -> Mapping[str, np.ndarray]:
        """Fetch the current parameters, at least version ``min_version`` (``run`` does
        this first if nothing was pulled yet)."""
        self.params = self.client.pull(step, min_version)
        return self.params

    def train_batch(self, x: np.ndarray, y: np.ndarray, step: int, weight: float = 1.0,
                    min_version: int = 0) -> tuple[float, float]:
        """One step on one batch: (loss, correct predictions), both before the update.
        The push's share of its time is left in ``exchange_seconds``."""
        if self.params is None:
            self.pull(step)
        out = self.runner.train_step(x, y, self.params, RunContext(True, step, self.seed))
        if not np.isfinite(out.loss):
            raise FloatingPointError(
                f"loss became {out.loss} at step {step}; nothing was applied. Lower the learning rate "
                "or check the inputs for NaN/Inf"
            )
        correct = metrics_mod.correct(self.accuracy_of, out.prediction, y) if self.accuracy_of else 0.0
        self._exchange(step, out.grads, out.updates, weight, min_version)
        return out.loss, correct

    def run(self, x: np.ndarray, y: np.ndarray, schedule: Schedule, callbacks: Sequence[Callback] = (), *,
            first_step: int = 0, cancelled: threading.Event | None = None,
            train_batch: Callable[[np.ndarray, np.ndarray, int, float, int], tuple[float, float]] | None = None,
            start_at: int = 0) -> None:
        """Train on ``schedule``: its step ``s`` of epoch ``e`` is step
        ``first_step + e * steps_per_epoch + s`` (the random ops' and the servers' step).
        Every batch goes to ``train_batch(x, y, step, weight, min_version)``, by default
        this loop's (``model.fit`` passes its own, which counts the model's steps).
        ``start_at``: skip the schedule's first steps (a worker computing again from the
        version its shards rolled back to); the batches and random ops of the steps it
        runs are those of an uninterrupted run."""
        if self.params is None:
            self.pull(first_step)
        train_batch = train_batch or self.train_batch
        batches = _Batches(x, y, schedule, self.reuse_batch_buffers)
        steps, sync = schedule.steps_per_epoch, self.sync
        totals = EpochTotals()
        for epoch in range(schedule.epochs):
            if (epoch + 1) * steps <= start_at:
                continue
            totals.epoch, totals.loss_sum, totals.correct, totals.seen = epoch, 0.0, 0.0, 0
            for cb in callbacks:
                cb.on_epoch_begin(epoch)
            batches.start_epoch(schedule.order(epoch))
            for s in range(max(start_at - epoch * steps, 0), steps):
                if cancelled is not None and cancelled.is_set():
                    raise TrainingCancelled(f"cancelled before step {first_step + epoch * steps + s}")
                step = first_step + epoch * steps + s
                started = time.perf_counter()
                xb, yb = batches.gather(s)
                m = len(xb)
                # The gradient's share of the global batch: the sync average's weight, and in
                # async/SSP the factor the shard scales it by. Sync waits for the barrier
                # (version step + 1); async/SSP take whatever the shards hold.
                weight, min_version = m / max(schedule.global_size(s), 1), step + 1 if sync else 0
                if m:
                    loss, correct = train_batch(xb, yb, step, weight, min_version)
                    totals.loss_sum += loss * m
                    totals.correct += correct
                    totals.seen += m
                else:  # this worker's part of a short last batch: nothing to compute, an empty push
                    self._exchange(step, {}, {}, weight, min_version)
                seconds = time.perf_counter() - started
                for cb in callbacks:
                    cb.on_step_end(step, totals, m, seconds, self.exchange_seconds)
            for cb in callbacks:
                cb.on_epoch_end(epoch, totals)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> tuple[float, float]:
        """(mean loss, accuracy) of the newest parameters over ``(x, y)`` in inference
        mode; accuracy is 0.0 when the loop does not count it."""
        if self.params is None:
            self.pull()
        loss_sum = correct = 0.0
        for s in range(0, len(x), int(batch_size)):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            loss, pred = self.runner.eval_step(xb, yb, self.params)
            loss_sum += loss * len(xb)
            if self.accuracy_of:
                correct += metrics_mod.correct(self.accuracy_of, pred, yb)
        return loss_sum / max(len(x), 1), correct / max(len(x), 1)

    def _exchange(self, step: int, grads: Mapping, updates: Mapping, weight: float, min_version: int) -> None:
        pushed = time.perf_counter()
        self.params = self.client.push_pull(step, grads, updates, weight, min_version)
        self.exchange_seconds = time.perf_counter() - pushed


class _Batches:
    """This worker's part of each global batch of an epoch. With ``reuse_buffers``
    (workers: a fresh 1.6 MB batch per step cost more than the gather itself) parts
    are gathered into two reused arrays that the next gather overwrites; without
    (``model.fit``: fancy indexing copies rows with memcpy, faster than take(out=)
    there) each batch is new."""

    def __init__(self, x: np.ndarray, y: np.ndarray, schedule: Schedule, reuse_buffers: bool):
        self.x, self.y, self.bs = x, y, schedule.batch_size
        self.position, self.workers = schedule.position, schedule.workers
        self.order = np.arange(len(x))
        self._xb = self._yb = None
        if reuse_buffers:
            size = len(datasets.shard_indices(self.bs, self.position, self.workers))
            self._xb, self._yb = np.empty((size,) + x.shape[1:], x.dtype), np.empty((size,) + y.shape[1:], y.dtype)

    def start_epoch(self, order: np.ndarray) -> None:
        self.order = order

    def gather(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of step ``s`` of the epoch."""
        local = self.order[s * self.bs : (s + 1) * self.bs]
        if self.workers > 1:
            local = local[datasets.shard_indices(len(local), self.position, self.workers)]
        if self._xb is None or len(local) != len(self._xb):  # a short last batch: its own arrays
            return self.x[local], self.y[local]
        # mode="clip": the indices are in range, and "raise" would gather into a temporary first.
        np.take(self.x, local, axis=0, out=self._xb, mode="clip")
        np.take(self.y, local, axis=0, out=self._yb, mode="clip")
        return self._xb, self._yb
