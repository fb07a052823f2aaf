"""Checkpoints bounded by time as well as versions (fault-tolerance issue, shard recovery):
a slow job loses at most ``every_seconds`` of work to a shard's restart. Async and SSP
shards checkpoint on their own clock; sync shards must all checkpoint the same version
(a rollback needs one they share), so a shard whose time bound passed answers
``checkpoint_due`` and the worker marks its next push on every shard."""
from __future__ import annotations

import time

import numpy as np

from psserver.checkpoint import CheckpointConfig
from psserver.config import PSConfig
from psserver.service import serve
from psserver.shard import Shard
from pstrain.runtime.optimizers import SGD
from pstrain.runtime.placement import layout
from pstrain.transport.ps_client import ParameterServerClient, ShardedParameterClient
from tests.psserver.test_shard import TRAINABLE, initial, random_pushes


def _shard(mode, path, seconds):
    return Shard("test", 0, initial(), set(TRAINABLE), SGD(0.1), mode, workers=(0, 1),
                 checkpoint=CheckpointConfig(path, every_versions=0, every_seconds=seconds))


def _warm_up(tmp_path):
    """Compile the optimizer's kernels first: a first push's compile time counts against the clock."""
    warm = _shard("async", tmp_path / "warm.ckpt", 0)
    warm.push(0, 0, random_pushes(1, 1)[0, 0], weight=0.5)
    warm.close()


def test_an_async_shard_checkpoints_on_its_own_clock(tmp_path):
    _warm_up(tmp_path)
    shard = _shard("async", tmp_path / "a.ckpt", 0.2)
    pushes = random_pushes(1, 4)
    shard.push(0, 0, pushes[0, 0], weight=0.5)
    assert shard.stats()["checkpoint_versions"] == [0]  # v0 at start; the bound has not passed
    time.sleep(0.25)
    shard.push(0, 1, pushes[0, 1], weight=0.5)
    assert shard.stats()["checkpoint_versions"] == [0, 2]
    time.sleep(0.25)  # nothing new since: no checkpoint for an idle shard
    assert shard.stats()["checkpoint_versions"] == [0, 2]


def test_a_sync_shard_checkpoints_at_the_step_a_worker_marks(tmp_path):
    _warm_up(tmp_path)
    shard = _shard("sync", tmp_path / "s.ckpt", 0.2)
    pushes = random_pushes(2, 4)
    assert not shard.push(0, 0, pushes[0, 0], weight=0.5).checkpoint_due
    assert not shard.push(1, 0, pushes[1, 0], weight=0.5).checkpoint_due
    time.sleep(0.25)
    assert shard.push(0, 1, pushes[0, 1], weight=0.5).checkpoint_due  # due, but not on its own
    shard.push(1, 1, pushes[1, 1], weight=0.5)
    assert shard.stats()["checkpoint_versions"] == [0]
    shard.push(0, 2, pushes[0, 2], weight=0.5, checkpoint=True)  # the worker's mark
    shard.push(1, 2, pushes[1, 2], weight=0.5)
    assert shard.stats()["checkpoint_versions"] == [0, 3]
    assert not shard.push(0, 3, pushes[0, 3], weight=0.5).checkpoint_due  # the clock started again


def test_sync_shards_checkpoint_the_same_versions_on_time(tmp_path):
    """Two real shard servers, one worker's client: the time-bound checkpoints land on
    the same versions on both, whichever shard's bound passed first."""
    variables = {"w": ((8, 4), np.float32)}
    placement = layout(variables, [("w", 0, 0, 4), ("w", 1, 4, 8)], 2)
    servers, addresses = [], []
    for s in range(2):
        server, port, servicer = serve(PSConfig(port=0, checkpoint_dir=str(tmp_path / f"ps{s}")))
        servers.append((server, servicer))
        addresses.append(f"127.0.0.1:{port}")
    try:
        for s, address in enumerate(addresses):
            c = ParameterServerClient(address)
            c.init_shard("job-t", s, {f"w[{4 * s}:{4 * s + 4}]": np.zeros((4, 4), np.float32)},
                         {f"w[{4 * s}:{4 * s + 4}]"}, '{"name": "sgd", "learning_rate": 0.1}', "sync", 0, [0],
                         checkpoint_every=0, checkpoint_seconds=0.15 * (s + 1))
            c.close()
        client = ShardedParameterClient("job-t", 0, addresses, placement)
        client.pull()
        for step in range(40):
            client.push_pull(step, {"w": np.full((8, 4), 0.01, np.float32)}, {}, min_version=step + 1)
            time.sleep(0.02)
        client.close()
        held = [ParameterServerClient(a).status("job-t")["checkpoint_versions"] for a in addresses]
        assert held[0] == held[1] and held[0][-1] > 0, held
    finally:
        for server, servicer in servers:
            servicer.close()
            server.stop(grace=None)
