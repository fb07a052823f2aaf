"""The parameter-server shard core: the ps-lite invariant (K workers push known
gradients N times to S shards; pulls equal the closed form) in every mode, sync
determinism and weighting, idempotent pushes, rejections that change nothing, SSP
and sync waits, and membership changes."""
from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from psserver.shard import MODES, PushAck, PushRefused, Shard
from pstrain.kernels import get_backend
from pstrain.runtime.optimizers import SGD, Adam, Optimizer
from pstrain.runtime.store import ParameterStore, PushRejected

TRAINABLE = ("w", "b")


def initial() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([0.5, -0.5], np.float32),
        "bn/mean": np.zeros(2, np.float32),
    }


def make_shard(mode="sync", workers=(0, 1), optimizer=None, names=None, **kwargs) -> Shard:
    variables = {k: v for k, v in initial().items() if names is None or k in names}
    kwargs.setdefault("staleness", 1 if mode == "ssp" else 0)
    return Shard(
        "test", kwargs.pop("shard_id", 0), variables, trainable={n for n in TRAINABLE if n in variables},
        optimizer=optimizer or SGD(learning_rate=1.0), mode=mode, workers=workers, **kwargs,
    )


def ones_like(name: str, value: float) -> np.ndarray:
    return np.full_like(initial()[name], value)


def run_threads(*fns, timeout: float = 10.0) -> None:
    """Run each fn in its own thread; re-raise the first failure."""
    errors: list[BaseException] = []

    def wrap(fn):
        def target():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        return target

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


def in_background(fn):
    """Start fn in a thread; return (done event, result list)."""
    done, result = threading.Event(), []

    def target():
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)
        done.set()

    threading.Thread(target=target, daemon=True).start()
    return done, result


def pulled(shard: Shard) -> dict[str, np.ndarray]:
    return shard.pull(worker=0, step=0, timeout=1)[1]


# ---- the ps-lite invariant ------------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("n_steps", [1, 5])
@pytest.mark.parametrize("n_workers", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_pushed_gradients_sum_to_the_closed_form(mode, n_workers, n_steps, shards):
    # Worker k pushes g_k = (k + 1) * ones every step; SGD with lr=1, no momentum.
    names = list(TRAINABLE)
    parts = [names[s::shards] for s in range(shards)]
    servers = [make_shard(mode, range(n_workers), names=part, shard_id=s) for s, part in enumerate(parts)]

    def worker(k):
        def loop():
            for step in range(n_steps):
                for server, part in zip(servers, parts):
                    server.pull(k, step, min_version=step, timeout=5)
                    ack = server.push(k, step, {n: ones_like(n, k + 1) for n in part}, weight=1.0)
                    assert not ack.duplicate

        return loop

    run_threads(*(worker(k) for k in range(n_workers)))
    combined = {}
    for server in servers:
        combined.update(pulled(server))
    total = sum(k + 1 for k in range(n_workers))
    per_step = total / n_workers if mode == "sync" else total
    for name in names:
        np.testing.assert_array_equal(combined[name], initial()[name] - n_steps * per_step, err_msg=name)
    for server in servers:
        want_version = n_steps if mode == "sync" else n_steps * n_workers
        assert server.version == want_version
        assert server.stats()["applied_pushes"] == n_steps * n_workers


# ---- sync: deterministic, weighted averages -------------------------------------------------------
def random_pushes(n_workers, n_steps, seed=0):
    rng = np.random.default_rng(seed)
    return {
        (k, t): {n: rng.standard_normal(initial()[n].shape).astype(np.float32) for n in TRAINABLE}
        for k in range(n_workers)
        for t in range(n_steps)
    }


def final_state(shard):
    return pulled(shard), shard.optimizer_state()


def assert_states_identical(a, b):
    (pa, oa), (pb, ob) = a, b
    assert pa.keys() == pb.keys() and oa.keys() == ob.keys()
    for n in pa:
        np.testing.assert_array_equal(pa[n], pb[n], err_msg=n)
    for n in oa:
        assert oa[n].keys() == ob[n].keys()
        for k in oa[n]:
            np.testing.assert_array_equal(oa[n][k], ob[n][k], err_msg=f"{n}/{k}")


def test_sync_result_is_bit_identical_for_every_arrival_order():
    pushes = random_pushes(3, 1)
    weights = [0.25, 0.625, 0.125]  # shares of the global batch
    results = []
    for order in itertools.permutations(range(3)):
        shard = make_shard("sync", range(3), Adam(0.01))
        for k in order:
            shard.push(k, 0, pushes[k, 0], weight=weights[k])
        results.append(final_state(shard))
    for r in results[1:]:
        assert_states_identical(results[0], r)


def test_sync_threads_with_random_delays_give_bit_identical_results():
    n_workers, n_steps = 4, 3
    pushes = random_pushes(n_workers, n_steps)
    weights = [0.125, 0.25, 0.125, 0.5]

    def run(seed):
        delays = np.random.default_rng(seed).uniform(0, 0.01, size=(n_workers, n_steps))
        shard = make_shard("sync", range(n_workers), Adam(0.01))

        def worker(k):
            def loop():
                for t in range(n_steps):
                    shard.pull(k, t, min_version=t, timeout=5)
                    time.sleep(delays[k, t])
                    shard.push(k, t, pushes[k, t], weight=weights[k])

            return loop

        run_threads(*(worker(k) for k in range(n_workers)))
        assert shard.version == n_steps
        return final_state(shard)

    first = run(0)
    for seed in (1, 2):
        assert_states_identical(first, run(seed))


def test_sync_applies_the_weighted_average_of_gradients_and_assignments():
    shard = make_shard("sync", range(3), SGD(learning_rate=0.5))
    pushes = random_pushes(3, 1)
    weights = [1 / 8, 2 / 8, 5 / 8]
    means = [np.array([1.0, 2.0], np.float32), np.array([3.0, -1.0], np.float32), np.array([0.0, 4.0], np.float32)]
    for k in range(3):
        ack = shard.push(k, 0, pushes[k, 0], {"bn/mean": means[k]}, weight=weights[k])
        assert ack == PushAck(version=1 if k == 2 else 0)
    got = pulled(shard)
    for n in TRAINABLE:
        avg = sum(w * pushes[k, 0][n].astype(np.float64) for k, w in enumerate(weights)) / sum(weights)
        np.testing.assert_allclose(got[n], initial()[n] - 0.5 * avg, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["bn/mean"], [(1 + 6 + 0) / 8, (2 - 2 + 20) / 8], rtol=1e-6)


def test_sync_zero_weights_drop_out_and_all_zero_applies_nothing_but_advances():
    shard = make_shard("sync", range(3))
    shard.push(0, 0, {"b": ones_like("b", 100.0)}, {"bn/mean": ones_like("bn/mean", 100.0)}, weight=0)
    shard.push(1, 0, {"b": ones_like("b", 1.0)}, {"bn/mean": ones_like("bn/mean", 1.0)}, weight=0.5)
    shard.push(2, 0, {"b": ones_like("b", 3.0)}, {"bn/mean": ones_like("bn/mean", 3.0)}, weight=0.5)
    got = pulled(shard)
    np.testing.assert_array_equal(got["b"], initial()["b"] - 2.0)
    np.testing.assert_array_equal(got["bn/mean"], [2.0, 2.0])
    for k in range(3):
        shard.push(k, 1, {"b": ones_like("b", 9.0)}, {"bn/mean": ones_like("bn/mean", 9.0)}, weight=0)
    assert shard.version == 2
    after = pulled(shard)
    for n in after:
        np.testing.assert_array_equal(after[n], got[n])


def test_sync_single_worker_matches_the_in_process_store_bit_for_bit():
    # One worker with any weight: the average is its gradient exactly (float64 accumulation).
    pushes = random_pushes(1, 4)
    shard = make_shard("sync", [0], Adam(0.05))
    store = ParameterStore(initial(), set(TRAINABLE), Optimizer(Adam(0.05), get_backend("cpu")))
    for t in range(4):
        shard.push(0, t, pushes[0, t], weight=0.75)
        store.push(pushes[0, t])
    got = pulled(shard)
    for n in got:
        np.testing.assert_array_equal(got[n], store.pull()[n], err_msg=n)


def test_sync_worker_may_run_ahead_and_barriers_complete_in_turn():
    shard = make_shard("sync", [0, 1])
    for t in range(3):
        assert shard.push(0, t, {"b": ones_like("b", 1.0)}).version == 0
    assert shard.stats()["pending_steps"] == {0: [0], 1: [0], 2: [0]}
    assert shard.push(1, 0, {"b": ones_like("b", 3.0)}).version == 1
    assert shard.push(1, 1, {"b": ones_like("b", 3.0)}).version == 2
    np.testing.assert_array_equal(pulled(shard)["b"], initial()["b"] - 4.0)


# ---- idempotency ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_a_retried_push_is_acknowledged_and_applied_once(mode):
    shard = make_shard(mode, [0, 1])
    g = {"b": ones_like("b", 1.0)}
    assert not shard.push(0, 0, g).duplicate
    assert shard.push(0, 0, g).duplicate  # retried while (sync) buffered
    assert not shard.push(1, 0, g).duplicate
    retry = shard.push(0, 0, g)  # retried after it was applied
    assert retry.duplicate and retry.version == shard.version
    assert shard.push(1, 0, g).duplicate
    want = initial()["b"] - (1.0 if mode == "sync" else 2.0)
    np.testing.assert_array_equal(pulled(shard)["b"], want)
    stats = shard.stats()
    assert stats["duplicates"] == 3 and stats["applied_pushes"] == 2
    assert stats["clocks"] == {0: 1, 1: 1}


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_retries_of_the_same_push_apply_once(mode):
    shard = make_shard(mode, [0])
    acks = []
    run_threads(*(lambda: acks.append(shard.push(0, 0, {"b": ones_like("b", 1.0)})) for _ in range(8)))
    assert sorted(a.duplicate for a in acks) == [False] + [True] * 7
    np.testing.assert_array_equal(pulled(shard)["b"], initial()["b"] - 1.0)


# ---- rejections change nothing -------------------------------------------------------------------
def bad_push(kind):
    """(worker, step, grads, assigns, weight) for worker 1's next step, broken as ``kind``."""
    good = {"w": ones_like("w", 0.25), "b": ones_like("b", 0.25)}
    grads, assigns, worker, step, weight = dict(good), {}, 1, 1, 1.0
    if kind == "unknown_variable":
        grads["nope"] = np.ones(2, np.float32)
    elif kind == "not_trainable":
        grads["bn/mean"] = np.ones(2, np.float32)
    elif kind == "shape":
        grads["b"] = np.ones(3, np.float32)
    elif kind == "dtype":
        grads["b"] = np.ones(2, np.float64)
    elif kind == "nan":
        grads["b"] = np.array([0.0, np.nan], np.float32)
    elif kind == "inf":
        grads["w"] = np.full((2, 3), -np.inf, np.float32)
    elif kind == "assign_nan":
        assigns["bn/mean"] = np.array([np.nan, 0.0], np.float32)
    elif kind == "unknown_worker":
        worker = 7
    elif kind == "negative_weight":
        weight = -1.0
    elif kind == "nan_weight":
        weight = float("nan")
    elif kind == "negative_step":
        step = -1
    else:
        raise AssertionError(kind)
    return worker, step, grads, assigns, weight


REASONS = {
    "unknown_variable": "unknown_variable",
    "not_trainable": "unknown_variable",
    "shape": "shape",
    "dtype": "dtype",
    "nan": "non_finite",
    "inf": "non_finite",
    "assign_nan": "non_finite",
    "unknown_worker": "unknown_worker",
    "negative_weight": "bad_weight",
    "nan_weight": "bad_weight",
    "negative_step": "bad_step",
}


def snapshot(shard):
    stats = shard.stats()
    return final_state(shard), shard.version, stats["pending_steps"], stats["clocks"]


def assert_unchanged(shard, before):
    (state, version, pending, clocks) = before
    assert_states_identical(final_state(shard), state)
    assert shard.version == version
    stats = shard.stats()
    assert stats["pending_steps"] == pending and stats["clocks"] == clocks


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_rejected_push_changes_nothing(kind, mode):
    shard = make_shard(mode, [0, 1], Adam(0.1))
    for k in (0, 1):  # step 0 done: the optimizer has state to protect
        shard.push(k, 0, {"w": ones_like("w", 1.0), "b": ones_like("b", 1.0)})
    shard.push(0, 1, {"b": ones_like("b", 2.0)})  # sync: something is buffered, too
    before = snapshot(shard)
    worker, step, grads, assigns, weight = bad_push(kind)
    with pytest.raises(PushRejected) as info:
        shard.push(worker, step, grads, assigns, weight=weight)
    assert info.value.reason == REASONS[kind]
    assert_unchanged(shard, before)
    assert shard.stats()["rejected"] == {REASONS[kind]: 1}
    # The rejected push was not recorded as received: the good one is accepted.
    assert not shard.push(1, 1, {"b": ones_like("b", 2.0)}).duplicate


def test_rejections_say_who_what_and_how_to_fix():
    shard = make_shard("sync", [0, 1])
    where = r"job 'test' shard 0: push from worker {} step 0: "
    with pytest.raises(PushRefused, match=where.format(7) + r"worker 7 is not live here \(live: \[0, 1\]\)"):
        shard.push(7, 0, {})
    with pytest.raises(PushRejected, match=where.format(0) + r"push rejected for variable 'b': shape \(3,\) does not match"):
        shard.push(0, 0, {"b": np.ones(3, np.float32)})
    with pytest.raises(PushRefused, match=r"weight -2.0 is out of range; allowed \[0, 1\]"):
        shard.push(0, 0, {}, weight=-2)


def test_sync_push_for_a_step_completed_without_the_worker_is_stale():
    shard = make_shard("sync", [0, 1])
    for k in (0, 1):
        shard.push(k, 0, {"b": ones_like("b", 1.0)})
    shard.set_live_workers([0, 1, 2])  # worker 2 joins at version 1
    before = snapshot(shard)
    with pytest.raises(PushRefused, match=r"pull version 1 and push step 1") as info:
        shard.push(2, 0, {"b": ones_like("b", 1.0)})
    assert info.value.reason == "stale_step"
    assert_unchanged(shard, before)
    assert not shard.push(2, 1, {"b": ones_like("b", 1.0)}).duplicate


def test_sync_steps_must_arrive_in_order_per_worker():
    shard = make_shard("sync", [0, 1])
    shard.push(0, 0, {"b": ones_like("b", 1.0)})
    before = snapshot(shard)
    with pytest.raises(PushRefused) as info:
        shard.push(1, 1, {"b": ones_like("b", 1.0)})  # worker 1 skipped step 0
    assert info.value.reason == "out_of_order"
    assert_unchanged(shard, before)
    with pytest.raises(PushRefused, match="out_of_order|step 1 has not arrived"):
        shard.push(0, 2, {"b": ones_like("b", 1.0)})  # worker 0 skipped step 1


# ---- waiting: ssp and sync ---------------------------------------------------------------------
def test_ssp_fast_worker_waits_until_the_slowest_catches_up():
    shard = make_shard("ssp", [0, 1], staleness=2)
    g = {"b": ones_like("b", 1.0)}
    for t in range(3):  # worker 0 runs ahead; worker 1 has not pushed at all
        shard.pull(0, t, timeout=0.01)  # within 2 steps of the slowest: no wait
        shard.push(0, t, g)
    with pytest.raises(TimeoutError) as info:
        shard.pull(0, 3, timeout=0.05)  # 3 steps ahead of worker 1
    msg = str(info.value)
    for part in ("job 'test'", "shard 0", "worker 0 for step 3", "clock 1", "staleness 2", "slowest is worker 1 at clock 0"):
        assert part in msg, (part, msg)
    done, result = in_background(lambda: shard.pull(0, 3, timeout=5))
    assert not done.wait(0.1)
    shard.push(1, 0, g)
    assert done.wait(2)
    version, params = result[0]
    assert version == 4
    np.testing.assert_array_equal(params["b"], initial()["b"] - 4.0)


def test_ssp_with_zero_staleness_is_lockstep():
    shard = make_shard("ssp", [0, 1], staleness=0)
    shard.push(0, 0, {"b": ones_like("b", 1.0)})
    with pytest.raises(TimeoutError):
        shard.pull(0, 1, timeout=0.02)
    shard.pull(1, 0, timeout=0.02)  # the slow worker itself never waits
    shard.push(1, 0, {"b": ones_like("b", 1.0)})
    shard.pull(0, 1, timeout=0.02)


def test_async_pull_never_waits():
    shard = make_shard("async", [0, 1])
    shard.push(0, 0, {"b": ones_like("b", 1.0)})
    assert shard.pull(0, 100, min_version=50, timeout=0.01)[0] == 1


def test_sync_pull_waits_for_the_barrier():
    shard = make_shard("sync", [0, 1])
    done, result = in_background(lambda: shard.pull(0, 1, min_version=1, timeout=5))
    shard.push(0, 0, {"b": ones_like("b", 1.0)})
    assert not done.wait(0.1)
    shard.push(1, 0, {"b": ones_like("b", 3.0)})
    assert done.wait(2)
    version, params = result[0]
    assert version == 1
    np.testing.assert_array_equal(params["b"], initial()["b"] - 2.0)


def test_sync_pull_timeout_names_the_missing_workers():
    shard = make_shard("sync", [0, 1, 2])
    shard.push(1, 0, {"b": ones_like("b", 1.0)})
    with pytest.raises(TimeoutError) as info:
        shard.pull(1, 1, min_version=1, timeout=0.05)
    msg = str(info.value)
    for part in ("job 'test'", "shard 0", "worker 1", "version >= 1 (now 0)", "worker(s) [0, 2]"):
        assert part in msg, (part, msg)


def test_pull_returns_copies():
    shard = make_shard("async", [0])
    _, params = shard.pull(0, 0)
    params["b"][:] = 99
    np.testing.assert_array_equal(pulled(shard)["b"], initial()["b"])


def test_pulls_never_see_a_torn_update():
    # Every async push moves all of "w" by the same amount; a pull must see one version.
    shard = make_shard("async", [0, 1], names=["w"])
    stop = threading.Event()

    def pusher(k):
        def loop():
            for t in range(200):
                shard.push(k, t, {"w": ones_like("w", 1.0)})
            stop.set()

        return loop

    def puller():
        while not stop.is_set():
            version, params = shard.pull(0, 0)
            np.testing.assert_array_equal(params["w"], initial()["w"] - version)

    run_threads(pusher(0), pusher(1), puller)


# ---- membership ---------------------------------------------------------------------------------
def test_removing_a_dead_worker_releases_the_sync_barrier():
    shard = make_shard("sync", [0, 1, 2])
    shard.push(0, 0, {"b": ones_like("b", 1.0)})
    shard.push(1, 0, {"b": ones_like("b", 3.0)})
    done, result = in_background(lambda: shard.pull(0, 1, min_version=1, timeout=5))
    assert not done.wait(0.05)
    shard.set_live_workers([0, 1])
    assert done.wait(2)
    version, params = result[0]
    assert version == 1
    np.testing.assert_array_equal(params["b"], initial()["b"] - 2.0)
    with pytest.raises(PushRefused) as info:
        shard.push(2, 1, {"b": ones_like("b", 1.0)})
    assert info.value.reason == "unknown_worker"
    assert shard.stats()["live_workers"] == [0, 1]


def test_a_removed_workers_buffered_push_is_not_averaged():
    shard = make_shard("sync", [0, 1, 2])
    shard.push(2, 0, {"b": ones_like("b", 100.0)})  # then worker 2 dies
    shard.set_live_workers([0, 1])
    assert shard.stats()["pending_steps"] == {}
    shard.push(0, 0, {"b": ones_like("b", 1.0)})
    shard.push(1, 0, {"b": ones_like("b", 3.0)})
    np.testing.assert_array_equal(pulled(shard)["b"], initial()["b"] - 2.0)


def test_removing_the_slowest_worker_releases_ssp_waiters():
    shard = make_shard("ssp", [0, 1], staleness=0)
    shard.push(0, 0, {"b": ones_like("b", 1.0)})
    done, _ = in_background(lambda: shard.pull(0, 1, timeout=5))
    assert not done.wait(0.05)
    shard.set_live_workers([0])
    assert done.wait(2)


def test_a_joining_worker_starts_at_the_slowest_clock():
    shard = make_shard("ssp", [0], staleness=0)
    for t in range(3):
        shard.push(0, t, {"b": ones_like("b", 1.0)})
    shard.set_live_workers([0, 1])
    assert shard.stats()["clocks"] == {0: 3, 1: 3}
    shard.pull(0, 3, timeout=0.01)  # worker 1 holds nobody back


def test_a_readded_sync_worker_continues_from_the_current_step():
    shard = make_shard("sync", [0, 1])
    shard.push(1, 0, {"b": ones_like("b", 5.0)})  # buffered, then worker 1 is removed
    shard.set_live_workers([0])
    shard.push(0, 0, {"b": ones_like("b", 1.0)})
    shard.set_live_workers([0, 1])
    assert not shard.push(1, 1, {"b": ones_like("b", 3.0)}).duplicate
    shard.push(0, 1, {"b": ones_like("b", 1.0)})
    np.testing.assert_array_equal(pulled(shard)["b"], initial()["b"] - 1.0 - 2.0)


# ---- construction, closing, stats ---------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "bsp"}, r"Shard.mode='bsp' is not a consistency mode; use one of \['sync', 'async', 'ssp'\]"),
        ({"mode": "ssp", "staleness": -1}, r"Shard.staleness=-1 is out of range"),
        ({"mode": "ssp", "staleness": 1.5}, r"Shard.staleness=1.5 is out of range"),
        ({"workers": [0, -1]}, r"worker index -1 is invalid"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    args = {"mode": "sync", "staleness": 0, "workers": [0]} | kwargs
    with pytest.raises(ValueError, match=match):
        Shard("test", 0, initial(), set(TRAINABLE), SGD(0.1), args.pop("mode"), **args)


def test_initial_values_are_copied():
    init = initial()
    shard = Shard("test", 0, init, set(TRAINABLE), "sgd", workers=[0])
    init["b"][:] = 42
    np.testing.assert_array_equal(pulled(shard)["b"], initial()["b"])


def test_close_wakes_waiters_and_refuses_further_calls():
    shard = make_shard("sync", [0, 1])
    done, result = in_background(lambda: shard.pull(0, 1, min_version=1, timeout=5))
    assert not done.wait(0.05)
    shard.close()
    assert done.wait(2)
    assert isinstance(result[0], RuntimeError) and "closed" in str(result[0])
    with pytest.raises(RuntimeError, match="job 'test' shard 0 is closed"):
        shard.push(0, 0, {"b": ones_like("b", 1.0)})
    shard.close()  # twice is fine


def test_stats_count_bytes_pushes_duplicates_and_rejections():
    shard = make_shard("async", [0, 1])
    g = {"w": ones_like("w", 1.0), "b": ones_like("b", 1.0)}
    shard.push(0, 0, g)
    shard.push(0, 0, g)
    shard.push(1, 4, g)
    with pytest.raises(PushRejected):
        shard.push(9, 0, g)
    with pytest.raises(PushRejected):
        shard.push(0, 1, {"b": np.ones(5, np.float32)})
    shard.pull(0, 1)
    stats = shard.stats()
    param_bytes = sum(v.nbytes for v in initial().values())
    assert stats["version"] == 2 and stats["applied_pushes"] == 2 and stats["duplicates"] == 1
    assert stats["rejected"] == {"unknown_worker": 1, "shape": 1}
    assert stats["clocks"] == {0: 1, 1: 5}
    assert stats["bytes"] == param_bytes and not stats["restored"]
    assert stats["pushed_bytes"] == 2 * (24 + 8)
    assert stats["pulled_bytes"] == param_bytes


@pytest.mark.parametrize("immutable", [False, True])
def test_a_push_waiting_at_the_barrier_does_not_depend_on_the_callers_array(immutable):
    """Sync keeps its own copy of a waiting push (the caller reuses its buffers) unless
    the caller promised the array never changes; the push that completes the barrier is
    applied as it is."""
    shard = make_shard("sync", [0, 1])
    g0 = ones_like("b", 1.0)
    shard.push(0, 0, {"b": g0}, immutable=immutable)
    if not immutable:
        g0[:] = 100.0  # the caller's next step overwrites its buffer
    g1 = ones_like("b", 3.0)
    shard.push(1, 0, {"b": g1})
    np.testing.assert_array_equal(pulled(shard)["b"], initial()["b"] - 2.0)  # lr 1, average of 1 and 3
