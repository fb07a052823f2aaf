"""``model.fit(cluster=...)`` on a real local cluster gives what in-process fit gives."""

import numpy as np
import pytest

from client import datasets, nn
from client.launchers import ClusterSpec, local_cluster


@pytest.fixture(autouse=True)
def _real_kernels(monkeypatch, tmp_path):
    # The cluster's processes inherit the environment: no CUDA simulator there.
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setenv("PSTRAIN_CACHE", str(tmp_path / "cache"))


def _model():
    m = nn.Sequential([nn.Dense(16, activation="relu", input_dim=32), nn.Dense(4, activation="softmax")], seed=3)
    m.compile(nn.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


def test_fit_on_a_cluster_matches_in_process(tmp_path):
    d = datasets.synthetic(n_train=512, n_test=128)
    local, remote = _model(), _model()
    local.fit(d.x_train, d.y_train, batch_size=64, epochs=2, verbose=0)
    spec = ClusterSpec(workers=1, ps=2, port=0, state_dir=str(tmp_path / "cluster"))
    with local_cluster(spec) as handle:
        history = remote.fit(d.x_train, d.y_train, batch_size=64, epochs=2, verbose=0,
                             validation_data=(d.x_test, d.y_test), cluster=handle.master_address)
    assert history.epoch == [0, 1]
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    for a, b in zip(local.get_weights(), remote.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert remote.evaluate(d.x_test, d.y_test, return_dict=True)["accuracy"] == pytest.approx(
        history.history["val_accuracy"][-1]
    )
