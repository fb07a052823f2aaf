"""How long a job stalls when a parameter-server shard dies, and how much work it redoes.

    python bench/recovery.py [--runs 3] [--epochs 60] [--mode sync|async]

A local cluster (2 workers, 2 shards, sync by default, the digits MLP) runs a job; at a
random step past the first checkpoint the bench SIGKILLs shard 1 and restarts it the
way the supervisor does (``LocalProcessLauncher.restart``). Printed per run: the time
from the kill to shard 0's first applied step after the kill (in sync mode, after the rollback: the
job's next step), the steps recomputed (the steps shard 0 had applied minus the version
the shards rolled back to), and whether the job SUCCEEDED. The kill points come from ``--seed``,
printed so a run can be replayed. Target: under 5 s to the next step.
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


def one_run(client, handle, launcher, epochs: int, mode: str, kill_step: int) -> dict:
    """Kill shard 1 once shard 0 has applied ``kill_step`` steps; watch shard 0's version."""
    from pstrain.transport.ps_client import ParameterServerClient

    job_id = client.submit(job(epochs, mode))["id"]
    while status(client, job_id)["state"] == "PENDING":
        time.sleep(0.02)
    shard0 = ParameterServerClient(status(client, job_id)["workers"] and _shard_address(handle, 0))
    try:
        while (version := _version(shard0, job_id)) < kill_step:
            time.sleep(0.005)
        victim = handle.pids["ps"][1]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        launcher.restart(handle, "ps", 1)
        # The next step: shard 0 applies a step after the kill (in sync, after the rollback).
        low = version
        while True:
            now_version = _version(shard0, job_id)
            if now_version < low:
                low = now_version  # rolled back
            elif now_version > low and (mode != "sync" or low < version):
                break
            time.sleep(0.005)
        stalled = time.monotonic() - killed
    finally:
        shard0.close()
    while (s := status(client, job_id))["state"] in ("PENDING", "RUNNING"):
        time.sleep(0.1)
    rolled = [int(m.group(1)) for e in s["events"] if (m := re.search(r"rolled back to version (\d+)", e))]
    return {"reached": version, "stall_s": stalled, "recomputed": version - rolled[-1] if rolled else 0,
            "state": s["state"], "events": [e for e in s["events"] if "shard 1" in e]}


def _shard_address(handle, index: int) -> str:
    from client.launchers.base import tail
    from client.launchers.local import parse_ready_line

    return parse_ready_line(tail(handle.logs["ps"][index], 400), "ps")


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
        spec = ClusterSpec(workers=2, ps=2, port=0, state_dir=state, heartbeat_timeout=5.0)
        with local_cluster(spec, launcher, supervise=False) as handle:
            client = MasterClient(handle.master_address, connect_timeout=10)
            try:
                for run in range(args.runs):
                    kill_step = rng.randrange(150, 600)
                    row = one_run(client, handle, launcher, args.epochs, args.mode, kill_step)
                    rows.append(row)
                    print(f"run {run + 1}: killed shard 1 at step {row['reached']}: next step after "
                          f"{row['stall_s']:.2f} s, {row['recomputed']} steps recomputed, job {row['state']}",
                          flush=True)
                    for e in row["events"]:
                        print(f"    {e}")
            finally:
                client.close()
    stalls = [r["stall_s"] for r in rows]
    ok = all(r["state"] == "SUCCEEDED" for r in rows) and max(stalls) < TARGET_SECONDS
    print(f"\ntime to the next step: median {statistics.median(stalls):.2f} s, max {max(stalls):.2f} s "
          f"(target < {TARGET_SECONDS:.0f} s); steps recomputed: {[r['recomputed'] for r in rows]}")
    print(("PASS" if ok else "FAIL") + f"  {args.mode}: every job SUCCEEDED and resumed within {TARGET_SECONDS:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
