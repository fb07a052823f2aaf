"""Shard rollback (fault-tolerance issue, shard recovery): sync shards checkpoint at the
same versions, keep the previous checkpoint too, and roll back to one of them; workers
are told (RolledBack) until they pull again, and computing the steps again ends
bit-identical to a run that never rolled back. Checkpoints of another run of the same
job id are never restored."""
from __future__ import annotations

import pytest

from psserver.shard import RolledBack
from pstrain.runtime.optimizers import SGD
from tests.psserver.test_checkpoint import assert_states_identical, drive, final_state, make_shard
from tests.psserver.test_shard import in_background, random_pushes


@pytest.mark.parametrize("target", [4, 2])  # the latest checkpoint, and the previous one
def test_sync_rollback_then_recompute_is_bit_identical(tmp_path, target):
    pushes = random_pushes(2, 7)
    uninterrupted = make_shard("sync", optimizer=SGD(0.1, momentum=0.9))
    drive(uninterrupted, pushes, range(7))

    shard = make_shard("sync", tmp_path / "shard-0.ckpt", every=2, optimizer=SGD(0.1, momentum=0.9))
    drive(shard, pushes, range(5))
    shard.push(0, 5, pushes[0, 5], {"bn/mean": pushes[0, 5]["b"] * 0.5}, weight=1 / 3)  # waits at barrier 5
    assert shard.version == 5 and shard.stats()["checkpoint_versions"] == [2, 4]
    done, result = in_background(lambda: shard.pull(0, 6, min_version=6, timeout=10))  # waits for step 5

    assert shard.rollback(target) == target
    assert done.wait(5) and isinstance(result[0], RolledBack) and result[0].version == target
    for worker in (0, 1):  # told until it pulls again
        with pytest.raises(RolledBack, match=f"rolled back to version {target}; pull and compute again from step {target}"):
            shard.push(worker, 6, pushes[worker, 0], weight=0.5)
    for worker in (0, 1):
        assert shard.pull(worker, target)[0] == target
    drive(shard, pushes, range(target, 7))  # the steps again, as the workers recompute them
    assert shard.version == 7
    assert_states_identical(final_state(shard), final_state(uninterrupted))


def test_rollback_to_a_version_not_held_names_what_is_held(tmp_path):
    shard = make_shard("sync", tmp_path / "shard-0.ckpt", every=2)
    drive(shard, random_pushes(2, 3), range(3))
    with pytest.raises(ValueError, match=r"no checkpoint of version 1 \(it holds \[0, 2\]\)"):
        shard.rollback(1)
    assert shard.version == 3


def test_a_checkpoint_of_another_run_of_the_job_id_is_not_restored(tmp_path):
    path = tmp_path / "shard-0.ckpt"
    first = make_shard("sync", path, every=1, incarnation="run-a")
    drive(first, random_pushes(2, 3), range(3))
    first.close()
    again = make_shard("sync", path, every=1, incarnation="run-a")
    assert again.version == 3 and again.stats()["restored"]
    again.close()
    other = make_shard("sync", path, every=1, incarnation="run-b")  # a new job that reuses the id
    assert other.version == 0 and not other.stats()["restored"]
