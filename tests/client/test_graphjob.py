"""Jobs built from a loss: a loss function of pt tensors (traced) or a low-level graph's
loss tensor, trained in-process and on a real local cluster, exported by variable name."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pstrain as pt
from client import nn
from client.graphjob import GRAPH_FORMAT, GraphModel
from client.job import Job, job_to_spec, run_in_process, save_export
from graph import Graph, GraphError


@pytest.fixture(autouse=True)
def _real_kernels(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)  # cluster processes inherit the environment
    monkeypatch.setenv("PSTRAIN_CACHE", str(tmp_path / "cache"))


def _regression_npz(tmp_path, n=512):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x @ np.arange(1, 6, dtype=np.float32) / 5 + 0.3).astype(np.float32)
    path = tmp_path / "reg.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:100], y_test=y[:100])
    return str(path)


def _binary_npz(tmp_path, n=512):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 1.0], np.float32) > 0).astype(np.float32)
    path = tmp_path / "bin.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:128], y_test=y[:128])
    return str(path)


def _linear_job(path, epochs=5):
    w = pt.Variable(np.zeros((5, 1), np.float32), name="w")
    b = pt.Variable(np.zeros(1, np.float32), name="b")

    def loss(x, y):
        return pt.reduce_mean(pt.square(x @ w + b - y))

    return Job(loss, variables=[w, b], optimizer=nn.optimizers.SGD(0.1), dataset=path, batch_size=32, epochs=epochs)


def test_a_loss_function_job_trains_in_process(tmp_path):
    job = _linear_job(_regression_npz(tmp_path))
    assert isinstance(job.model, GraphModel)
    history, test = run_in_process(job, verbose=0)
    assert test["loss"] < 1e-6 and history.history["loss"][-1] < history.history["loss"][0]
    weights = job.model.get_weights()
    np.testing.assert_allclose(weights["w"].ravel(), np.arange(1, 6) / 5, atol=1e-3)
    np.testing.assert_allclose(weights["b"], [0.3], atol=1e-3)


def test_the_spec_is_the_traced_forward_graph(tmp_path):
    spec = job_to_spec(_linear_job(_regression_npz(tmp_path)), "linear")
    m = spec.model
    g = m.graph
    assert g.nodes[m.features].shape == (None, 5) and g.nodes[m.labels].shape == (None, 1)
    assert g.nodes[m.loss].shape == () and list(m.weight_order) == ["w", "b"]
    assert not any("grad" in node.op for node in g.nodes.values())  # forward only: the master adds the backward pass
    assert m.model_config["format"] == GRAPH_FORMAT and spec.train.optimizer["name"] == "sgd"


def test_a_low_level_graph_job_and_accuracy_with_a_prediction(tmp_path):
    g = Graph()
    x = g.placeholder((None, 4), name="x")
    y = g.placeholder((None, 1), name="y")
    w = g.variable(np.zeros((4, 1), np.float32), name="w")
    b = g.variable(np.zeros((1,), np.float32), name="b")
    p = g.sigmoid(x @ w + b, name="p")
    loss = g.binary_crossentropy(p, y, name="loss")
    job = Job(loss, optimizer=nn.optimizers.SGD(0.5), prediction=p, metrics=["accuracy"],
              dataset=_binary_npz(tmp_path), batch_size=32, epochs=10)
    _, test = run_in_process(job, verbose=0)
    assert test["accuracy"] > 0.95, test


def test_graph_job_errors_name_what_is_wrong(tmp_path):
    path = _regression_npz(tmp_path)
    w = pt.Variable(np.zeros((5, 1), np.float32), name="w")
    unused = pt.Variable(1.0, name="unused")
    with pytest.raises(ValueError, match="name the variables the loss function trains"):
        Job(lambda x, y: pt.reduce_mean(pt.square(x @ w - y)), dataset=path)
    with pytest.raises(ValueError, match="does not read variable\\(s\\) unused"):
        Job(lambda x, y: pt.reduce_mean(pt.square(x @ w - y)), variables=[w, unused], dataset=path)
    with pytest.raises(GraphError, match="the loss must be a float scalar"):
        Job(lambda x, y: pt.square(x @ w - y), variables=[w], dataset=path)

    def assigning(x, y):
        loss = pt.reduce_mean(pt.square(x @ w - y))
        w.assign_sub(0.1 * w)
        return loss

    with pytest.raises(ValueError, match="the loss function assigns variable\\(s\\) w: a job's loss function only"):
        Job(assigning, variables=[w], dataset=path)
    g = Graph()
    a = g.placeholder((None, 5), name="a")
    v = g.variable(np.zeros((5, 1), np.float32), name="v")
    with pytest.raises(ValueError, match="features must name a placeholder; 'x' is not one \\(placeholders: a\\)"):
        Job(g.reduce_sum(a @ v), dataset=path)
    model = nn.Sequential([nn.Dense(1, input_dim=5)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="are for graph jobs"):
        Job(model, dataset=path, optimizer="sgd")


def _eager_regression(path, steps=300, lr=0.1):
    """The same linear regression written eagerly: a tape and assign_sub, full batches."""
    with np.load(path) as z:
        x, y = pt.constant(z["x_train"]), pt.constant(z["y_train"][:, None])
    w = pt.Variable(np.zeros((5, 1), np.float32), name="w")
    b = pt.Variable(np.zeros(1, np.float32), name="b")
    for _ in range(steps):
        with pt.GradientTape() as tape:
            loss = pt.reduce_mean(pt.square(x @ w + b - y))
        dw, db = tape.gradient(loss, [w, b])
        w.assign_sub(lr * dw)
        b.assign_sub(lr * db)
    return {"w": w.numpy(), "b": b.numpy()}


def test_a_loss_function_job_on_a_cluster_matches_in_process_and_eager_and_exports_by_name(tmp_path):
    """1 worker, sync: bit-identical to the in-process run of the same job. 2 workers x
    2 shards, sync: the weights an eager tape-and-assign_sub loop reaches."""
    from client.launchers import ClusterSpec, local_cluster
    from pstrain.transport.master_client import MasterClient
    from tests.integration.helpers import wait_job

    path = _regression_npz(tmp_path)
    local = _linear_job(path, epochs=3)
    run_in_process(local, verbose=0)
    eager = _eager_regression(path)
    with local_cluster(ClusterSpec(workers=2, ps=2, port=0, state_dir=str(tmp_path / "c"))) as handle:
        client = MasterClient(handle.master_address, connect_timeout=10)
        try:
            one = client.submit(job_to_spec(dataclasses.replace(_linear_job(path, epochs=3), num_workers=1), "one"))
            two = client.submit(job_to_spec(dataclasses.replace(_linear_job(path, epochs=10), num_workers=2), "two"))
            for job in (one, two):
                final = wait_job(client, job["id"], timeout=180)
                assert final["state"] == "SUCCEEDED", final
            config, names, weights = client.export(one["id"])
            _, names2, weights2 = client.export(two["id"])
        finally:
            client.close()
    assert config["format"] == GRAPH_FORMAT and names == names2 == ["w", "b"]
    want = local.model.get_weights()
    for name, got in zip(names, weights):
        np.testing.assert_array_equal(got, want[name], err_msg=name)  # bit-identical
    for name, got in zip(names2, weights2):
        np.testing.assert_allclose(got, eager[name], atol=1e-4, err_msg=name)
    save_export(tmp_path / "model.npz", config, names, weights)
    with np.load(tmp_path / "model.npz") as z:
        assert sorted(z.files) == ["b", "w"]
        np.testing.assert_array_equal(z["w"], weights[0])
