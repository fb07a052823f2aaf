"""``psctl scale``: a running job's worker slots move between processes, each after its
current step, and a sync job's result does not change (bit-identical weights)."""
from __future__ import annotations

import pytest

from client.job import job_to_spec
from tests.integration.helpers import make_job, psctl, running_cluster, service_env, wait_job

pytestmark = pytest.mark.slow


def test_scale_a_running_sync_job_down_and_up_bit_identically(tmp_path):
    from pstrain.transport.master_client import MasterClient

    with running_cluster(tmp_path / "cluster", workers=2, ps=1, heartbeat_timeout=2.0) as (handle, _):
        client = MasterClient(handle.master_address, connect_timeout=10)
        env = service_env(tmp_path)
        try:
            baseline = wait_job(client, client.submit(job_to_spec(make_job(epochs=120), "unscaled"))["id"])
            assert baseline["state"] == "SUCCEEDED", baseline
            job_id = client.submit(job_to_spec(make_job(epochs=120), "scaled"))["id"]
            wait_job(client, job_id, timeout=60, until=lambda s: s["state"] != "RUNNING" or s["step"] >= 20)

            bad = psctl(["--master", handle.master_address, "scale", job_id, "--workers", "3"], env, check=False)
            assert bad.returncode == 1 and f"job {job_id} has 2 worker slots" in bad.stderr, bad.stderr
            out = psctl(["--master", handle.master_address, "scale", job_id, "--workers", "1"], env).stdout
            assert f"{job_id}: RUNNING; moving its worker slots to 1 worker process" in out
            one = wait_job(client, job_id, timeout=60, until=lambda s: s["state"] != "RUNNING" or len(
                {w["node"] for w in s["workers"].values()}) == 1)
            assert one["state"] == "RUNNING", one
            moved = [k for k, w in one["workers"].items() if w["owner_epoch"] == 1]
            assert len(moved) == 1 and "moved to" in one["workers"][moved[0]]["note"], one["workers"]

            psctl(["--master", handle.master_address, "scale", job_id, "--workers", "2"], env)
            two = wait_job(client, job_id, timeout=60, until=lambda s: s["state"] != "RUNNING" or len(
                {w["node"] for w in s["workers"].values()}) == 2)
            final = wait_job(client, job_id, timeout=180)
            assert final["state"] == "SUCCEEDED", final
            assert len({w["node"] for w in two["workers"].values()}) == 2, two  # back on two processes
            assert any("scaled to 1 worker processes" in e for e in final["events"])
            _, names, want = client.export(baseline["id"])
            _, _, got = client.export(job_id)
            for name, a, b in zip(names, want, got):
                assert (a == b).all(), name
        finally:
            client.close()
