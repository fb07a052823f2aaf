"""Worker-slot fencing (fault-tolerance issue, scope 1 and 4): a process taking a worker
slot over gets a newer ownership epoch; from then on the shard refuses the old
process (``Fenced``) and answers where the slot stands, so the new process computes
it from there and the result is bit-identical to an uninterrupted run."""
from __future__ import annotations

import pytest

from psserver.shard import Fenced, RolledBack
from pstrain.runtime.optimizers import SGD
from tests.psserver.test_checkpoint import drive, make_shard
from tests.psserver.test_shard import assert_states_identical, final_state, in_background, random_pushes


def _push(shard, pushes, k, t, **kw):
    g = pushes[k, t]
    return shard.push(k, t, g, {"bn/mean": g["b"] * 0.5}, weight=(k + 1) / 3, **kw)


def test_fence_reports_the_slots_next_step_and_refuses_the_old_owner():
    pushes = random_pushes(2, 4)
    shard = make_shard("sync")
    drive(shard, pushes, range(2))
    _push(shard, pushes, 1, 2)  # slot 1 waits at barrier 2; its process then dies
    assert shard.fence(1, 1) == (2, 3)  # version 2; slot 1 has pushed up to step 2 here
    with pytest.raises(Fenced, match=r"worker slot 1 was taken over \(owner epoch 1\); this process holds epoch 0"):
        _push(shard, pushes, 1, 3)
    with pytest.raises(Fenced):
        shard.pull(1, 3)
    assert shard.stats()["rejected"]["fenced"] == 2 and shard.stats()["owners"] == {1: 1}
    with pytest.raises(Fenced):  # an older hand-over can never come back
        shard.fence(1, 0)
    # The new owner sends step 2 again (the same gradient: acknowledged, not applied twice).
    assert _push(shard, pushes, 1, 2, owner_epoch=1).duplicate
    assert shard.pull(0, 2)[0] == 2  # slot 0 is unaffected (its epoch is 0)


def test_a_slot_handed_over_mid_run_ends_bit_identical():
    pushes = random_pushes(2, 6)
    uninterrupted = make_shard("sync", optimizer=SGD(0.1, momentum=0.9))
    drive(uninterrupted, pushes, range(6))

    shard = make_shard("sync", optimizer=SGD(0.1, momentum=0.9))
    drive(shard, pushes, range(3))
    _push(shard, pushes, 0, 3)  # slot 1's process is lost before its step 3
    version, start = shard.fence(1, 1)
    assert (version, start) == (3, 3)
    done, result = in_background(lambda: shard.pull(1, start, min_version=start, timeout=5, owner_epoch=1))
    assert done.wait(5) and result[0][0] == 3
    for t in range(3, 6):
        if t > 3:
            _push(shard, pushes, 0, t)
        _push(shard, pushes, 1, t, owner_epoch=1)
    assert shard.version == 6
    assert_states_identical(final_state(shard), final_state(uninterrupted))


def test_ownership_survives_a_restart_and_never_goes_back_with_a_rollback(tmp_path):
    path = tmp_path / "shard-0.ckpt"
    shard = make_shard("sync", path, every=2)
    pushes = random_pushes(2, 4)
    drive(shard, pushes, range(2))  # checkpoint at version 2, owners {}
    shard.fence(1, 3)
    drive(shard, pushes, range(2, 4), workers=(0,))
    _push(shard, pushes, 1, 2, owner_epoch=3)
    _push(shard, pushes, 1, 3, owner_epoch=3)  # version 4: a checkpoint with owners {1: 3}
    shard.fence(1, 4)
    shard.rollback(2)  # that checkpoint predates both hand-overs
    with pytest.raises(Fenced):
        shard.pull(1, 2, owner_epoch=3)
    shard.close()
    again = make_shard("sync", path, every=2)
    assert again.stats()["owners"] == {1: 4}  # the checkpoint written at close holds the latest
    with pytest.raises(Fenced):
        again.pull(1, 0, owner_epoch=3)


def test_a_pull_past_a_rollback_is_told_to_start_over(tmp_path):
    """A process taking a sync slot over asks for the version of its first step; if the
    shards rolled back meanwhile it must start from the rolled-back version instead of
    waiting for a version nobody computes."""
    shard = make_shard("sync", tmp_path / "shard-0.ckpt", every=2)
    drive(shard, random_pushes(2, 3), range(3))
    shard.rollback(2)
    with pytest.raises(RolledBack, match="rolled back to version 2"):
        shard.pull(1, 3, min_version=3, timeout=1)
    assert shard.pull(1, 2, min_version=2)[0] == 2  # told once: then it pulls as usual
