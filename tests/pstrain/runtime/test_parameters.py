"""LocalParameterClient: the ParameterClient interface over an in-process store, as
``model.fit`` uses it. A push is applied at once and the store's own arrays come
back; weights behave as on an async shard (scale; 0 applies nothing)."""
from __future__ import annotations

import numpy as np
import pytest

from pstrain.kernels import get_backend
from pstrain.runtime.optimizers import SGD, Optimizer
from pstrain.runtime.parameters import LocalParameterClient, ParameterClient
from pstrain.runtime.store import ParameterStore, PushRejected


def make_client(lr: float = 0.5) -> LocalParameterClient:
    initial = {"w": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32), "mean": np.zeros(2, np.float32)}
    store = ParameterStore(initial, {"w"}, Optimizer(SGD(learning_rate=lr), get_backend("reference")))
    return LocalParameterClient(store)


def test_is_a_parameter_client_and_pull_returns_the_stores_own_arrays():
    client = make_client()
    assert isinstance(client, ParameterClient)
    assert client.pull() is client.store.pull()
    assert client.version == 0


def test_push_pull_applies_and_returns_the_new_parameters():
    client = make_client()
    g = np.ones((2, 2), np.float32)
    params = client.push_pull(0, {"w": g}, {"mean": np.array([0.25, 0.5], np.float32)})
    np.testing.assert_array_equal(params["w"], np.array([[0.5, -2.5], [0.0, 2.5]], np.float32))
    np.testing.assert_array_equal(params["mean"], np.array([0.25, 0.5], np.float32))
    assert client.version == 1


def test_pushing_known_gradients_n_times_gives_the_closed_form_sum():
    client = make_client(lr=1.0)
    grads = [np.full((2, 2), k, np.float32) for k in range(1, 6)]
    for step, g in enumerate(grads):
        params = client.push_pull(step, {"w": g}, {}, min_version=step + 1)
    want = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32) - sum(grads)
    np.testing.assert_array_equal(params["w"], want)
    assert client.version == len(grads)


def test_a_weight_scales_the_gradient_and_weight_0_applies_nothing():
    client = make_client(lr=1.0)
    client.push_pull(0, {"w": np.full((2, 2), 2.0, np.float32)}, {}, weight=0.25)
    np.testing.assert_array_equal(client.pull()["w"], np.array([[0.5, -2.5], [0.0, 2.5]], np.float32))
    before = client.pull()["w"].copy()
    client.push_pull(1, {"w": np.full((2, 2), 9.0, np.float32)}, {}, weight=0.0)
    np.testing.assert_array_equal(client.pull()["w"], before)
    assert client.version == 1


def test_a_rejected_push_changes_nothing():
    client = make_client()
    with pytest.raises(PushRejected, match="'w'"):
        client.push_pull(0, {"w": np.full((2, 2), np.nan, np.float32)}, {})
    np.testing.assert_array_equal(client.pull()["w"], np.array([[1.0, -2.0], [0.5, 3.0]], np.float32))


def test_close_and_context_manager():
    with make_client() as client:
        client.pull()
    client.close()  # idempotent, nothing to release
