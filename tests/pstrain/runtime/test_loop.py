"""The training loop (pstrain.runtime.loop): linear regression with plain SGD over a
LocalParameterClient follows the trajectory NumPy computes in closed form, and the
schedule hands each of K workers its contiguous part of every global batch."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from graph.core import Graph
from pstrain.runtime import datasets
from pstrain.runtime.loop import Callback, Schedule, TrainingCancelled, TrainingLoop
from pstrain.runtime.optimizers import SGD, Optimizer
from pstrain.runtime.parameters import LocalParameterClient
from pstrain.runtime.plan import build_train_plan
from pstrain.runtime.step import StepRunner
from pstrain.runtime.store import ParameterStore

LR, D = 0.05, 3


def linear_regression(lr: float = LR) -> tuple[TrainingLoop, ParameterStore]:
    """pred = x @ w + b, loss = mean((pred - y)^2), SGD(lr), float64, NumPy kernels."""
    g = Graph()
    x = g.placeholder((None, D), "float64", name="x")
    y = g.placeholder((None, 1), "float64", name="y")
    w = g.variable(np.zeros((D, 1)), name="w")
    b = g.variable(np.zeros((1,)), name="b")
    pred = g.add(g.matmul(x, w), b, name="pred")
    plan = build_train_plan(g, g.mse(pred, y, name="loss"), pred, "x", "y")
    runner = StepRunner(plan, backend="reference")
    store = ParameterStore(g.initial_values, set(plan.grads), Optimizer(SGD(learning_rate=lr), runner.backend))
    return TrainingLoop(runner, LocalParameterClient(store), seed=0), store


def data(n: int = 23, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D))
    y = x @ np.array([[1.5], [-2.0], [0.5]]) + 0.3 + 0.01 * rng.normal(size=(n, 1))
    return x, y


def sgd_trajectory(x, y, schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """The weights after every step of ``schedule``, by hand: w -= lr * 2/m X^T (Xw + b - y)."""
    w, b = np.zeros((D, 1)), np.zeros(1)
    for epoch in range(schedule.epochs):
        order = schedule.order(epoch)
        for s in range(schedule.steps_per_epoch):
            idx = order[s * schedule.batch_size : (s + 1) * schedule.batch_size]
            xb, yb = x[idx], y[idx]
            r = xb @ w + b - yb
            w, b = w - LR * 2 / len(idx) * (xb.T @ r), b - LR * 2 / len(idx) * r.sum(axis=0)
    return w, b


@pytest.mark.parametrize("batch_size,shuffle", [(5, True), (5, False), (23, True), (1, True)])
def test_sgd_follows_the_closed_form_trajectory(batch_size, shuffle):
    x, y = data()
    loop, store = linear_regression()
    schedule = Schedule(len(x), batch_size, epochs=3, seed=11, shuffle=shuffle)
    loop.run(x, y, schedule)
    w, b = sgd_trajectory(x, y, schedule)
    np.testing.assert_allclose(store.pull()["w"], w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(store.pull()["b"], b, rtol=1e-12, atol=1e-14)
    assert store.version == 3 * schedule.steps_per_epoch == 3 * -(-23 // batch_size)


def test_a_run_is_bit_identical_to_train_batch_on_the_same_batches():
    x, y = data()
    schedule = Schedule(len(x), 4, epochs=2, seed=3)
    a, store_a = linear_regression()
    a.run(x, y, schedule)
    b, store_b = linear_regression()
    for step in range(2 * schedule.steps_per_epoch):
        epoch, s = divmod(step, schedule.steps_per_epoch)
        idx = schedule.local_indices(epoch, s)
        b.train_batch(x[idx], y[idx], step)
    for name in ("w", "b"):
        assert np.array_equal(store_a.pull()[name], store_b.pull()[name])


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_epoch_begin(self, epoch):
        self.events.append(("begin", epoch))

    def on_step_end(self, step, totals, samples, seconds, exchange_seconds):
        assert seconds >= exchange_seconds >= 0
        self.events.append(("step", step, samples, totals.seen))

    def on_epoch_end(self, epoch, totals):
        self.events.append(("end", epoch, totals.seen, totals.loss))


def test_callbacks_see_every_step_and_epoch_totals():
    x, y = data(n=10)
    loop, _ = linear_regression()
    rec = Recorder()
    loop.run(x, y, Schedule(10, 4, epochs=2), [rec], first_step=100)
    kinds = [e[:2] if e[0] != "step" else e[:4] for e in rec.events]
    assert kinds == [("begin", 0), ("step", 100, 4, 4), ("step", 101, 4, 8), ("step", 102, 2, 10), ("end", 0),
                     ("begin", 1), ("step", 103, 4, 4), ("step", 104, 4, 8), ("step", 105, 2, 10), ("end", 1)]
    loss_epoch_1 = rec.events[-1][3]
    assert rec.events[-1][2] == 10 and 0 < loss_epoch_1 < rec.events[4][3]  # the loss went down


def test_the_epoch_loss_is_the_batch_losses_weighted_by_batch_size():
    x, y = data(n=10)
    losses = []

    class Epochs(Callback):
        def on_epoch_end(self, epoch, totals):
            losses.append(totals.loss)

    loop, _ = linear_regression()
    loop.run(x, y, Schedule(10, 4, epochs=1, shuffle=False), [Epochs()])
    w, b, want = np.zeros((D, 1)), np.zeros(1), 0.0
    for idx in (slice(0, 4), slice(4, 8), slice(8, 10)):  # each batch's loss before its update
        r = x[idx] @ w + b - y[idx]
        want += np.mean(np.square(r)) * len(r)
        w, b = w - LR * 2 / len(r) * (x[idx].T @ r), b - LR * 2 / len(r) * r.sum(axis=0)
    assert losses == [pytest.approx(want / 10, rel=1e-12)]


# ---- the schedule across workers ------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_each_worker_gets_its_contiguous_part_of_every_global_batch(workers):
    n, bs, seed = 17, 6, 5
    x = np.arange(n, dtype=np.float64)[:, None].repeat(D, axis=1)  # row i holds i: the batches name their rows
    y = np.zeros((n, 1))
    fed = {}  # (step, position) -> (rows, weight, min_version)
    for position in range(workers):
        loop, _ = linear_regression()
        schedule = Schedule(n, bs, epochs=2, seed=seed, position=position, workers=workers)

        def record(xb, yb, step, weight, min_version, p=position):
            fed[step, p] = (xb[:, 0].astype(int).tolist(), weight, min_version)
            return 0.0, 0.0

        loop.run(x, y, schedule, train_batch=record)
    steps = -(-n // bs)
    assert len(fed) == 2 * steps * workers
    for epoch in range(2):
        order = datasets.epoch_permutation(n, seed, epoch)
        for s in range(steps):
            step, batch = epoch * steps + s, order[s * bs : (s + 1) * bs].tolist()
            parts = [fed[step, p][0] for p in range(workers)]
            assert sum(parts, []) == batch  # contiguous parts, in worker order, cover the global batch
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            for p in range(workers):
                _, weight, min_version = fed[step, p]
                assert weight == len(parts[p]) / len(batch) and min_version == 0


class Pushes(LocalParameterClient):
    """A local client that records what is pushed."""

    def __init__(self, store):
        super().__init__(store)
        self.log = []

    def push_pull(self, step, grads, updates, weight=1.0, min_version=0):
        self.log.append((step, sorted(grads), weight, min_version))
        return super().push_pull(step, grads, updates, weight, min_version)


def test_sync_waits_for_the_next_version_and_empty_parts_push_nothing_with_weight_0():
    x, y = data(n=7)
    loop, store = linear_regression()
    loop.client = Pushes(store)
    loop.sync = True
    # 3 workers, global batches of 5 then 2: parts of 2, 2, 1 rows, then 1, 1, 0.
    loop.run(x, y, Schedule(7, 5, epochs=1, seed=1, position=2, workers=3))
    assert loop.client.log == [(0, ["b", "w"], 1 / 5, 1), (1, [], 0.0, 2)]
    assert store.version == 1  # weight 0 applies nothing


def test_a_non_finite_loss_stops_the_run_before_pushing():
    x, y = data(n=8)
    x[5] = np.nan
    loop, store = linear_regression()
    with pytest.raises(FloatingPointError, match="loss became nan at step 1; nothing was applied"):
        loop.run(x, y, Schedule(8, 4, epochs=1, shuffle=False))
    assert store.version == 1


def test_a_set_cancel_event_stops_the_run_between_steps():
    x, y = data(n=8)
    loop, store = linear_regression()
    cancelled = threading.Event()

    class CancelAfterOne(Callback):
        def on_step_end(self, step, totals, samples, seconds, exchange_seconds):
            cancelled.set()

    with pytest.raises(TrainingCancelled):
        loop.run(x, y, Schedule(8, 2, epochs=1), [CancelAfterOne()], cancelled=cancelled)
    assert store.version == 1


def test_evaluate_is_the_mean_loss_over_all_examples():
    x, y = data(n=9)
    loop, _ = linear_regression()
    loss, accuracy = loop.evaluate(x, y, batch_size=4)
    assert loss == pytest.approx(np.mean(np.square(y)), rel=1e-12) and accuracy == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(examples=4, batch_size=0, epochs=1), "batch_size must be a whole number >= 1"),
    (dict(examples=4, batch_size=2, epochs=-1), "epochs must be a whole number >= 0"),
    (dict(examples=4, batch_size=2, epochs=1, position=2, workers=2), r"position must be in \[0, 2\)"),
])
def test_schedule_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kw)


def test_steps_per_epoch():
    assert Schedule(10, 4, 1).steps_per_epoch == 3
    assert Schedule(0, 4, 1).steps_per_epoch == 0
    assert Schedule(0, 4, 1, min_steps_per_epoch=1).steps_per_epoch == 1

