"""How long a job stalls when a parameter-server shard or a worker dies, and how much work it redoes.

    python bench/recovery.py [--runs 3] [--epochs 60] [--mode sync|async] [--role ps|worker]
                             [--heartbeat-timeout 5]

A local cluster (2 workers, 2 shards, sync by default, the digits MLP) runs a job; at a
random step past the first checkpoint the bench SIGKILLs shard 1 (``--role ps``) or the
process running worker slot 1 (``--role worker``) and restarts it the way the supervisor
does (``LocalProcessLauncher.restart``). Printed per run: the time from the kill to
shard 0's first applied step after the kill (in sync mode, after the rollback or the
slot's hand-over: the job's next step), the steps recomputed (the steps shard 0 had
applied minus the version the shards rolled back to), and whether the job SUCCEEDED.
A lost worker is noticed after the heartbeat timeout, which therefore bounds its stall
from below. The kill points come from ``--seed``, printed so a run can be replayed.
Target: under 5 s to the next step (for a worker: beyond the heartbeat timeout).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_SECONDS = 5.0


def job(epochs: int, mode: str):
    from client import nn
    from client.job import Job, job_to_spec

    model = nn.Sequential([nn.Dense(32, activation="relu", input_dim=64), nn.Dense(10, activation="softmax")], seed=7)
    model.compile(nn.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return job_to_spec(Job(model, dataset="digits", batch_size=64, epochs=epochs, mode=mode, num_shards=2),
                       f"recovery-{mode}")


def status(client, job_id):
    import grpc

    while True:
        try:
            return client.get(job_id)
        except grpc.RpcError:
            time.sleep(0.05)


def one_run(client, handle, launcher, epochs: int, mode: str, kill_step: int, role: str = "ps") -> dict:
    """Kill shard 1 (or worker slot 1's process) once shard 0 has applied ``kill_step``
    steps; watch shard 0's version."""
    from pstrain.transport.ps_client import ParameterServerClient

    job_id = client.submit(job(epochs, mode))["id"]
    while status(client, job_id)["state"] == "PENDING":
        time.sleep(0.02)
    shard0 = ParameterServerClient(status(client, job_id)["workers"] and _shard_address(handle, 0),
                                   credentials=handle.node_credentials())
    try:
        while (version := _version(shard0, job_id)) < kill_step:
            time.sleep(0.005)
        index = 1 if role == "ps" else _worker_index(handle, status(client, job_id)["workers"]["1"]["node"])
        victim = handle.pids[role][index]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        launcher.restart(handle, role, index)
        # The next step: shard 0 applies a step after the kill (in sync, after the rollback).
        # A dead shard: the next step shard 0 applies (in sync mode after the rollback). A dead
        # worker: slot 1's next push that shard 0 receives from its new process (a push the
        # old one had in flight at the kill does not count; after a rollback, the first).
        low, wait_rollback = version, mode == "sync" and role == "ps"
        pushed = _slot_clock(shard0, job_id) + 1
        while True:
            now_version = _version(shard0, job_id)
            if now_version < low:
                low, wait_rollback = now_version, False  # rolled back
                pushed = _slot_clock(shard0, job_id)
            elif role == "worker" and _slot_clock(shard0, job_id) > pushed:
                break
            elif role == "ps" and now_version > low and not wait_rollback:
                break
            time.sleep(0.005)
        stalled = time.monotonic() - killed
    finally:
        shard0.close()
    while (s := status(client, job_id))["state"] in ("PENDING", "RUNNING"):
        time.sleep(0.1)
    rolled = [int(m.group(1)) for e in s["events"] if (m := re.search(r"rolled back to version (\d+)", e))]
    what = "shard 1" if role == "ps" else "worker 1"
    return {"reached": version, "stall_s": stalled, "recomputed": version - rolled[-1] if rolled else 0,
            "state": s["state"], "events": [e for e in s["events"] if what in e]}


def _worker_index(handle, node_id: str) -> int:
    """Which launched worker process the master knows as ``node_id`` (the last
    ``PSTRAIN_READY worker <id>`` line of each log: a restarted process appends to it)."""
    from client.launchers.local import parse_ready_line

    for i, path in enumerate(handle.logs["worker"]):
        with open(path, errors="replace") as f:
            ready = [r for line in f if (r := parse_ready_line(line, "worker"))]
        if ready and ready[-1] == node_id:
            return i
    raise RuntimeError(f"no launched worker process registered as {node_id}")


def _shard_address(handle, index: int) -> str:
    from client.launchers.base import tail
    from client.launchers.local import parse_ready_line

    return parse_ready_line(tail(handle.logs["ps"][index], 400), "ps")


def _slot_clock(shard, job_id: str, slot: int = 1) -> int:
    """How many steps worker slot ``slot`` has pushed to ``shard``."""
    import grpc

    try:
        return int(shard.status(job_id)["clocks"].get(str(slot), 0))
    except grpc.RpcError:
        return -1


def _version(shard, job_id: str) -> int:
    import grpc

    try:
        return int(shard.status(job_id)["version"])
    except grpc.RpcError:
        return -1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--role", choices=["ps", "worker"], default="ps", help="what to kill (default: shard 1)")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0, help="the master's (how soon a node is lost)")
    p.add_argument("--seed", type=int, default=None, help="seed of the kill points (default: random, printed)")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    print(f"kill points from --seed {seed}", flush=True)

    from client.launchers import ClusterSpec, LocalProcessLauncher, local_cluster
    from pstrain.transport.master_client import MasterClient

    launcher = LocalProcessLauncher()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pstrain-recovery-") as state:
        spec = ClusterSpec(workers=2, ps=2, port=0, state_dir=state, heartbeat_timeout=args.heartbeat_timeout)
        with local_cluster(spec, launcher, supervise=False) as handle:
            client = MasterClient(handle.master_address, connect_timeout=10, credentials=handle.user_credentials())
            try:
                for run in range(args.runs):
                    kill_step = rng.randrange(150, 600)
                    row = one_run(client, handle, launcher, args.epochs, args.mode, kill_step, args.role)
                    rows.append(row)
                    victim = "shard 1" if args.role == "ps" else "worker 1's process"
                    print(f"run {run + 1}: killed {victim} at step {row['reached']}: next step after "
                          f"{row['stall_s']:.2f} s, {row['recomputed']} steps recomputed, job {row['state']}",
                          flush=True)
                    for e in row["events"]:
                        print(f"    {e}")
            finally:
                client.close()
    stalls = [r["stall_s"] for r in rows]
    # A lost worker is only noticed after the heartbeat timeout: the target counts from there.
    target = TARGET_SECONDS + (args.heartbeat_timeout if args.role == "worker" else 0.0)
    ok = all(r["state"] == "SUCCEEDED" for r in rows) and max(stalls) < target
    print(f"\ntime to the next step: median {statistics.median(stalls):.2f} s, max {max(stalls):.2f} s "
          f"(target < {target:.0f} s); steps recomputed: {[r['recomputed'] for r in rows]}")
    print(("PASS" if ok else "FAIL") + f"  {args.mode}, {args.role} killed: every job SUCCEEDED and resumed within "
          f"{target:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    from client.cli.common import sigterm_interrupts

    with sigterm_interrupts():  # killed (e.g. by timeout): the local cluster is stopped, not left running
        sys.exit(main())
