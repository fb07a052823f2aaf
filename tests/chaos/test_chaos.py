"""Chaos: real processes, real signals, at random steps. Each run kills or pauses one
role of a 2 worker x 2 shard local cluster mid-job and checks the job still ends
SUCCEEDED; sync runs end with weights bit-identical to an uninterrupted run of the same
job (computed once per module).

Async runs check the exactly-once invariant: every shard's final version (the pushes
it applied) equals the pushes an uninterrupted run makes, whoever computed them.

The kill points come from one seed, printed at the start of every test, so a failure
can be replayed: ``PSTRAIN_CHAOS_SEED=<seed> pytest tests/chaos``. Every wait is bounded.
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from client.job import job_to_spec
from tests.integration.helpers import all_gone, make_job, running_cluster, service_env, wait_job

pytestmark = pytest.mark.slow

EPOCHS = 40  # digits, batch 64: 23 steps an epoch, 920 steps
SEED = int(os.environ.get("PSTRAIN_CHAOS_SEED", random.randrange(2**31)))


def spec(mode: str, name: str):
    # Two workers, always: a job submitted while a restarted worker registers again waits for it.
    return job_to_spec(dataclasses.replace(make_job(epochs=EPOCHS, num_workers=2, num_shards=2), mode=mode), name)


def kill_step(case: str) -> int:
    step = random.Random(f"{SEED}-{case}").randrange(30, 600)
    print(f"chaos: PSTRAIN_CHAOS_SEED={SEED} -> {case} at step {step}")
    return step


def wait_through(client, job_id: str, timeout: float = 180.0, until=("SUCCEEDED", "FAILED", "CANCELLED")) -> dict:
    """``wait_job`` that keeps polling while the master is away."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return wait_job(client, job_id, timeout=max(deadline - time.monotonic(), 1.0), until=until)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("chaos"), workers=2, ps=2, heartbeat_timeout=2.0) as (h, launcher):
        from pstrain.transport.master_client import MasterClient

        client = MasterClient(h.master_address, connect_timeout=10)
        try:
            yield h, launcher, client
        finally:
            client.close()


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    _, _, client = cluster
    status = wait_job(client, client.submit(spec("sync", "uninterrupted"))["id"], timeout=180)
    assert status["state"] == "SUCCEEDED", status
    return client.export(status["id"])


def run_until(client, mode: str, name: str, step: int) -> str:
    job_id = client.submit(spec(mode, name))["id"]
    running = wait_job(client, job_id, timeout=60,
                       until=lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") or s["step"] >= step)
    assert running["state"] == "RUNNING", running
    return job_id


def shard_address(handle, index: int) -> str:
    from client.launchers.base import tail
    from client.launchers.local import parse_ready_line

    return parse_ready_line(tail(handle.logs["ps"][index], 2000), "ps")


def worker_pid(handle, client, node_id: str) -> int:
    """The pid of the worker process the master knows as ``node_id`` (node ids change when
    a worker registers again, its /metrics address does not)."""
    from client.launchers.local import connectable, parse_metrics_line

    address = next(n["metrics_address"] for n in client.nodes() if n["node_id"] == node_id)
    for pid, log in zip(handle.pids["worker"], handle.logs["worker"]):
        # The log's last such line: a restarted process appends to its predecessor's log.
        with open(log, errors="replace") as f:
            lines = [m for line in f if (m := parse_metrics_line(line, "worker"))]
        if lines and connectable(lines[-1]) == connectable(address):
            return pid
    raise AssertionError(f"no worker process serves /metrics at {address}")


def applied_pushes() -> int:
    """The pushes that carry examples in an uninterrupted 2-worker run: what each async
    shard applies (a worker's empty part of a short last batch is not applied)."""
    from client import datasets as client_datasets
    from pstrain.runtime.datasets import shard_indices

    n, batch = len(client_datasets.load("digits").x_train), make_job().batch_size
    sizes = [min(batch, n - s) for s in range(0, n, batch)]
    return EPOCHS * sum(sum(1 for k in range(2) if len(shard_indices(size, k, 2))) for size in sizes)


def shard_versions(final: dict) -> list[int]:
    event = next(e for e in final["events"] if e.startswith("succeeded;"))
    return [int(v) for v in event.split("shard versions [")[1].rstrip(")]").split(", ")]


def assert_bit_identical(client, job_id: str, uninterrupted) -> None:
    _, names, want = uninterrupted
    _, names2, got = client.export(job_id)
    assert names == names2
    for name, a, b in zip(names, want, got):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_a_shard(cluster, uninterrupted, mode):
    handle, launcher, client = cluster
    shard = random.Random(f"{SEED}-shard-{mode}").randrange(2)
    job_id = run_until(client, mode, f"kill-shard-{mode}", kill_step(f"kill shard {shard} ({mode})"))
    victim = handle.pids["ps"][shard]  # launch order; the job numbers its shards its own way
    address = shard_address(handle, shard)
    os.kill(victim, signal.SIGKILL)
    assert all_gone([victim], timeout=5)
    launcher.restart(handle, "ps", shard)  # what the supervisor does
    final = wait_through(client, job_id)
    assert final["state"] == "SUCCEEDED", final
    assert any(f"({address}) restarted" in e for e in final["events"]), final["events"]
    if mode == "sync":
        assert_bit_identical(client, job_id, uninterrupted)
    else:
        assert final["metrics"]["val_accuracy"] > 0.9


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_the_master(cluster, uninterrupted, tmp_path, mode):
    handle, _, client = cluster
    job_id = run_until(client, mode, f"kill-master-{mode}", kill_step(f"kill the master ({mode})"))
    master = handle.pids["master"][0]
    os.kill(master, signal.SIGKILL)
    assert all_gone([master], timeout=5)
    argv = handle.args["master"][0]  # the launcher's own command line, port pinned
    with open(tmp_path / "master.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=service_env(tmp_path), start_new_session=True)
    handle.pids["master"][0] = proc.pid  # the module's cluster stops it at the end
    final = wait_through(client, job_id)
    assert final["state"] == "SUCCEEDED", (final, (tmp_path / "master.log").read_text()[-2000:])
    assert any("resumed after the master restart" in e for e in final["events"])
    if mode == "sync":
        assert_bit_identical(client, job_id, uninterrupted)
    else:
        assert shard_versions(final) == [applied_pushes()] * 2, final["events"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_a_worker(cluster, uninterrupted, mode):
    """Its slot goes to the other process from where it stopped; the restarted process
    (what the supervisor does) takes a slot back."""
    handle, launcher, client = cluster
    slot = random.Random(f"{SEED}-worker-{mode}").randrange(2)
    job_id = run_until(client, mode, f"kill-worker-{mode}", kill_step(f"kill worker {slot} ({mode})"))
    victim = worker_pid(handle, client, client.get(job_id)["workers"][str(slot)]["node"])
    os.kill(victim, signal.SIGKILL)
    assert all_gone([victim], timeout=5)
    launcher.restart(handle, "worker", handle.pids["worker"].index(victim))
    final = wait_through(client, job_id)
    assert final["state"] == "SUCCEEDED", final
    assert final["workers"][str(slot)]["owner_epoch"] >= 1, final["workers"]
    assert any(f"worker {slot} lost at step" in e for e in final["events"]), final["events"]
    if mode == "sync":
        assert_bit_identical(client, job_id, uninterrupted)
    else:
        assert shard_versions(final) == [applied_pushes()] * 2, final["events"]
        assert final["metrics"]["val_accuracy"] > 0.9
    assert all(s.alive for s in launcher.status(handle))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigstop_a_worker_past_the_heartbeat_timeout(cluster, uninterrupted, mode):
    """Its slot goes to the other process; the resumed one is fenced off, registers
    again and takes a slot back."""
    handle, launcher, client = cluster
    job_id = run_until(client, mode, f"pause-worker-{mode}", kill_step(f"pause worker 1 ({mode})"))
    victim = worker_pid(handle, client, client.get(job_id)["workers"]["1"]["node"])
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_through(client, job_id, timeout=30,
                     until=lambda s: s["state"] != "RUNNING" or s["workers"]["1"]["owner_epoch"] >= 1)
    finally:
        os.kill(victim, signal.SIGCONT)
    final = wait_through(client, job_id)
    assert final["state"] == "SUCCEEDED", final
    assert final["workers"]["1"]["state"] == "done" and final["workers"]["1"]["owner_epoch"] >= 1, (final["workers"], final["events"])
    if mode == "sync":
        assert_bit_identical(client, job_id, uninterrupted)
    else:
        assert shard_versions(final) == [applied_pushes()] * 2, final["events"]
    # The resumed process lives on and registers again for the next jobs.
    assert all(s.alive for s in launcher.status(handle))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigstop_a_shard_past_the_heartbeat_timeout(cluster, uninterrupted, mode):
    """The master counts it lost; resumed, it registers again and the master recovers it
    as it would a restarted one (sync: every shard rolls back to a shared checkpoint)."""
    handle, launcher, client = cluster
    shard = random.Random(f"{SEED}-pause-shard-{mode}").randrange(2)
    job_id = run_until(client, mode, f"pause-shard-{mode}", kill_step(f"pause shard {shard} ({mode})"))
    victim = handle.pids["ps"][shard]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_through(client, job_id, timeout=30,
                     until=lambda s: s["state"] != "RUNNING" or any("waiting for it to restart" in e for e in s["events"]))
    finally:
        os.kill(victim, signal.SIGCONT)
    final = wait_through(client, job_id)
    assert final["state"] == "SUCCEEDED", final
    if mode == "sync":
        assert_bit_identical(client, job_id, uninterrupted)
    else:
        assert final["metrics"]["val_accuracy"] > 0.9
    assert all(s.alive for s in launcher.status(handle))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigstop_the_master_past_the_heartbeat_timeout(cluster, uninterrupted, mode):
    """Nodes cannot reach it meanwhile; resumed, it notices its own stall instead of
    counting every node lost, and the job ends as if nothing happened."""
    handle, launcher, client = cluster
    job_id = run_until(client, mode, f"pause-master-{mode}", kill_step(f"pause the master ({mode})"))
    master = handle.pids["master"][0]
    os.kill(master, signal.SIGSTOP)
    try:
        time.sleep(5.0)  # the chaos cluster's heartbeat timeout is 2 s
    finally:
        os.kill(master, signal.SIGCONT)
    final = wait_through(client, job_id)
    assert final["state"] == "SUCCEEDED", final
    assert not any(" lost" in e for e in final["events"]), final["events"]
    if mode == "sync":
        assert_bit_identical(client, job_id, uninterrupted)
    else:
        assert shard_versions(final) == [applied_pushes()] * 2, final["events"]
    assert all(s.alive for s in launcher.status(handle))
