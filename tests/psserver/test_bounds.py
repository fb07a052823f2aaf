"""Bounded everything (fault-tolerance issue): a push's step must be near the shard's
version, its weight a share of the global batch, a pull's wait is capped by the
server whatever the client asks, and re-initialising a job the shard holds is a
no-op for the same spec and refused for a different one. Each test is one of the
issue's reported bugs."""
from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from psserver.config import PSConfig
from psserver.shard import PullRefused, PushRefused
from tests.psserver.test_ps_service import JOB, SGD_LR1, cluster, init_one, initial, pull_one  # noqa: F401
from tests.psserver.test_shard import make_shard, ones_like, pulled


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_a_push_far_ahead_is_refused_and_later_pushes_still_count(mode):
    """Bug: one async push with step=10**12 made every later real push of that worker a
    duplicate; the job silently stopped learning."""
    shard = make_shard(mode, [0], step_window=100)
    with pytest.raises(PushRefused, match=r"step 1000000000000 .*version 0") as info:
        shard.push(0, 10**12, {"b": ones_like("b", 1.0)}, weight=1.0)
    assert info.value.reason == "bad_step"
    for step in range(3):
        ack = shard.push(0, step, {"b": ones_like("b", 1.0)}, weight=1.0)
        assert not ack.duplicate and ack.version == step + 1
    np.testing.assert_array_equal(pulled(shard)["b"], initial_b() - 3.0)


def initial_b():
    from tests.psserver.test_shard import initial as shard_initial

    return shard_initial()["b"]


def test_the_step_window_allows_ordinary_runs_ahead():
    shard = make_shard("async", [0, 1], step_window=4)
    for step in range(4):  # worker 0 alone: each push is applied, so version keeps up
        shard.push(0, step, {"b": ones_like("b", 0.0)}, weight=0.5)
    shard.push(1, 8, {"b": ones_like("b", 0.0)}, weight=0.5)  # version 4 + window 4
    with pytest.raises(PushRefused, match="more than 4 steps ahead") as info:
        shard.push(1, 14, {"b": ones_like("b", 0.0)}, weight=0.5)
    assert info.value.reason == "bad_step"


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
@pytest.mark.parametrize("weight", [1e300, 1.5, -0.1, float("nan"), float("inf")])
def test_a_weight_outside_the_batch_share_is_refused_before_anything_is_applied(mode, weight):
    """Bug: a finite gradient with weight=1e300 turned the parameters into -inf (the
    NaN/Inf check ran before the weight was applied)."""
    shard = make_shard(mode, [0])
    before = pulled(shard)
    with pytest.raises(PushRefused) as info:
        shard.push(0, 0, {"b": ones_like("b", 1e30)}, weight=weight)
    assert info.value.reason == "bad_weight" and "[0, 1]" in str(info.value)
    after = pulled(shard)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert shard.version == 0 and all(np.isfinite(v).all() for v in after.values())


def test_a_pull_far_beyond_the_version_is_refused_at_once():
    shard = make_shard("sync", [0], step_window=16)
    started = time.monotonic()
    with pytest.raises(PullRefused, match="min_version 1000000000, .*version 0"):
        shard.pull(0, 0, min_version=10**9, timeout=60)
    assert time.monotonic() - started < 1.0


# ---- over gRPC ----------------------------------------------------------------------------------
def test_the_server_caps_a_pull_wait_whatever_the_client_asks(cluster):  # noqa: F811
    """Bug: Pull calls with a huge min_version and a client-chosen timeout froze the
    shard's other jobs for as long as the client asked."""
    address = cluster.start(PSConfig(port=0, pull_timeout=0.5))
    c = init_one(cluster, address, "sync", [0])
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        c.pull(JOB, worker=0, step=1, min_version=1, timeout=3600)  # one step ahead: legal, but it never comes
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    with pytest.raises(grpc.RpcError) as info:
        c.pull(JOB, worker=0, step=1, min_version=10**9, timeout=3600)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "min_version" in info.value.details()


def test_init_shard_again_with_the_same_spec_is_idempotent(cluster):  # noqa: F811
    address = cluster.start()
    c = init_one(cluster, address, "async", [0])
    c.push(c.push_request(JOB, 0, 0, {"b": np.ones(3, np.float32)}, weight=1.0))
    resp = c.init_shard(JOB, 0, initial(), set(initial()), SGD_LR1, "async", 0, [0])  # a retried InitShard
    assert resp.version == 1  # the shard kept its state
    np.testing.assert_array_equal(pull_one(c)["b"], initial()["b"] - 1.0)


@pytest.mark.parametrize("change", ["mode", "optimizer", "variables", "workers", "trainable"])
def test_init_shard_for_a_held_job_with_another_spec_is_refused(cluster, change):  # noqa: F811
    """Bug: InitShard for a job id the shard already held returned OK and kept the old
    state, so a master restarted on a fresh database (reusing job ids) could serve stale
    parameters to a new job."""
    address = cluster.start()
    c = init_one(cluster, address, "async", [0])
    variables, trainable, optimizer, mode, workers = initial(), set(initial()), SGD_LR1, "async", [0]
    if change == "mode":
        mode = "sync"
    elif change == "optimizer":
        optimizer = json.dumps({"name": "sgd", "learning_rate": 0.5})
    elif change == "variables":
        variables = {**variables, "b": variables["b"] + 1}
    elif change == "workers":
        workers = [0, 1]
    else:
        trainable = {"w"}
    with pytest.raises(grpc.RpcError) as info:
        c.init_shard(JOB, 0, variables, trainable, optimizer, mode, 0, workers)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert JOB in info.value.details() and change.rstrip("s") in info.value.details()
    np.testing.assert_array_equal(pull_one(c)["b"], initial()["b"])  # the old shard, untouched


@pytest.mark.parametrize("window", [0, -5, 1.5, True])
def test_a_bad_step_window_is_refused_naming_it(window):
    with pytest.raises(ValueError, match=r"Shard.step_window=.* is out of range; allowed integers \[1, inf\)"):
        make_shard("async", [0], step_window=window)
