"""Consistency policies as pure objects: each rule checked on plain inputs, no shard, no server."""
from __future__ import annotations

import math

import pytest

from psserver.consistency import AsyncPolicy, ConsistencyPolicy, Refusal, SspPolicy, SyncPolicy, policy_for, slowest
from pstrain.runtime.modes import MODES, Mode

POLICIES = [SyncPolicy(), AsyncPolicy(), SspPolicy(0), SspPolicy(2)]


# ---- modes and the factory ------------------------------------------------------------------------
def test_mode_is_a_plain_string_enum():
    assert MODES == ("sync", "async", "ssp")
    assert [Mode.parse(m) for m in MODES] == [Mode.SYNC, Mode.ASYNC, Mode.SSP]
    assert Mode.SSP == "ssp" and str(Mode.SSP) == "ssp" and f"{Mode.ASYNC}" == "async"
    assert Mode.parse(Mode.SYNC) is Mode.SYNC


@pytest.mark.parametrize("bad", ["bsp", "SYNC", "", None, 1])
def test_mode_parse_names_the_field_and_the_choices(bad):
    with pytest.raises(ValueError, match=rf"Job.mode={bad!r} is not a consistency mode; use one of \['sync', 'async', 'ssp'\]"):
        Mode.parse(bad, field="Job.mode")


@pytest.mark.parametrize(
    "mode, staleness, want",
    [
        ("sync", 0, SyncPolicy()),
        ("sync", 3, SyncPolicy()),  # a job may carry a staleness whatever its mode
        ("async", 0, AsyncPolicy()),
        (Mode.ASYNC, 5, AsyncPolicy()),
        ("ssp", 0, SspPolicy(0)),
        (Mode.SSP, 4, SspPolicy(4)),
    ],
)
def test_policy_for(mode, staleness, want):
    got = policy_for(mode, staleness)
    assert got == want and type(got) is type(want)
    assert got.mode == Mode.parse(mode)
    assert got.staleness == (staleness if want.mode is Mode.SSP else 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("staleness", [-1, 1.5, True, "2"])
def test_policy_for_refuses_a_bad_staleness(mode, staleness):
    with pytest.raises(ValueError, match=rf"staleness={staleness!r} is out of range; allowed integers \[0, inf\)"):
        policy_for(mode, staleness)


def test_policy_for_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match=r"mode='bsp' is not a consistency mode"):
        policy_for("bsp")


def test_policies_are_frozen():
    with pytest.raises(Exception):
        SspPolicy(2).staleness = 3  # type: ignore[misc]


# ---- buffering and weights ------------------------------------------------------------------------
@pytest.mark.parametrize("policy, buffers", [(SyncPolicy(), True), (AsyncPolicy(), False), (SspPolicy(1), False)])
def test_only_sync_buffers_pushes_for_a_barrier(policy, buffers):
    assert policy.buffers_pushes is buffers


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@pytest.mark.parametrize("weight", [0.0, 0.25, 1.0, 32.0])
def test_a_push_counts_with_its_weight(policy, weight):
    assert policy.gradient_scale(weight) == weight


@pytest.mark.parametrize("policy", [AsyncPolicy(), SspPolicy(0), SspPolicy(3)], ids=repr)
@pytest.mark.parametrize("live", [set(), {0}, {0, 1, 2}])
def test_apply_on_arrival_never_completes_a_barrier(policy, live):
    assert not policy.barrier_complete({0, 1, 2}, live)


# ---- sync barriers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n", [(k, n) for n in (1, 2, 4) for k in range(n + 1)])
def test_sync_barrier_completes_when_all_live_workers_pushed(k, n):
    live, arrived = set(range(n)), set(range(k))
    assert SyncPolicy().barrier_complete(arrived, live) is (k == n)


@pytest.mark.parametrize(
    "arrived, live, complete",
    [
        ({0, 1}, {0, 1, 2}, False),
        ({0, 1, 2}, {0, 1}, True),  # worker 2 was lost after it pushed: its push does not count against
        ({0, 2}, {0, 1}, False),  # lost worker 2 pushed, live worker 1 did not
        ({1}, {1}, True),  # all others lost
        ({0, 1}, set(), False),  # nobody live: nothing to complete
        (set(), set(), False),
    ],
)
def test_sync_barrier_after_lost_workers(arrived, live, complete):
    assert SyncPolicy().barrier_complete(arrived, live) is complete


@pytest.mark.parametrize(
    "step, version, last_step, want",
    [
        (3, 3, 2, None),  # the step being gathered
        (0, 0, None, None),  # a worker's first push
        (4, 3, 3, None),  # running one step ahead, in order
        (5, 3, 4, None),
        (2, 3, 1, "stale_step"),  # step 2 completed without it
        (0, 3, None, "stale_step"),
        (5, 3, 3, "out_of_order"),  # skipped step 4
        (4, 3, None, "out_of_order"),
    ],
)
def test_sync_push_order(step, version, last_step, want):
    got = SyncPolicy().check_step(step, version, last_step)
    if want is None:
        assert got is None
    else:
        assert isinstance(got, Refusal) and got.reason == want
        assert str(step if want == "stale_step" else step - 1) in got.message


@pytest.mark.parametrize("policy", [AsyncPolicy(), SspPolicy(2)], ids=repr)
@pytest.mark.parametrize("step, version, last_step", [(0, 9, None), (7, 3, 1), (2, 2, 1)])
def test_apply_on_arrival_takes_pushes_in_any_step_order(policy, step, version, last_step):
    assert policy.check_step(step, version, last_step) is None


@pytest.mark.parametrize("last_step, version, want", [(5, 3, 2), (2, 3, 2), (1, 3, 1), (0, 0, -1)])
def test_sync_forgets_a_removed_workers_buffered_steps(last_step, version, want):
    assert SyncPolicy().received_after_removal(last_step, version) == want


@pytest.mark.parametrize("policy", [AsyncPolicy(), SspPolicy(1)], ids=repr)
def test_apply_on_arrival_keeps_a_removed_workers_steps(policy):
    assert policy.received_after_removal(5, 3) == 5


# ---- pulls ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, min_version, ready", [(0, 0, True), (3, 2, True), (3, 3, True), (3, 4, False)])
def test_sync_pull_waits_for_min_version(version, min_version, ready):
    clocks = {0: 0, 1: 99}  # clocks do not matter in sync
    assert SyncPolicy().pull_ready(step=7, min_version=min_version, version=version, live={0, 1}, clocks=clocks) is ready


@pytest.mark.parametrize("policy", [AsyncPolicy(), SyncPolicy()], ids=repr)
def test_sync_and_async_ignore_clocks(policy):
    assert policy.pull_ready(step=100, min_version=0, version=0, live={0, 1}, clocks={0: 0, 1: 0})


def test_async_pulls_never_wait():
    assert AsyncPolicy().pull_ready(step=10**6, min_version=10**6, version=0, live={0}, clocks={0: 0})


@pytest.mark.parametrize("staleness", [0, 1, 2, 5])
@pytest.mark.parametrize("step", range(0, 9))
def test_ssp_bound(staleness, step):
    clocks = {0: 8, 1: 3, 2: 5}  # worker 1 is slowest: it has pushed steps 0..2
    ready = SspPolicy(staleness).pull_ready(step, min_version=99, version=0, live={0, 1, 2}, clocks=clocks)
    assert ready is (step - staleness <= 3)


@pytest.mark.parametrize("staleness", [0, 2])
def test_ssp_ignores_lost_workers_and_releases_when_none_live(staleness):
    policy = SspPolicy(staleness)
    clocks = {0: 6, 1: 0}
    assert not policy.pull_ready(6, 0, 0, live={0, 1}, clocks=clocks)
    assert policy.pull_ready(6, 0, 0, live={0}, clocks=clocks)  # worker 1 was removed
    assert policy.pull_ready(6, 0, 0, live=set(), clocks=clocks)


@pytest.mark.parametrize(
    "live, clocks, want",
    [
        (set(), {}, (None, math.inf)),
        ({3}, {3: 7}, (3, 7)),
        ({0, 1, 2}, {0: 4, 1: 2, 2: 2}, (1, 2)),  # ties go to the lowest index
        ({0, 2}, {0: 4, 1: 0, 2: 3}, (2, 3)),  # worker 1 is not live
    ],
)
def test_slowest(live, clocks, want):
    assert slowest(live, clocks) == want


def test_wait_reasons_say_what_a_pull_waits_for():
    sync = SyncPolicy().wait_reason(4, 3, 2, live={0, 1, 2}, clocks={}, arrived={1})
    assert "version >= 3 (now 2)" in sync and "step 2 still waits for worker(s) [0, 2]" in sync
    ssp = SspPolicy(2).wait_reason(3, 0, 0, live={0, 1}, clocks={0: 3, 1: 0}, arrived=set())
    assert "clock 1" in ssp and "staleness 2" in ssp and "slowest is worker 1 at clock 0" in ssp


def test_every_mode_has_a_policy():
    for mode in Mode:
        policy = policy_for(mode)
        assert isinstance(policy, ConsistencyPolicy) and policy.mode is mode
