"""Any numeric targets train on the cluster as they do in-process: regression (float
rows of any shape), multi-output, and binary 0/1 with a sigmoid + binary cross-entropy
head (bugs: an .npz with float targets was refused as "non-integer class ids", a
(n,) binary target did not fit the (None, 1) labels, and fit(cluster=...) raised
NotImplementedError for every loss but sparse categorical cross-entropy)."""
from __future__ import annotations

import numpy as np
import pytest

from client import nn
from client.launchers import ClusterSpec, local_cluster


@pytest.fixture(autouse=True)
def _real_kernels(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)  # the services run real CPU kernels
    monkeypatch.setenv("PSTRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    import os

    saved = os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    try:
        with local_cluster(ClusterSpec(workers=1, ps=2, port=0, state_dir=str(tmp_path_factory.mktemp("c")))) as h:
            yield h.master_address
    finally:
        if saved is not None:
            os.environ["NUMBA_ENABLE_CUDASIM"] = saved


def _data(kind: str, n: int = 384):
    rng = np.random.default_rng(len(kind))
    x = rng.normal(size=(n, 6)).astype(np.float32)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    if kind == "regression":
        return x, (x @ w[:, 0] + 0.1).astype(np.float32)  # (n,) floats
    if kind == "multi":
        return x, (x @ w).astype(np.float32)  # (n, 3)
    return x, (x @ w[:, 0] > 0).astype(np.float32)  # binary 0/1, (n,)


def _model(kind: str):
    out, act, loss = {"regression": (1, None, "mse"), "multi": (3, None, "mse"),
                      "binary": (1, "sigmoid", "binary_crossentropy")}[kind]
    m = nn.Sequential([nn.Dense(8, activation="tanh", input_dim=6), nn.Dense(out, activation=act)], seed=5)
    m.compile(nn.optimizers.SGD(0.05, momentum=0.9), loss, metrics=["accuracy"] if kind == "binary" else [])
    return m


@pytest.mark.parametrize("kind", ["regression", "multi", "binary"])
def test_fit_on_a_cluster_takes_any_targets_and_matches_in_process(kind, master):
    x, y = _data(kind)
    local, remote = _model(kind), _model(kind)
    local.fit(x, y, batch_size=64, epochs=3, verbose=0)
    history = remote.fit(x, y, batch_size=64, epochs=3, verbose=0, validation_data=(x[:64], y[:64]), cluster=master)
    assert history.epoch == [0, 1, 2] and history.history["loss"][-1] < history.history["loss"][0]
    for a, b in zip(local.get_weights(), remote.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if kind == "binary":
        assert remote.evaluate(x, y, return_dict=True)["accuracy"] > 0.9


def test_an_npz_job_with_float_targets_trains_on_the_cluster(master, tmp_path):
    """The same through a Job on an .npz (what `psctl submit` sends)."""
    from client.job import Job, job_to_spec
    from pstrain.transport.master_client import MasterClient
    from tests.integration.helpers import wait_job

    x, y = _data("regression")
    path = tmp_path / "reg.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:64], y_test=y[:64])
    client = MasterClient(master, connect_timeout=10)
    try:
        job = client.submit(job_to_spec(Job(_model("regression"), dataset=str(path), batch_size=64, epochs=3), "reg"))
        final = wait_job(client, job["id"], timeout=120)
    finally:
        client.close()
    assert final["state"] == "SUCCEEDED", final
    assert final["metrics"]["val_loss"] < float(np.var(y[:64])), final


JOB_FILE = """
from client import nn
from client.job import Job


def job():
    m = nn.Sequential([nn.Dense(8, activation="tanh", input_dim=6), nn.Dense({out}, activation={act!r})], seed=5)
    m.compile(nn.optimizers.SGD(0.05, momentum=0.9), {loss!r}, metrics={metrics!r})
    return Job(m, dataset={path!r}, batch_size=64, epochs=8)
"""


@pytest.mark.parametrize("kind", ["regression", "binary"])
def test_psctl_train_takes_float_targets(kind, tmp_path):
    """A regression (mse, float targets) and a binary classifier (sigmoid + binary
    cross-entropy, 0/1 float labels) through ``psctl train`` on a 2 x 2 local cluster."""
    from tests.integration.helpers import last_json, psctl, service_env

    x, y = _data(kind)
    path = tmp_path / f"{kind}.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:128], y_test=y[:128])
    out, act, loss = {"regression": (1, None, "mse"), "binary": (1, "sigmoid", "binary_crossentropy")}[kind]
    jobfile = tmp_path / "job.py"
    jobfile.write_text(JOB_FILE.format(out=out, act=act, loss=loss, path=str(path),
                                       metrics=["accuracy"] if kind == "binary" else []))
    result = last_json(psctl(["train", jobfile, "--workers", "2", "--ps", "2", "--json"], service_env(tmp_path / "h"),
                             timeout=300).stdout)
    assert result["state"] == "SUCCEEDED", result
    if kind == "binary":
        assert result["metrics"]["test_accuracy"] > 0.9, result
    else:
        assert result["metrics"]["test_loss"] < 0.2 * float(np.var(y[:128])), result
