"""Tests for the launcher interface and the local launcher (client/launchers/base.py, local.py).

The pure parts (state file, READY lines, log tails, config validation) are tested
directly. The launcher itself is tested against the real services (``python -m master``,
``psserver``, ``worker``) on port 0: never against stand-in scripts, which would only
test the stand-ins.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from client.launchers import (
    STATE_FILE,
    ClusterError,
    ClusterHandle,
    ClusterSpec,
    LocalProcessLauncher,
    connectable,
    describe_exit,
    load_handle,
    local_cluster,
    parse_ready_line,
    pid_alive,
    remove_handle,
    tail,
    write_handle,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _services_exist() -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("master.__main__", "psserver.__main__", "worker.__main__"))
    except ImportError:
        return False


needs_services = pytest.mark.skipif(not _services_exist(), reason="the master/psserver/worker entry points are not in this checkout")


# ---- pure helpers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, role, expected", [
    ("INFO starting\nPSTRAIN_READY master 127.0.0.1:40123\n", "master", "127.0.0.1:40123"),
    ("PSTRAIN_READY ps 127.0.0.1:5\n", "ps", "127.0.0.1:5"),
    ("PSTRAIN_READY worker worker-1a2b\n", "worker", "worker-1a2b"),
    ("PSTRAIN_READY worker\n", "worker", ""),
    ("PSTRAIN_READY ps 127.0.0.1:5\n", "master", None),
    ("log line mentioning PSTRAIN_READY master 1.2.3.4:5 in the middle\n", "master", None),
    ("PSTRAIN_READY master 127.0.0.1:401", "master", "127.0.0.1:401"),  # no newline yet
    ("", "master", None),
])
def test_parse_ready_line(text, role, expected):
    assert parse_ready_line(text, role) == expected


def test_connectable_maps_wildcard_hosts_to_loopback():
    assert connectable("0.0.0.0:5000") == "127.0.0.1:5000"
    assert connectable("[::]:5000") == "127.0.0.1:5000"
    assert connectable("10.0.0.2:5000") == "10.0.0.2:5000"


def test_tail_and_describe_exit(tmp_path):
    log = tmp_path / "ps-1.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "OSError: cannot listen on 127.0.0.1:5\n")
    assert tail(str(log), 3).splitlines() == ["line 98", "line 99", "OSError: cannot listen on 127.0.0.1:5"]
    assert tail(str(tmp_path / "missing.log")) == ""
    msg = describe_exit("ps", 1, 4242, 1, str(log), lines=2)
    assert msg.startswith("ps-1 (pid 4242) exited with code 1")
    assert str(log) in msg and "OSError: cannot listen" in msg and "line 97" not in msg
    assert "killed by signal 9" in describe_exit("worker", 0, 1, -9, str(log))
    assert "(the log is empty)" in describe_exit("worker", 0, 1, 2, str(tmp_path / "missing.log"))


def test_state_file_round_trip_is_atomic(tmp_path):
    spec = ClusterSpec(workers=3, ps=1, port=0, state_dir=str(tmp_path))
    handle = ClusterHandle("127.0.0.1:4000", str(tmp_path), pids={"master": [11], "ps": [12], "worker": [13, 14, 15]},
                           logs={"master": ["m.log"], "ps": ["p.log"], "worker": ["a", "b", "c"]}, spec=spec)
    path = write_handle(handle)
    assert path == str(tmp_path / STATE_FILE)
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind
    loaded = load_handle(str(tmp_path))
    assert loaded == handle and loaded.spec == spec
    assert list(loaded.processes())[1] == ("ps", 0, 12, "p.log")


def test_state_file_names_the_launcher_and_older_files_mean_local(tmp_path):
    handle = ClusterHandle("127.0.0.1:4000", str(tmp_path), launcher="ray")
    write_handle(handle)
    assert json.loads((tmp_path / STATE_FILE).read_text())["launcher"] == "ray"
    assert load_handle(str(tmp_path)).launcher == "ray"
    data = handle.to_dict()
    del data["launcher"]  # a state file written before launchers had names
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    assert load_handle(str(tmp_path)).launcher == "local"
    assert ClusterHandle("h:1", str(tmp_path)).launcher == "local"


def test_load_handle_missing_and_corrupt(tmp_path):
    assert load_handle(str(tmp_path)) is None
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        load_handle(str(tmp_path))


def test_remove_handle_leaves_a_newer_clusters_state_alone(tmp_path):
    old = ClusterHandle("127.0.0.1:1", str(tmp_path), pids={"master": [1], "ps": [], "worker": []})
    new = ClusterHandle("127.0.0.1:2", str(tmp_path), pids={"master": [2], "ps": [], "worker": []})
    write_handle(new)
    remove_handle(old)
    assert load_handle(str(tmp_path)) == new
    remove_handle(new)
    assert load_handle(str(tmp_path)) is None


def test_status_of_a_stale_handle_shows_nothing_alive(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    handle = ClusterHandle("127.0.0.1:1", str(tmp_path), pids={"master": [proc.pid], "ps": [], "worker": []},
                           logs={"master": [""], "ps": [], "worker": []})
    assert not pid_alive(proc.pid)
    assert [s.alive for s in LocalProcessLauncher().status(handle)] == [False]


# ---- ClusterSpec ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, allowed", [
    ("workers", 0, "[1, 256]"), ("workers", 2.5, "[1, 256]"), ("ps", -1, "[1, 256]"), ("ps", True, "[1, 256]"),
    ("port", 70000, "[0, 65535]"), ("port", -1, "[0, 65535]"), ("device", "tpu", "cpu, cuda, auto"),
    ("heartbeat_timeout", 0, "[0.1, 3600]"), ("host", "", "host name"),
])
def test_cluster_spec_rejects_bad_values(field, value, allowed):
    with pytest.raises(ValueError) as err:
        ClusterSpec(**{field: value})
    assert f"{field}={value!r}" in str(err.value) and allowed in str(err.value)


def test_cluster_spec_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("PSTRAIN_HOME", str(tmp_path / "home"))
    spec = ClusterSpec()
    assert (spec.workers, spec.ps, spec.host, spec.port, spec.device) == (2, 2, "127.0.0.1", 50051, "cpu")
    assert spec.state_dir == str(tmp_path / "home")
    assert spec.checkpoint_dir == str(tmp_path / "home" / "checkpoints")
    monkeypatch.delenv("PSTRAIN_HOME")
    assert ClusterSpec().state_dir == os.path.expanduser("~/.pstrain/cluster")
    assert ClusterSpec(state_dir="rel", checkpoint_dir="ck").checkpoint_dir == os.path.abspath("ck")


# ---- the real services ------------------------------------------------------------------------------------
def _gone(pid: int) -> bool:
    return not pid_alive(pid)


@needs_services
def test_local_cluster_starts_registers_and_stops(tmp_path):
    from pstrain.transport.master_client import MasterClient

    spec = ClusterSpec(workers=2, ps=2, port=0, state_dir=str(tmp_path))
    launcher = LocalProcessLauncher(start_timeout=90)
    handle = launcher.start(spec)
    try:
        pids = [p for ps in handle.pids.values() for p in ps]
        assert len(pids) == 5 and all(pid_alive(p) for p in pids)
        assert load_handle(str(tmp_path)) == handle and handle.launcher == "local"
        assert handle.master_address.startswith("127.0.0.1:") and not handle.master_address.endswith(":0")
        client = MasterClient(handle.master_address, connect_timeout=5)
        nodes = client.nodes()
        client.close()
        assert sorted(n["role"] for n in nodes if n["alive"]) == ["ps", "ps", "worker", "worker"]
        assert all(s.alive for s in launcher.status(handle))
        assert all(os.path.isfile(p) for logs in handle.logs.values() for p in logs)
    finally:
        launcher.stop(handle)
    assert all(_gone(p) for p in pids)
    assert not (tmp_path / STATE_FILE).exists()
    assert all(not s.alive for s in launcher.status(handle))


@needs_services
def test_a_second_start_on_a_live_cluster_is_refused(tmp_path):
    spec = ClusterSpec(workers=1, ps=1, port=0, state_dir=str(tmp_path))
    with local_cluster(spec) as handle:
        with pytest.raises(ClusterError, match="already running at " + handle.master_address + ".*run psctl down first"):
            LocalProcessLauncher().start(spec)
        assert load_handle(str(tmp_path)) == handle  # the refusal touched nothing
        assert all(pid_alive(p) for ps in handle.pids.values() for p in ps)
    assert all(_gone(p) for ps in handle.pids.values() for p in ps)


@needs_services
def test_local_cluster_stops_even_when_the_block_fails(tmp_path):
    spec = ClusterSpec(workers=1, ps=1, port=0, state_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        with local_cluster(spec) as handle:
            raise RuntimeError("boom")
    assert all(_gone(p) for ps in handle.pids.values() for p in ps)
    assert not (tmp_path / STATE_FILE).exists()


@needs_services
def test_a_master_that_cannot_bind_is_reported_with_its_log(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = ClusterSpec(workers=1, ps=1, port=port, state_dir=str(tmp_path))
        with pytest.raises(ClusterError) as err:
            LocalProcessLauncher(start_timeout=60).start(spec)
    msg = str(err.value)
    assert "master-0 (pid" in msg and "master-0.log" in msg and "exited with code" in msg
    assert not (tmp_path / STATE_FILE).exists()


@needs_services
def test_psctl_up_detach_submit_export_down(tmp_path):
    """The cluster commands as a user runs them."""
    env = dict(os.environ, PSTRAIN_HOME=str(tmp_path / "cluster"), PYTHONPATH=ROOT)
    env.pop("PSTRAIN_MASTER", None)
    psctl = [sys.executable, "-m", "client.cli"]

    def run(*args, check=True):
        out = subprocess.run(psctl + list(args), capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert "Traceback" not in out.stderr, out.stderr
        if check:
            assert out.returncode == 0, out.stderr
        return out

    run("up", "--workers", "2", "--ps", "2", "--port", "0", "--detach")
    state = json.loads((tmp_path / "cluster" / STATE_FILE).read_text())
    env["PSTRAIN_MASTER"] = state["master_address"]
    try:
        jobfile = tmp_path / "job.py"
        jobfile.write_text(
            "from client import nn\nfrom client.job import Job\n"
            "def job():\n"
            "    m = nn.Sequential([nn.Dense(16, activation='relu', input_dim=64), nn.Dense(10, activation='softmax')], seed=0)\n"
            "    m.compile(nn.optimizers.Adam(0.01), 'sparse_categorical_crossentropy', metrics=['accuracy'])\n"
            "    return Job(m, dataset='digits', batch_size=32, epochs=2)\n"
        )
        refused = run("up", "--port", "0", check=False)
        assert refused.returncode != 0 and "run psctl down first" in refused.stderr
        done = json.loads(run("submit", str(jobfile), "--wait", "--json", "--name", "digits-e2e").stdout.splitlines()[-1])
        assert done["state"] == "SUCCEEDED" and done["name"] == "digits-e2e" and done["error"] is None
        assert done["metrics"]["val_accuracy"] > 0.8
        status = json.loads(run("status", done["id"], "--json").stdout)
        assert {k: status[k] for k in ("id", "state", "step", "epoch")} == {k: done[k] for k in ("id", "state", "step", "epoch")}
        assert [j["id"] for j in json.loads(run("list", "--json").stdout)] == [done["id"]]
        assert "succeeded" in run("logs", done["id"]).stdout
        run("export", done["id"], "-o", str(tmp_path / "model.npz"))
        from client import datasets, nn

        d = datasets.load("digits")
        acc = nn.load_model(tmp_path / "model.npz").evaluate(d.x_test, d.y_test, return_dict=True)["accuracy"]
        assert acc == pytest.approx(done["metrics"]["val_accuracy"], abs=1e-6)
    finally:
        run("down")
    assert not (tmp_path / "cluster" / STATE_FILE).exists()
    deadline = time.monotonic() + 10
    pids = [p for ps in state["pids"].values() for p in ps]
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)  # the services were reparented when `up --detach` exited; init reaps them
    assert all(_gone(p) for p in pids)


def test_stopping_a_cluster_removes_its_killed_workers_shared_memory(tmp_path):
    """A killed worker never removes its /dev/shm segments (bug: they stayed after the job
    and after psctl down); stopping the cluster removes every segment its workers made."""
    from client.launchers.local import remove_shared_memory

    for name in ("pstrain-job-000002-w1-s0-4242", "pstrain-job-000002-w1-s1-4242", "pstrain-job-000002-w0-s0-4243",
                 "pstrain-job-000002-w0-s0-42421", "other-4242"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_shared_memory([4242], directory=str(tmp_path))
    assert sorted(removed) == ["pstrain-job-000002-w1-s0-4242", "pstrain-job-000002-w1-s1-4242"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["other-4242", "pstrain-job-000002-w0-s0-4243",
                                                                 "pstrain-job-000002-w0-s0-42421"])
