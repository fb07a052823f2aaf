"""The parameter store: pushes apply gradients and assignments as one update, and a
push that fails any check (unknown variable, shape, dtype, NaN/Inf) changes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from pstrain.kernels import get_backend
from pstrain.runtime.optimizers import SGD, Adam, Optimizer
from pstrain.runtime.store import ParameterStore, PushRejected

BACKENDS = ["reference", "cpu"]


def initial():
    return {
        "w": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32),
        "b": np.array([0.1, -0.1], np.float32),
        "bn/moving_mean": np.zeros(2, np.float32),
    }


def make_store(backend="reference", config=None, trainable=("w", "b")):
    opt = Optimizer(config or SGD(learning_rate=0.5), get_backend(backend))
    return ParameterStore(initial(), trainable=set(trainable) if trainable is not None else None, optimizer=opt)


def snapshot(store):
    return {k: np.array(v, copy=True) for k, v in store.pull().items()}


def assert_params_equal(store, want):
    got = store.pull()
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ---- applying ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_push_applies_gradients_and_bumps_the_version(backend):
    store = make_store(backend)
    assert store.version == 0
    gw = np.array([[1.0, 1.0], [-2.0, 0.0]], np.float32)
    gb = np.array([0.2, 0.4], np.float32)
    assert store.push({"w": gw, "b": gb}) == 1
    assert store.version == 1
    want = initial()
    np.testing.assert_allclose(store.pull()["w"], want["w"] - 0.5 * gw, rtol=1e-7)
    np.testing.assert_allclose(store.pull()["b"], want["b"] - 0.5 * gb, rtol=1e-7)
    np.testing.assert_array_equal(store.pull()["bn/moving_mean"], want["bn/moving_mean"])
    assert store.push({"b": gb}) == 2
    np.testing.assert_allclose(store.pull()["b"], want["b"] - 1.0 * gb, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_pushes_sum_in_closed_form(backend):
    # ps-lite style: N pushes of a known gradient with plain SGD give p0 - lr * N * g.
    store = make_store(backend, SGD(learning_rate=0.25))
    g = np.array([1.0, -2.0], np.float32)
    for _ in range(8):
        store.push({"b": g})
    np.testing.assert_allclose(store.pull()["b"], initial()["b"] - 0.25 * 8 * g, rtol=1e-6)
    assert store.version == 8


def test_initial_values_are_copied():
    init = initial()
    store = ParameterStore(init, trainable=None, optimizer=Optimizer(SGD(0.1), get_backend("reference")))
    store.push({"b": np.ones(2, np.float32)})
    np.testing.assert_array_equal(init["b"], initial()["b"])
    assert store.trainable == set(init)  # None: every variable is trainable


@pytest.mark.parametrize("backend", BACKENDS)
def test_assignments_set_non_trainable_variables(backend):
    store = make_store(backend)
    new_mean = np.array([0.3, -0.7], np.float32)
    gb = np.array([1.0, 1.0], np.float32)
    assert store.push({"b": gb}, assign={"bn/moving_mean": new_mean}) == 1
    np.testing.assert_array_equal(store.pull()["bn/moving_mean"], new_mean)
    np.testing.assert_allclose(store.pull()["b"], initial()["b"] - 0.5 * gb, rtol=1e-7)
    new_mean[:] = 99  # the store keeps its own copy
    np.testing.assert_array_equal(store.pull()["bn/moving_mean"], np.array([0.3, -0.7], np.float32))
    assert store.push({}, assign={"bn/moving_mean": np.zeros(2, np.float32)}) == 2
    np.testing.assert_array_equal(store.pull()["bn/moving_mean"], [0.0, 0.0])


def test_gradient_to_a_non_trainable_variable_is_rejected():
    store = make_store()
    before = snapshot(store)
    with pytest.raises(PushRejected, match="not trainable") as info:
        store.push({"b": np.ones(2, np.float32), "bn/moving_mean": np.ones(2, np.float32)})
    assert info.value.reason == "unknown_variable"
    assert info.value.variable == "bn/moving_mean"
    assert_params_equal(store, before)
    assert store.version == 0


# ---- rejected pushes change nothing --------------------------------------------------------------
def bad_value(kind):
    if kind == "unknown_variable":
        return "nope", np.ones(2, np.float32)
    if kind == "shape":
        return "b", np.ones(3, np.float32)
    if kind == "shape-rank":
        return "b", np.ones((2, 1), np.float32)
    if kind == "dtype":
        return "b", np.ones(2, np.float64)
    if kind == "nan":
        return "b", np.array([0.0, np.nan], np.float32)
    if kind == "inf":
        return "b", np.array([np.inf, 0.0], np.float32)
    if kind == "-inf":
        return "b", np.array([1.0, -np.inf], np.float32)
    raise AssertionError(kind)


REASONS = {
    "unknown_variable": "unknown_variable",
    "shape": "shape",
    "shape-rank": "shape",
    "dtype": "dtype",
    "nan": "non_finite",
    "inf": "non_finite",
    "-inf": "non_finite",
}


@pytest.mark.parametrize("config", [SGD(0.5, momentum=0.9), Adam(0.1)], ids=["sgd", "adam"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(REASONS))
def test_bad_gradient_after_a_good_one_changes_nothing(kind, backend, config):
    store = make_store(backend, config)
    store.push({"w": np.ones((2, 2), np.float32)})  # optimizer state exists for "w"
    before = snapshot(store)
    state_before = {k: {s: np.array(v, copy=True) for s, v in st.items()} for k, st in store.optimizer.state.items()}
    name, bad = bad_value(kind)
    grads = {"w": np.full((2, 2), 0.25, np.float32), name: bad}  # the good one comes first
    assert list(grads)[0] == "w"
    with pytest.raises(PushRejected) as info:
        store.push(grads)
    assert info.value.reason == REASONS[kind]
    assert info.value.variable == name
    assert f"'{name}'" in str(info.value)
    assert_params_equal(store, before)
    assert store.version == 1
    # The optimizer did not step either (no Adam t, momentum or moments advanced).
    assert set(store.optimizer.state) == set(state_before)
    for k, st in store.optimizer.state.items():
        for s, v in st.items():
            np.testing.assert_array_equal(v, state_before[k][s], err_msg=f"{k}/{s}")


@pytest.mark.parametrize("kind", ["unknown_variable", "shape", "dtype", "nan", "inf"])
def test_bad_assignment_rejects_the_whole_push(kind):
    store = make_store()
    before = snapshot(store)
    name, bad = bad_value(kind)
    if name == "b":
        name = "bn/moving_mean"
    with pytest.raises(PushRejected) as info:
        store.push({"w": np.ones((2, 2), np.float32)}, assign={name: bad})
    assert info.value.reason == REASONS[kind]
    assert info.value.variable == name
    assert_params_equal(store, before)
    assert store.version == 0


def test_messages_say_what_to_fix():
    store = make_store()
    with pytest.raises(PushRejected, match=r"shape \(3,\) does not match the variable's \(2,\)"):
        store.push({"b": np.ones(3, np.float32)})
    with pytest.raises(PushRejected, match="dtype float64 does not match the variable's float32"):
        store.push({"b": np.ones(2, np.float64)})
    with pytest.raises(PushRejected, match=r"no such variable; known: \['b', 'bn/moving_mean', 'w'\]"):
        store.push({"nope": np.ones(2, np.float32)})
    with pytest.raises(PushRejected, match="NaN or Inf"):
        store.push({"b": np.array([np.nan, 1.0], np.float32)})


def test_a_good_push_after_a_rejected_one_applies_normally():
    store = make_store("cpu", Adam(0.1))
    reference = make_store("cpu", Adam(0.1))
    g = np.array([0.5, -1.0], np.float32)
    with pytest.raises(PushRejected):
        store.push({"b": g, "w": np.full((2, 2), np.nan, np.float32)})
    store.push({"b": g})
    reference.push({"b": g})
    np.testing.assert_array_equal(store.pull()["b"], reference.pull()["b"])
    assert store.optimizer.state["b"]["t"] == 1
