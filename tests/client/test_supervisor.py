"""client.launchers.supervisor: the restart policy (pure), the supervisor against a
scripted launcher, and a detached cluster whose master is SIGKILLed mid-job."""
from __future__ import annotations

import os
import signal
import time

import pytest

from client.launchers.base import ClusterError, ClusterHandle, Launcher, ProcessStatus
from client.launchers.supervisor import RestartPolicy, Supervisor


# ---- the policy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("history, now, want", [
    ([], 100.0, 0.0),  # first death: at once
    ([99.0], 100.0, 0.5),  # then backoff, doubling
    ([98.0, 99.0], 100.0, 1.0),
    ([96.0, 97.0, 98.0, 99.0], 100.0, 4.0),
    ([95.0, 96.0, 97.0, 98.0, 99.0], 100.0, None),  # five within the window: give up
    ([1.0, 2.0, 3.0, 4.0, 5.0], 400.0, 0.0),  # ... unless they are older than the window
])
def test_restart_delays(history, now, want):
    assert RestartPolicy(max_restarts=5, window=300, backoff=0.5, max_backoff=10).delay(history, now) == want


def test_backoff_is_capped():
    assert RestartPolicy(max_restarts=20, backoff=1, max_backoff=3).delay([1.0] * 10, 2.0) == 3


@pytest.mark.parametrize("field, value", [("max_restarts", -1), ("window", -1.0), ("backoff", float("nan"))])
def test_bad_policy(field, value):
    with pytest.raises(ValueError, match=field):
        RestartPolicy(**{field: value})


# ---- the supervisor, against a scripted launcher ----------------------------------------------------
class ScriptedLauncher(Launcher):
    """Processes whose liveness the test sets; restarts give new pids and are recorded."""

    name = "scripted"

    def __init__(self, fail_restarts: bool = False):
        self.alive: dict[tuple[str, int], bool] = {("master", 0): True, ("worker", 0): True}
        self.pids = {("master", 0): 100, ("worker", 0): 200}
        self.restarted: list[tuple[str, int]] = []
        self.fail_restarts = fail_restarts

    def start(self, spec):  # pragma: no cover - not used
        raise NotImplementedError

    def stop(self, handle, timeout=10.0):  # pragma: no cover - not used
        pass

    def status(self, handle):
        return [ProcessStatus(r, i, self.pids[(r, i)], self.alive[(r, i)], "") for (r, i) in self.alive]

    def restart(self, handle, role, index):
        if self.fail_restarts:
            raise ClusterError("port taken")
        self.restarted.append((role, index))
        self.pids[(role, index)] += 1
        self.alive[(role, index)] = True
        return self.pids[(role, index)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(launcher, **policy):
    clock = Clock()
    sup = Supervisor(launcher, ClusterHandle("127.0.0.1:1", "/tmp/none"),
                     RestartPolicy(**{"max_restarts": 2, "window": 60, "backoff": 1.0, **policy}), clock=clock)
    return sup, clock


def test_a_dead_worker_is_restarted_with_backoff_then_given_up():
    launcher = ScriptedLauncher()
    sup, clock = make(launcher)
    assert sup.poll() == []
    launcher.alive[("worker", 0)] = False
    lines = sup.poll()  # the first restart is immediate
    assert launcher.restarted == [("worker", 0)] and "restarted worker-0 (pid 200 -> 201)" in lines[-1]
    launcher.alive[("worker", 0)] = False
    clock.now = 1.0
    assert "restarting it in 1.0s" in sup.poll()[0] and launcher.restarted == [("worker", 0)]
    clock.now = 2.5
    sup.poll()
    assert launcher.restarted == [("worker", 0)] * 2
    launcher.alive[("worker", 0)] = False
    clock.now = 3.0
    lines = sup.poll()  # a third death within the window: given up, and said so once
    assert "not restarting it: 2 restarts within 60s" in lines[0]
    assert sup.poll() == [] and launcher.restarted == [("worker", 0)] * 2


def test_a_master_that_cannot_be_restarted_stops_supervision():
    launcher = ScriptedLauncher(fail_restarts=True)
    sup, _ = make(launcher)
    launcher.alive[("master", 0)] = False
    with pytest.raises(ClusterError, match="could not restart master-0: port taken"):
        sup.poll()


def test_a_master_dying_too_often_stops_supervision():
    launcher = ScriptedLauncher()
    sup, clock = make(launcher, max_restarts=1)
    launcher.alive[("master", 0)] = False
    sup.poll()
    launcher.alive[("master", 0)] = False
    clock.now = 1.0
    with pytest.raises(ClusterError, match="the master is down for good"):
        sup.poll()


# ---- a real detached cluster -----------------------------------------------------------------------
@pytest.mark.slow
def test_a_detached_cluster_restarts_a_killed_master_and_the_job_finishes(tmp_path):
    from tests.integration.helpers import all_gone, last_json, psctl, service_env, write_job

    env = service_env(tmp_path / "home")
    state = tmp_path / "cluster"
    psctl(["up", "--workers", 2, "--ps", 1, "--port", 0, "--detach", "--state-dir", state,
           "--heartbeat-timeout", "2"], env, timeout=180)
    from client.launchers import load_handle

    handle = load_handle(str(state))
    pids = [p for ps in handle.pids.values() for p in ps]
    try:
        assert handle.supervisor_pid and os.path.exists(state / "logs" / "supervisor.log")
        job = last_json(psctl(["--master", handle.master_address, "submit", write_job(tmp_path, epochs=60),
                               "--json"], env).stdout)
        from pstrain.transport.master_client import MasterClient

        client = MasterClient(handle.master_address, connect_timeout=10)
        try:
            deadline = time.monotonic() + 60
            while client.get(job["id"])["step"] < 20:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            os.kill(handle.pids["master"][0], signal.SIGKILL)
            final = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    final = client.get(job["id"])
                except Exception:  # noqa: BLE001 - the master is restarting
                    time.sleep(0.2)
                    continue
                if final["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    break
                time.sleep(0.2)
            assert final is not None and final["state"] == "SUCCEEDED", final
            assert any("resumed after the master restart" in e for e in final["events"])
        finally:
            client.close()
        restarted = load_handle(str(state))
        assert restarted.restarts["master"] == [1] and restarted.pids["master"][0] != handle.pids["master"][0]
        pids += restarted.pids["master"] + [restarted.supervisor_pid]
    finally:
        psctl(["down", "--state-dir", state], env, timeout=120)
    assert all_gone(pids, timeout=15)


def test_local_restart_refuses_a_process_it_has_no_record_of(tmp_path):
    from client.launchers.local import LocalProcessLauncher

    handle = ClusterHandle("127.0.0.1:1", str(tmp_path))  # e.g. a state file from an older psctl
    with pytest.raises(ClusterError, match="no record of how ps-0 was started"):
        LocalProcessLauncher().restart(handle, "ps", 0)
