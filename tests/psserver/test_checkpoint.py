"""Checkpoints: atomic files (a crash mid-write leaves the previous one intact),
optimizer state round trips, and shards that restore and continue bit-identically."""
from __future__ import annotations

import os

import numpy as np
import pytest

from psserver import checkpoint as ckpt
from psserver.checkpoint import CheckpointConfig, CheckpointState, load_checkpoint, save_checkpoint
from psserver.shard import Shard
from pstrain.kernels import get_backend
from pstrain.runtime.optimizers import SGD, Adam, Optimizer
from tests.psserver.test_shard import TRAINABLE, assert_states_identical, final_state, initial, pulled, random_pushes

pytestmark = pytest.mark.filterwarnings("error")


def sample_state(version=1) -> CheckpointState:
    arrays = {
        "params/dense/kernel": np.arange(12, dtype=np.float32).reshape(3, 4) * version,
        "f64": np.array([1.5, -2.25]),
        "i64": np.array([1, 2, 3], np.int64),
        "flags": np.array([True, False]),
        "scalar": np.array(7.0, np.float32),
        "empty": np.zeros((0,), np.float32),
    }
    meta = {"version": version, "clocks": {"0": 3}, "nested": [1, {"a": None}], "np": np.int64(5)}
    return CheckpointState(arrays, meta)


def assert_checkpoint_equal(got: CheckpointState, want: CheckpointState):
    assert got.arrays.keys() == want.arrays.keys()
    for k, a in want.arrays.items():
        assert got.arrays[k].dtype == a.dtype and got.arrays[k].shape == a.shape, k
        np.testing.assert_array_equal(got.arrays[k], a, err_msg=k)


def temp_files(directory):
    return [p for p in os.listdir(directory) if p.endswith(".tmp")]


# ---- the file format --------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    path = tmp_path / "sub" / "shard-0.ckpt"  # the directory is created
    assert load_checkpoint(path) is None
    save_checkpoint(path, sample_state())
    got = load_checkpoint(path)
    assert_checkpoint_equal(got, sample_state())
    assert got.meta == {"version": 1, "clocks": {"0": 3}, "nested": [1, {"a": None}], "np": 5}
    save_checkpoint(path, sample_state(2))  # overwrite
    assert load_checkpoint(path).meta["version"] == 2
    assert temp_files(path.parent) == []


def test_a_torn_temp_file_from_a_crash_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "shard-0.ckpt"
    save_checkpoint(path, sample_state(1))
    # A crash mid-write: garbage in the temp file, never renamed.
    (tmp_path / ".shard-0.ckpt.abc123.tmp").write_bytes(b"PK\x03\x04 half a zip")
    got = load_checkpoint(path)
    assert got.meta["version"] == 1
    assert_checkpoint_equal(got, sample_state(1))


def test_a_failure_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "shard-0.ckpt"
    save_checkpoint(path, sample_state(1))
    real = np.lib.format.write_array
    calls = []

    def dies_on_second_array(member, array, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            member.write(b"\x93NUMPY partial")
            raise OSError("disk full")
        return real(member, array, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", dies_on_second_array)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, sample_state(2))
    monkeypatch.undo()
    assert load_checkpoint(path).meta["version"] == 1
    assert temp_files(tmp_path) == []


def test_a_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "shard-0.ckpt"
    save_checkpoint(path, sample_state(1))

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(path, sample_state(2))
    monkeypatch.undo()
    assert load_checkpoint(path).meta["version"] == 1
    assert temp_files(tmp_path) == []


def test_save_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    save_checkpoint(tmp_path / "c.ckpt", sample_state())
    if os.path.isdir("/proc/self/fd"):
        assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    else:
        assert [e for e, _ in events] == ["fsync", "replace", "fsync"]


def test_unsaveable_state_is_refused_and_the_previous_checkpoint_kept(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, sample_state(1))
    with pytest.raises(ValueError):
        save_checkpoint(path, CheckpointState({"x": np.array([object()], dtype=object)}, {}))
    with pytest.raises(ValueError):
        save_checkpoint(path, CheckpointState({}, {"loss": float("nan")}))
    assert load_checkpoint(path).meta["version"] == 1
    assert temp_files(tmp_path) == []


def test_a_damaged_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "c.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="c.ckpt is unreadable .*move it aside to start over"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"path": ""}, "path is empty"), ({"path": "x", "every_versions": -1}, r"every_versions=-1 is out of range"),
     ({"path": "x", "every_seconds": -1.0}, r"every_seconds=-1.0 is out of range"),
     ({"path": "x", "every_seconds": float("nan")}, r"every_seconds=nan is out of range")],
)
def test_checkpoint_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointConfig(**kwargs)


# ---- optimizer state -----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [SGD(0.1), SGD(0.1, momentum=0.9), Adam(0.01)], ids=["sgd", "momentum", "adam"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_optimizer_state_dict_round_trip_continues_bit_identically(config, backend):
    be = get_backend(backend)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(4).astype(np.float32) for _ in range(6)]
    p_a = np.linspace(-1, 1, 4).astype(np.float32)
    a = Optimizer(config, be)
    for g in grads[:3]:
        a.apply("w", p_a, g)
    saved = a.state_dict()
    assert saved["w"]["t"] == 3 and isinstance(saved["w"]["t"], int)
    b = Optimizer(config, be)
    b.load_state_dict(saved)
    for k, v in saved["w"].items():  # the state dicts are copies, not views
        if k != "t":
            v[...] = 123
    p_b = p_a.copy()
    for g in grads[3:]:
        a.apply("w", p_a, g)
        b.apply("w", p_b, g)
    np.testing.assert_array_equal(p_a, p_b)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa["w"]:
        np.testing.assert_array_equal(sa["w"][k], sb["w"][k], err_msg=k)


def test_optimizer_refuses_another_kinds_state():
    adam = Optimizer(Adam(0.01), get_backend("reference"))
    adam.apply("w", np.zeros(2, np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"'w' has keys \['m', 't', 'v'\]; SGD needs \['t', 'velocity'\]"):
        Optimizer(SGD(0.1), get_backend("reference")).load_state_dict(adam.state_dict())


# ---- shards: periodic checkpoints and restore -----------------------------------------------------
def make_shard(mode, path=None, workers=(0, 1), optimizer=None, every=0, **kwargs):
    return Shard(
        "test", 0, initial(), set(TRAINABLE), optimizer or Adam(0.05), mode,
        staleness=1 if mode == "ssp" else 0, workers=workers,
        checkpoint=CheckpointConfig(path, every_versions=every) if path else None, **kwargs,
    )


def drive(shard, pushes, steps, workers=(0, 1)):
    """Push steps in a fixed order, with batch-norm-like assignments too."""
    for t in steps:
        for k in workers:
            g = pushes[k, t]
            shard.push(k, t, g, {"bn/mean": g["b"] * 0.5}, weight=(k + 1) / 3)  # shares of the global batch


@pytest.mark.parametrize("optimizer", [SGD(0.1, momentum=0.9), Adam(0.05)], ids=["momentum", "adam"])
@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_restored_shard_continues_bit_identically(tmp_path, mode, optimizer):
    pushes = random_pushes(2, 6)
    uninterrupted = make_shard(mode, optimizer=optimizer)
    drive(uninterrupted, pushes, range(6))

    path = tmp_path / "shard-0.ckpt"
    first = make_shard(mode, path, optimizer=optimizer)
    drive(first, pushes, range(3))
    if mode == "sync":
        first.push(0, 3, pushes[0, 3], {"bn/mean": pushes[0, 3]["b"] * 0.5}, weight=1 / 3)  # buffered at the barrier
    before = final_state(first), first.version
    first.close()

    restored = make_shard(mode, path, optimizer=optimizer)
    assert restored.stats()["restored"]
    assert_states_identical(final_state(restored), before[0])
    assert restored.version == before[1]
    if mode == "sync":  # the buffered push survived: its retry is a duplicate, worker 1 completes step 3
        assert restored.push(0, 3, pushes[0, 3], {"bn/mean": pushes[0, 3]["b"] * 0.5}, weight=1 / 3).duplicate
        assert restored.push(1, 3, pushes[1, 3], {"bn/mean": pushes[1, 3]["b"] * 0.5}, weight=2 / 3).version == 4
        drive(restored, pushes, range(4, 6))
    else:
        drive(restored, pushes, range(3, 6))
    assert_states_identical(final_state(restored), final_state(uninterrupted))
    assert restored.version == uninterrupted.version
    assert restored.stats()["clocks"] == uninterrupted.stats()["clocks"]


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_a_push_retried_after_restart_is_a_duplicate(tmp_path, mode):
    path = tmp_path / "shard-0.ckpt"
    pushes = random_pushes(2, 2)
    shard = make_shard(mode, path, every=1)
    drive(shard, pushes, range(2))
    state = final_state(shard)
    del shard  # a crash: no close(), only the periodic checkpoints
    restored = make_shard(mode, path)
    for k in (0, 1):
        for t in (0, 1):
            assert restored.push(k, t, pushes[k, t]).duplicate
    assert_states_identical(final_state(restored), state)


def test_shard_checkpoints_every_n_versions(tmp_path):
    path = tmp_path / "shard-0.ckpt"
    shard = make_shard("async", path, every=3)
    pushes = random_pushes(2, 4)
    drive(shard, pushes, range(2))  # versions 1..4
    assert load_checkpoint(path).meta["version"] == 3
    drive(shard, pushes, range(2, 3))  # versions 5, 6
    assert load_checkpoint(path).meta["version"] == 6
    stats = shard.stats()
    # Version 0 is written when the shard starts (a rollback can always go back to it).
    assert stats["checkpoint_version"] == 6 and stats["checkpoints_written"] == 3
    assert stats["checkpoint_versions"] == [3, 6] and load_checkpoint(f"{path}.prev").meta["version"] == 3
    shard.close()
    assert load_checkpoint(path).meta["version"] == 6
    assert shard.stats()["checkpoints_written"] == 4


def test_a_failed_periodic_checkpoint_does_not_fail_the_push(tmp_path, monkeypatch):
    path = tmp_path / "shard-0.ckpt"
    shard = make_shard("async", path, every=1)
    pushes = random_pushes(2, 2)
    shard.push(0, 0, pushes[0, 0])

    def full(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", full)
    assert shard.push(0, 1, pushes[0, 1]).version == 2  # applied and acknowledged
    assert shard.stats()["checkpoint_errors"] == 1
    with pytest.raises(OSError, match="disk full"):  # but a failed final checkpoint is reported
        shard.close()
    monkeypatch.undo()
    restored = make_shard("async", path)
    assert restored.version == 1  # the last good checkpoint
    assert not restored.push(0, 1, pushes[0, 1]).duplicate  # the lost push is taken again


def test_restore_with_a_dead_worker_completes_its_barrier(tmp_path):
    path = tmp_path / "shard-0.ckpt"
    shard = make_shard("sync", path, workers=[0, 1, 2], optimizer=SGD(1.0))
    shard.push(0, 0, {"b": np.ones(2, np.float32)})
    shard.push(1, 0, {"b": np.full(2, 3.0, np.float32)})
    shard.close()
    restored = make_shard("sync", path, workers=[0, 1], optimizer=SGD(1.0))  # worker 2 is gone
    assert restored.version == 1
    np.testing.assert_array_equal(pulled(restored)["b"], initial()["b"] - 2.0)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"job": "other"}, r"is for job='test', not 'other'"),
        ({"mode": "async"}, r"is for mode='sync', not 'async'"),
        ({"optimizer": SGD(0.1)}, r"holds adam state, not sgd"),
        ({"variables": {"w": np.zeros((3, 3), np.float32)}}, r"variable 'w' is float32\[2, 3\] there but float32\[3, 3\] here"),
        ({"variables": {"extra": np.zeros(1, np.float32)}}, r"holds variables \['b', 'bn/mean', 'w'\] but this shard has"),
    ],
)
def test_a_checkpoint_from_another_setup_is_refused(tmp_path, change, match):
    path = tmp_path / "shard-0.ckpt"
    make_shard("sync", path).close()
    variables = initial() | change.get("variables", {})
    with pytest.raises(ValueError, match=match):
        Shard(
            change.get("job", "test"), 0, variables, set(TRAINABLE), change.get("optimizer", Adam(0.05)),
            change.get("mode", "sync"), workers=[0, 1], checkpoint=CheckpointConfig(path),
        )
