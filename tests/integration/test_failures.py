"""Failures a user meets: a bad graph, a dead worker, no master, a cancelled job.

Each one must end in a clear answer (a status code and message naming the node, a
job that still succeeds, an exit code and one error line, a CANCELLED job whose
workers take the next one), never a hang or a traceback.
"""
from __future__ import annotations

import os
import re
import signal
import time

import grpc
import numpy as np
import pytest

from client.job import job_to_spec
from protos import codec, jobcodec
from pstrain.transport.ports import unused_port
from tests.integration.helpers import (
    all_gone,
    assert_same_weights,
    last_json,
    make_job,
    psctl,
    running_cluster,
    service_env,
    wait_job,
    worker_node_ids,
    write_job,
)


def _steps_per_epoch(batch_size: int = 64) -> int:
    from client import datasets

    return -(-len(datasets.load("digits").x_train) // batch_size)


# ---- (a) malformed graphs are refused at submission ----------------------------------------------
def _node(spec, name):
    return next(n for n in spec.model.graph.nodes if n.name == name)


def _dangling_input(spec):
    _node(spec, "dense/matmul").inputs[0] = "no_such_node"


def _unknown_op(spec):
    _node(spec, "dense/matmul").op = "frobnicate"


def _declared_shape_mismatch(spec):
    dims = _node(spec, "dense/matmul").shape.dims
    del dims[:]
    dims.extend([-1, 33])  # the matmul of (?, 64) and (64, 32) is (?, 32)


def _incompatible_operands(spec):
    # A consistent variable of the wrong size: the error is its consumer's, the matmul
    # of (?, 32) and (33, 10).
    kernel = _node(spec, "dense_1/kernel")
    del kernel.shape.dims[:]
    kernel.shape.dims.extend([33, 10])
    spec.model.graph.initial_values["dense_1/kernel"].CopyFrom(codec.tensor_to_proto(np.zeros((33, 10), np.float32)))


@pytest.mark.parametrize("corrupt, node, words", [
    (_dangling_input, "dense/matmul", "no_such_node"),
    (_unknown_op, "dense/matmul", "frobnicate"),
    (_declared_shape_mismatch, "dense/matmul", "shape"),
    (_incompatible_operands, "dense_1/matmul", "inner dimensions"),
], ids=["dangling-input", "unknown-op", "declared-shape", "incompatible-operands"])
def test_a_malformed_graph_is_refused_naming_the_node(master, corrupt, node, words):
    spec = jobcodec.job_spec_to_proto(job_to_spec(make_job(), "malformed"))  # what an untrusted client sends
    corrupt(spec)
    before = len(master.list())
    with pytest.raises(grpc.RpcError) as err:
        master.submit_message(spec)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    message = err.value.details()
    assert f"'{node}'" in message and words in message, message
    assert len(master.list()) == before  # refused before anything was recorded


# ---- (b) a worker dies mid-run --------------------------------------------------------------------
def _process_of_slot(handle, status: dict, slot: int) -> tuple[int, int]:
    """(index among the launched workers, pid) of the process running job worker ``slot``
    (launch order and registration order may differ)."""
    i = worker_node_ids(handle).index(status["workers"][str(slot)]["node"])
    return i, handle.pids["worker"][i]


@pytest.mark.slow
def test_sync_job_survives_a_killed_worker_bit_identically(tmp_path):
    """SIGKILL the process of worker 1 of a 2-worker sync job (bug: its part of every
    later batch was never trained, and a replacement registered but got no work). After
    the heartbeat timeout its slot goes to worker 0's process, which computes it from
    the step where it stopped; the restarted process then takes the slot back. The job
    ends SUCCEEDED with weights bit-identical to an uninterrupted run."""
    from pstrain.transport.master_client import MasterClient

    with running_cluster(tmp_path / "cluster", workers=2, ps=1, heartbeat_timeout=2.0) as (handle, launcher):
        client = MasterClient(handle.master_address, connect_timeout=10)
        try:
            baseline = wait_job(client, client.submit(job_to_spec(make_job(epochs=100), "uninterrupted"))["id"])
            assert baseline["state"] == "SUCCEEDED", baseline
            job = client.submit(job_to_spec(make_job(epochs=100), "kill-a-worker"))
            running = wait_job(client, job["id"], timeout=60,
                               until=lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") or s["step"] >= 20)
            assert running["state"] == "RUNNING", running
            index, victim = _process_of_slot(handle, running, 1)
            os.kill(victim, signal.SIGKILL)
            assert all_gone([victim], timeout=5)
            taken = wait_job(client, job["id"], timeout=30,
                             until=lambda s: s["state"] != "RUNNING" or s["workers"]["1"]["owner_epoch"] >= 1)
            assert taken["state"] == "RUNNING" and taken["workers"]["1"]["node"] == taken["workers"]["0"]["node"], taken
            launcher.restart(handle, "worker", index)  # what the supervisor does
            final = wait_job(client, job["id"], timeout=180)
            assert final["state"] == "SUCCEEDED", final
            assert final["error"] is None and final["epoch"] == 100
            events = "\n".join(final["events"])
            assert "worker 1 lost at step" in events and "worker 1 lost; continues on" in events, events
            assert "worker 1 moved to" in events, events  # the restarted process took its slot back
            assert final["workers"]["1"]["owner_epoch"] == 2 and final["workers"]["1"]["state"] == "done"
            restarted = [n for n in client.nodes() if n["name"] == f"worker-{index}"]
            assert sorted((n["alive"], n["restarts"]) for n in restarted) == [(False, 0), (True, 1)], restarted
            assert_same_weights(client, baseline["id"], job["id"])
            assert all(s.alive for s in launcher.status(handle)), launcher.status(handle)
        finally:
            client.close()


@pytest.mark.slow
def test_sync_job_survives_a_paused_worker_that_comes_back(tmp_path):
    """SIGSTOP worker 1 past the heartbeat timeout, then SIGCONT (bug: its refused push
    failed the whole job). Its slot goes to worker 0's process meanwhile; the resumed
    process is fenced off (the shards refuse it, its reports are ignored), registers
    again and takes a slot back. The job SUCCEEDS bit-identical to an uninterrupted run."""
    from pstrain.transport.master_client import MasterClient

    with running_cluster(tmp_path / "cluster", workers=2, ps=1, heartbeat_timeout=2.0) as (handle, launcher):
        client = MasterClient(handle.master_address, connect_timeout=10)
        try:
            baseline = wait_job(client, client.submit(job_to_spec(make_job(epochs=100), "uninterrupted"))["id"])
            assert baseline["state"] == "SUCCEEDED", baseline
            job = client.submit(job_to_spec(make_job(epochs=100), "pause-a-worker"))
            running = wait_job(client, job["id"], timeout=60,
                               until=lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") or s["step"] >= 20)
            assert running["state"] == "RUNNING", running
            _, victim = _process_of_slot(handle, running, 1)
            os.kill(victim, signal.SIGSTOP)
            try:
                taken = wait_job(client, job["id"], timeout=30,
                                 until=lambda s: s["state"] != "RUNNING" or s["workers"]["1"]["owner_epoch"] >= 1)
                assert taken["state"] == "RUNNING", taken
            finally:
                os.kill(victim, signal.SIGCONT)
            final = wait_job(client, job["id"], timeout=180)
            assert final["state"] == "SUCCEEDED", final
            assert final["error"] is None and final["epoch"] == 100
            assert final["workers"]["0"]["state"] == "done" and final["workers"]["1"]["state"] == "done"
            assert_same_weights(client, baseline["id"], job["id"])
            assert all(s.alive for s in launcher.status(handle)), launcher.status(handle)  # the resumed one too
        finally:
            client.close()


@pytest.mark.slow
def test_sync_job_survives_a_killed_and_restarted_master(tmp_path):
    """SIGKILL the master mid-job and start it again on the same port and database: the
    workers keep training (their reports wait), the nodes register again, the master
    resumes the job, and it ends SUCCEEDED with weights bit-identical to an
    uninterrupted run of the same job (bug: the restarted master marked it FAILED)."""
    import subprocess
    import sys

    from pstrain.transport.master_client import MasterClient

    with running_cluster(tmp_path / "cluster", workers=2, ps=1, heartbeat_timeout=2.0) as (handle, launcher):
        client = MasterClient(handle.master_address, connect_timeout=10)
        restarted = None
        try:
            baseline = wait_job(client, client.submit(job_to_spec(make_job(epochs=40), "uninterrupted"))["id"])
            assert baseline["state"] == "SUCCEEDED", baseline
            job = client.submit(job_to_spec(make_job(epochs=40), "master-killed"))
            running = wait_job(client, job["id"], timeout=60,
                               until=lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") or s["step"] >= 20)
            assert running["state"] == "RUNNING", running
            os.kill(handle.pids["master"][0], signal.SIGKILL)
            assert all_gone(handle.pids["master"], timeout=5)
            port = handle.master_address.rsplit(":", 1)[1]
            with open(tmp_path / "master-restarted.log", "wb") as log:
                restarted = subprocess.Popen(
                    [sys.executable, "-m", "master", "--host", "127.0.0.1", "--port", port,
                     "--db", os.path.join(handle.state_dir, "master.db"), "--heartbeat-timeout", "2.0",
                     "--metrics-port", "-1"],
                    stdout=log, stderr=subprocess.STDOUT, env=service_env(tmp_path), start_new_session=True,
                )
            final = _wait_through_restart(client, job["id"], timeout=120)
            assert final["state"] == "SUCCEEDED", (final, (tmp_path / "master-restarted.log").read_text()[-3000:])
            assert final["error"] is None and final["epoch"] == 40
            assert any("resumed after the master restart with workers [0, 1]" in e for e in final["events"])
            _, names, want = client.export(baseline["id"])
            _, names2, got = client.export(job["id"])
            assert names == names2
            for name, a, b in zip(names, want, got):
                np.testing.assert_array_equal(a, b, err_msg=name)
        finally:
            client.close()
            if restarted is not None:
                restarted.terminate()
                restarted.wait(10)


@pytest.mark.slow
def test_sync_job_survives_a_killed_and_restarted_shard_bit_identically(tmp_path):
    """SIGKILL shard 1 of a 2 x 2 sync job and start it again (what the supervisor does):
    it restores its latest checkpoint, the master rolls every shard back to a version
    they all hold, the workers compute the steps since again, and the job ends
    SUCCEEDED with weights bit-identical to an uninterrupted run (bug: the job FAILED)."""
    from pstrain.transport.master_client import MasterClient

    with running_cluster(tmp_path / "cluster", workers=2, ps=2, heartbeat_timeout=2.0) as (handle, launcher):
        client = MasterClient(handle.master_address, connect_timeout=10)
        try:
            baseline = wait_job(client, client.submit(job_to_spec(make_job(epochs=40, num_shards=2), "whole"))["id"])
            assert baseline["state"] == "SUCCEEDED", baseline
            job = client.submit(job_to_spec(make_job(epochs=40, num_shards=2), "shard-killed"))
            running = wait_job(client, job["id"], timeout=60,
                               until=lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") or s["step"] >= 250)
            assert running["state"] == "RUNNING", running
            victim = handle.pids["ps"][1]
            os.kill(victim, signal.SIGKILL)
            assert all_gone([victim], timeout=5)
            launcher.restart(handle, "ps", 1)
            final = wait_job(client, job["id"], timeout=180)
            assert final["state"] == "SUCCEEDED", final
            assert final["error"] is None and final["epoch"] == 40
            recovered = [e for e in final["events"] if "every shard rolled back to version" in e]
            assert recovered, final["events"]
            _, names, want = client.export(baseline["id"])
            _, _, got = client.export(job["id"])
            for name, a, b in zip(names, want, got):
                np.testing.assert_array_equal(a, b, err_msg=name)
        finally:
            client.close()


@pytest.mark.slow
def test_async_job_survives_a_killed_and_restarted_shard(tmp_path):
    """Async: the restarted shard continues from its checkpoint (at most one interval of
    its updates lost, none applied twice) while the other goes on; the job SUCCEEDS."""
    import dataclasses

    from pstrain.transport.master_client import MasterClient

    with running_cluster(tmp_path / "cluster", workers=2, ps=2, heartbeat_timeout=2.0) as (handle, launcher):
        client = MasterClient(handle.master_address, connect_timeout=10)
        try:
            job = client.submit(job_to_spec(dataclasses.replace(make_job(epochs=40, num_shards=2), mode="async"),
                                            "async-shard-killed"))
            running = wait_job(client, job["id"], timeout=60,
                               until=lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") or s["step"] >= 250)
            assert running["state"] == "RUNNING", running
            os.kill(handle.pids["ps"][1], signal.SIGKILL)
            launcher.restart(handle, "ps", 1)
            final = wait_job(client, job["id"], timeout=180)
            assert final["state"] == "SUCCEEDED", final
            # The launch order is not the job's shard order: either may be the one killed.
            assert any(re.search(r"shard [01] restarted from its checkpoint at version", e) for e in final["events"]), \
                final["events"]
            assert not any("rolled back" in e for e in final["events"])
            assert final["metrics"]["val_accuracy"] > 0.9
        finally:
            client.close()


def _wait_through_restart(client, job_id: str, timeout: float) -> dict:
    """``wait_job`` that keeps polling while the master is away (UNAVAILABLE)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return wait_job(client, job_id, timeout=max(deadline - time.monotonic(), 1.0))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ---- (c) no master ----------------------------------------------------------------------------------
def test_submit_without_a_master_fails_clearly(tmp_path, digits_jobfile):
    address = f"127.0.0.1:{unused_port()}"
    env = service_env(tmp_path)
    started = time.monotonic()
    out = psctl(["--master", address, "submit", digits_jobfile, "--wait"], env, timeout=60, check=False)
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr)  # 3: no master answers
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psctl: error: cannot reach the pstrain master at " + address), out.stderr
    assert "psctl up" in lines[0]  # says how to fix it
    assert time.monotonic() - started < 30  # the default 5 s connect timeout, not a hang


@pytest.mark.parametrize("command", [["list"], ["status", "job-000001"], ["cancel", "job-000001"]],
                         ids=["list", "status", "cancel"])
def test_other_commands_without_a_master_fail_clearly(tmp_path, command):
    address = f"127.0.0.1:{unused_port()}"
    out = psctl(["--master", address, "--connect-timeout", "1", *command], service_env(tmp_path), timeout=60,
                check=False)
    assert out.returncode == 3 and "cannot reach the pstrain master" in out.stderr, out.stderr


# ---- (d) cancel --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cancel_stops_a_running_job_and_frees_its_workers(tmp_path, cluster, master):
    handle, launcher = cluster
    env = service_env(tmp_path)
    long_job = write_job(tmp_path, "long.py", epochs=500)
    short_job = write_job(tmp_path, "short.py", epochs=2)
    submitted = last_json(psctl(["--master", handle.master_address, "submit", long_job, "--json"], env).stdout)
    assert submitted["state"] in ("PENDING", "RUNNING")
    job_id = submitted["id"]
    running = wait_job(master, job_id, timeout=60, until=lambda s: s["state"] != "PENDING" and s["step"] > 0)
    assert running["state"] == "RUNNING", running

    cancelled = last_json(psctl(["--master", handle.master_address, "cancel", job_id, "--json"], env).stdout)
    assert cancelled["id"] == job_id and cancelled["state"] == "CANCELLED"
    # A following job that needs both workers runs to the end: the cancelled one let them go.
    done = last_json(psctl(["--master", handle.master_address, "submit", short_job, "--workers", "2", "--wait",
                            "--json"], env, timeout=180).stdout)
    assert done["state"] == "SUCCEEDED" and sorted(done["workers"]) == ["0", "1"], done
    after = last_json(psctl(["--master", handle.master_address, "status", job_id, "--json"], env).stdout)
    assert after["state"] == "CANCELLED"  # late reports from the old task did not revive it
    assert "cancelled by the user" in after["events"]
    assert after["step"] < 500 * _steps_per_epoch()
    assert all(s.alive for s in launcher.status(handle))  # cancelling a job stops no process
    again = psctl(["--master", handle.master_address, "cancel", job_id], env, check=False)
    assert again.returncode == 1 and again.stderr.startswith("psctl: error:"), again.stderr
