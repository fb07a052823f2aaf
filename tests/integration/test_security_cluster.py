"""A cluster's credentials as a user meets them, with psctl as a subprocess: psctl up
makes the cluster's tokens and keeps them in its 0600 state file (where psctl finds
them); a wrong token is refused; psctl token create adds a user whose jobs are theirs;
the state directory, database and logs are the owner's only; and a whole job trains
over mutual TLS on a local cluster (psctl certs init, psctl train --tls-dir)."""
from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request

import pytest

from tests.integration.helpers import MNIST_EXAMPLE, last_json, psctl, service_env, stop_leftover, write_job

SECRETS = ("PSTRAIN_TOKEN", "PSTRAIN_TOKEN_FILE", "PSTRAIN_NODE_TOKEN", "PSTRAIN_NODE_TOKEN_FILE", "PSTRAIN_ADMIN_TOKEN",
           "PSTRAIN_ADMIN_TOKEN_FILE", "PSTRAIN_TLS_DIR")


def _user_env(state_dir, **extra):
    """A user's shell: no tokens in the environment, the cluster's state in ``state_dir``."""
    env = service_env(state_dir)
    for name in SECRETS:
        env.pop(name, None)
    env.update(extra)
    return env


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def cluster(tmp_path):
    state = tmp_path / "cluster"
    env = _user_env(state)
    out = psctl(["up", "--workers", "1", "--ps", "1", "--port", "0", "--detach", "--state-dir", state], env, timeout=180)
    master = next(line.split("=", 1)[1].split()[0] for line in out.stdout.splitlines() if "PSTRAIN_MASTER=" in line)
    env["PSTRAIN_MASTER"] = master
    yield state, env
    psctl(["down", "--state-dir", state], env, check=False)
    stop_leftover(state)


def test_psctl_up_keeps_the_tokens_private_and_psctl_finds_them(cluster, tmp_path):
    state, env = cluster
    handle = json.loads((state / "cluster.json").read_text())
    token, node_token = handle["secrets"]["token"], handle["secrets"]["node_token"]
    assert len(token) >= 40 and len(node_token) >= 40 and token != node_token
    assert _mode(state / "cluster.json") == 0o600 and _mode(state) == 0o700 and _mode(state / "logs") == 0o700
    for name in ("master.db", "master.db-wal"):
        assert _mode(state / name) == 0o600, name
    for log in (state / "logs").iterdir():
        assert _mode(log) == 0o600, log
        assert token not in log.read_text() and node_token not in log.read_text()
    # /metrics asks every caller for the cluster's metrics token, kept 0600 for a Prometheus.
    metrics_token = (state / "metrics.token").read_text().strip()
    assert _mode(state / "metrics.token") == 0o600 and metrics_token == handle["secrets"]["metrics_token"]
    url = f"http://{handle['metrics_address']}/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {metrics_token}"}),
                                timeout=10) as answer:
        assert b"pstrain_" in answer.read()
    assert last_json(psctl(["list", "--json"], env).stdout) == []  # the admin token, from the state file
    refused = psctl(["list", "--json"], dict(env, PSTRAIN_TOKEN="wrong"), check=False)
    assert refused.returncode != 0 and "UNAUTHENTICATED: ListJobs needs a user token" in refused.stderr
    # A new user: their own token, their own jobs.
    created = psctl(["token", "create", "alice", "--state-dir", state], env)
    alice = created.stdout.strip()
    assert "user 'alice'" in created.stderr and _mode(state / "tokens.json") == 0o600
    job = write_job(tmp_path, epochs=1)
    submitted = last_json(psctl(["submit", job, "--json"], dict(env, PSTRAIN_TOKEN=alice)).stdout)
    status = last_json(psctl(["status", submitted["id"], "--json"], env).stdout)
    assert status["owner"] == "alice"
    bob = psctl(["token", "create", "bob", "--state-dir", state], env).stdout.strip()
    denied = psctl(["cancel", submitted["id"]], dict(env, PSTRAIN_TOKEN=bob), check=False)
    assert denied.returncode != 0 and "PERMISSION_DENIED" in denied.stderr and "only its submitter (alice)" in denied.stderr


def test_mnist_trains_over_mutual_tls_on_a_2x2_local_cluster(tmp_path):
    """The acceptance run: psctl certs init, then psctl train of the MNIST example with
    --tls-dir on 2 workers x 2 shards: every connection mutual TLS, >= 97.5% test accuracy."""
    tls = tmp_path / "tls"
    env = _user_env(tmp_path / "home")
    psctl(["certs", "init", tls], env)
    assert sorted(os.listdir(tls)) == sorted([f"{r}.{e}" for r in ("ca", "master", "ps", "worker", "user")
                                              for e in ("crt", "key")] + ["admin.token", "node.token", "tokens.json"])
    assert all(_mode(tls / name) == 0o600 for name in os.listdir(tls) if name.endswith((".key", ".token")))
    out = psctl(["train", MNIST_EXAMPLE, "--workers", "2", "--ps", "2", "--tls-dir", tls, "--json"], env, timeout=600)
    result = last_json(out.stdout)
    assert result["state"] == "SUCCEEDED" and result["metrics"]["test_accuracy"] >= 0.975, result
