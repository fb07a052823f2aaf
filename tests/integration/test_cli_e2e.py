"""psctl end to end, as a user runs it: up, submit, status, list, export, logs, plan,
train, down, against real local clusters on port 0 with state in temporary dirs.

One detached cluster (``psctl up --detach``, 2 workers, 2 ps shards) serves the
module's jobs one after another; the last test takes it down with ``psctl down``
(the fixture's finalizer does it anyway if a test failed before).
"""
from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest

from client import datasets, nn
from client.launchers import STATE_FILE, load_handle, pid_alive
from tests.integration.helpers import (
    ADDRESS_RE,
    CONTRACT_FIELDS,
    MNIST_EXAMPLE,
    all_gone,
    last_json,
    psctl,
    service_env,
    stop_leftover,
    write_job,
)

# examples/mnist_mlp.py's params: 784*256 + 256 + 256*128 + 128 + 128*10 + 10 float32s.
MNIST_MLP_BYTES = 4 * (784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """``psctl up --workers 2 --ps 2 --port 0 --detach``; always taken down afterwards."""
    state = tmp_path_factory.mktemp("psctl-home")
    env = service_env(state)
    try:
        out = psctl(["up", "--workers", 2, "--ps", 2, "--port", 0, "--detach"], env, timeout=180)
        found = ADDRESS_RE.search(out.stdout)
        assert found, out.stdout
        handle = load_handle(str(state))
        assert handle is not None
        yield SimpleNamespace(address=found.group(1), env=env, state=state, handle=handle,
                              pids=[p for ps in handle.pids.values() for p in ps])
    finally:
        if load_handle(str(state)) is not None:
            psctl(["down"], env, check=False)
            stop_leftover(state)


def _submit(up, jobfile, *flags, timeout=300) -> dict:
    out = psctl(["--master", up.address, "submit", jobfile, *flags, "--wait", "--json"], up.env, timeout=timeout)
    return last_json(out.stdout)


def test_up_detach_prints_a_master_on_a_free_port(up):
    host, port = up.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) not in (0, 50051)
    assert up.handle.master_address == up.address
    assert len(up.pids) == 5 and all(pid_alive(p) for p in up.pids)


@pytest.mark.slow
def test_sync_mnist_submit_status_list_export_logs(up, tmp_path):
    done = _submit(up, MNIST_EXAMPLE, "--mode", "sync", "--epochs", "3")
    assert done["state"] == "SUCCEEDED" and done["error"] is None, done
    assert done["metrics"]["val_accuracy"] >= 0.975, done["metrics"]
    assert done["epoch"] == 3 and done["step"] == 3 * 469  # ceil(60000 / 128) global steps per epoch

    status = last_json(psctl(["--master", up.address, "status", done["id"], "--json"], up.env).stdout)
    assert set(CONTRACT_FIELDS) <= set(status), status
    assert {k: status[k] for k in CONTRACT_FIELDS} == {k: done[k] for k in CONTRACT_FIELDS}
    assert isinstance(status["loss"], float) and isinstance(status["metrics"], dict)
    assert {"accuracy", "val_accuracy", "val_loss"} <= set(status["metrics"])

    listed = last_json(psctl(["--master", up.address, "list", "--json"], up.env).stdout)
    mine = [j for j in listed if j["id"] == done["id"]]
    assert len(mine) == 1 and mine[0]["state"] == "SUCCEEDED" and set(CONTRACT_FIELDS) <= set(mine[0])

    model_path = tmp_path / "model.npz"
    psctl(["--master", up.address, "export", done["id"], "-o", model_path], up.env)
    mnist = datasets.load("mnist")
    result = nn.load_model(model_path).evaluate(mnist.x_test, mnist.y_test, return_dict=True)
    assert result["accuracy"] == pytest.approx(done["metrics"]["val_accuracy"], abs=1e-6)
    assert result["loss"] == pytest.approx(done["metrics"]["val_loss"], rel=1e-4)

    logs = psctl(["--master", up.address, "logs", done["id"]], up.env).stdout.splitlines()
    assert logs[0] == "submitted"
    assert any(line.startswith("running on 2 workers and 2 shards") for line in logs)
    # Sync: every shard applied one update per step.
    assert "succeeded; final weights saved for export (shard versions [1407, 1407])" in logs
    assert any(re.search(r"worker [01] epoch 3 step 1407 .*val_accuracy", line) for line in logs), logs[-5:]


ASYNC_MODES = [pytest.param(["--mode", "async"], id="async"),
               pytest.param(["--mode", "ssp", "--staleness", "2"], id="ssp-2")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_async_modes_train_the_mnist_example(up, mode):
    done = _submit(up, MNIST_EXAMPLE, *mode, "--epochs", "3")
    assert done["state"] == "SUCCEEDED", done
    assert done["metrics"]["val_accuracy"] >= 0.97, done["metrics"]


def _shard_bytes(text: str) -> dict[int, int]:
    return {int(m.group(1)): int(m.group(2).replace(",", ""))
            for m in re.finditer(r"^\s+(\d+)\s+([\d,]+)\s+[\d.]+%", text, re.MULTILINE)}


@pytest.mark.parametrize("where", ["master", "local"])
def test_plan_prints_per_shard_bytes(up, where):
    if where == "master":
        master = up.address
    else:  # nobody listens there: psctl plans in-process and says so
        from pstrain.transport.ports import unused_port

        master = f"127.0.0.1:{unused_port()}"
    out = psctl(["--master", master, "plan", MNIST_EXAMPLE, "--ps", 2], up.env, timeout=120)
    assert ("planning locally" in out.stderr) == (where == "local"), out.stderr
    assert "== parameter-server shards (sync; optimizer sgd) ==" in out.stdout
    per_shard = _shard_bytes(out.stdout)
    assert sorted(per_shard) == [0, 1], out.stdout
    assert sum(per_shard.values()) == MNIST_MLP_BYTES
    assert re.search(rf"^total\s+{MNIST_MLP_BYTES:,}\s+100\.0%", out.stdout, re.MULTILINE), out.stdout
    assert max(per_shard.values()) <= 0.51 * MNIST_MLP_BYTES  # size-balanced: no hot shard
    plan = last_json(psctl(["--master", master, "plan", MNIST_EXAMPLE, "--ps", 2, "--json"], up.env).stdout)
    assert plan["shard_bytes"] == [per_shard[0], per_shard[1]]


def test_train_runs_a_job_file_on_an_embedded_cluster(tmp_path):
    jobfile = write_job(tmp_path, "digits.py", optimizer="nn.optimizers.Adam(0.01)")
    model_path = tmp_path / "model.npz"
    # TMPDIR: psctl train keeps its cluster's state in a temporary directory.
    env = service_env(tmp_path / "home", TMPDIR=str(tmp_path))
    out = psctl(["train", jobfile, "--workers", 2, "--ps", 1, "--json", "-o", model_path], env, timeout=300)
    result = last_json(out.stdout)
    assert result["state"] == "SUCCEEDED" and result["error"] is None, result
    assert set(CONTRACT_FIELDS) <= set(result)
    assert result["metrics"]["val_accuracy"] > 0.9 and result["metrics"]["test_accuracy"] > 0.9
    assert result["model"] == str(model_path)
    d = datasets.load("digits")
    acc = nn.load_model(model_path).evaluate(d.x_test, d.y_test, return_dict=True)["accuracy"]
    assert acc == pytest.approx(result["metrics"]["test_accuracy"], abs=1e-6)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("pstrain-train-")]  # cleaned up


def test_down_stops_every_process(up):
    out = psctl(["down"], up.env)
    assert f"stopped the cluster at {up.address}" in out.stdout
    assert not (up.state / STATE_FILE).exists()
    # `up --detach` exited long ago, so init reaps the services; give it a moment.
    assert all_gone(up.pids, timeout=15), [p for p in up.pids if pid_alive(p)]
    gone = psctl(["--master", up.address, "--connect-timeout", "1", "list"], up.env, check=False)
    assert gone.returncode == 3 and "cannot reach the pstrain master" in gone.stderr
    again = psctl(["down"], up.env)
    assert "no cluster is running" in again.stderr
