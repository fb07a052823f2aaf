"""Optimizers, Keras-style: a hand-computed step and a golden trajectory per optimizer.

The golden trajectory is PyTorch's (``torch.optim.SGD`` / ``torch.optim.Adam`` with
``eps=1e-7``) on the same fixed gradient sequence, for the reference and cpu
backends in float64 (tight) and float32.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from pstrain.kernels import get_backend
from pstrain.runtime.optimizers import SGD, Adam, Optimizer, optimizer_from_config

BACKENDS = ["reference", "cpu"]
DTYPES = [np.float64, np.float32]
TOL = {np.dtype(np.float64): dict(rtol=1e-12, atol=1e-14), np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6)}

# The hand-computed examples share one parameter vector and gradient.
P0 = [1.0, -2.0, 0.5]
G = [0.5, -1.0, 2.0]


def make(config, backend):
    return Optimizer(config, get_backend(backend))


# ---- hand-computed steps --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_single_step_by_hand(backend, dtype):
    opt = make(SGD(learning_rate=0.1), backend)
    p = np.array(P0, dtype)
    opt.apply("w", p, np.array(G, dtype))
    # p - 0.1 * g
    np.testing.assert_allclose(p, [0.95, -1.9, 0.3], **TOL[np.dtype(dtype)])
    assert p.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_momentum_two_steps_by_hand(backend, dtype):
    opt = make(SGD(learning_rate=0.1, momentum=0.9), backend)
    p, g = np.array(P0, dtype), np.array(G, dtype)
    opt.apply("w", p, g)
    # v = g = [0.5, -1, 2]; p - 0.1 * v
    np.testing.assert_allclose(p, [0.95, -1.9, 0.3], **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(opt.state["w"]["velocity"], [0.5, -1.0, 2.0], **TOL[np.dtype(dtype)])
    opt.apply("w", p, g)
    # v = 0.9 * v + g = [0.95, -1.9, 3.8]; p - 0.1 * v
    np.testing.assert_allclose(opt.state["w"]["velocity"], [0.95, -1.9, 3.8], **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(p, [0.855, -1.71, -0.08], **TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_single_step_by_hand(backend, dtype):
    opt = make(Adam(learning_rate=0.01), backend)  # beta_1 0.9, beta_2 0.999, epsilon 1e-7
    p = np.array(P0, dtype)
    opt.apply("w", p, np.array(G, dtype))
    st = opt.state["w"]
    assert st["t"] == 1
    # m = 0.1 * g; v = 0.001 * g^2
    np.testing.assert_allclose(st["m"], [0.05, -0.1, 0.2], **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(st["v"], [0.00025, 0.001, 0.004], **TOL[np.dtype(dtype)])
    # m_hat = g, sqrt(v_hat) = |g|: p - 0.01 * g / (|g| + 1e-7)
    #   1.0  - 0.01 * 0.5 / 0.5000001 = 0.9900000019999996
    #   -2.0 + 0.01 * 1.0 / 1.0000001 = -1.9900000009999999
    #   0.5  - 0.01 * 2.0 / 2.0000001 = 0.4900000005
    np.testing.assert_allclose(p, [0.9900000019999996, -1.9900000009999999, 0.4900000005], **TOL[np.dtype(dtype)])


# ---- golden trajectories vs PyTorch ---------------------------------------------------------------
STEPS = 5


def gradient_sequence(shape, dtype):
    rng = np.random.default_rng(42)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(STEPS)]


def torch_trajectory(make_opt, p0, grads):
    p = torch.tensor(p0.copy(), requires_grad=True)
    opt = make_opt([p])
    out = []
    for g in grads:
        opt.zero_grad()
        p.grad = torch.tensor(g.copy())
        opt.step()
        out.append(p.detach().numpy().copy())
    return out


CASES = {
    "sgd": (SGD(learning_rate=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd-momentum": (SGD(learning_rate=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "adam": (Adam(learning_rate=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-7)),
    "adam-betas": (
        Adam(learning_rate=0.05, beta_1=0.8, beta_2=0.99, epsilon=1e-6),
        lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.99), eps=1e-6),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_matches_torch(case, backend, dtype):
    config, torch_opt = CASES[case]
    p0 = np.random.default_rng(0).standard_normal((4, 3)).astype(dtype)
    grads = gradient_sequence(p0.shape, dtype)
    want = torch_trajectory(torch_opt, p0, grads)
    opt = make(config, backend)
    p = p0.copy()
    for step, (g, w) in enumerate(zip(grads, want), 1):
        opt.apply("w", p, g)
        assert p.dtype == dtype
        np.testing.assert_allclose(p, w, err_msg=f"step {step}", **TOL[np.dtype(dtype)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["sgd-momentum", "adam"])
def test_each_variable_keeps_its_own_state(case, backend):
    config, _ = CASES[case]
    shared = make(config, backend)
    alone = {"a": make(config, backend), "b": make(config, backend)}
    rng = np.random.default_rng(1)
    p = {"a": rng.standard_normal(3), "b": rng.standard_normal((2, 2))}
    q = {k: v.copy() for k, v in p.items()}
    for _ in range(4):
        for name in ("a", "b"):
            g = rng.standard_normal(p[name].shape)
            shared.apply(name, p[name], g)
            alone[name].apply(name, q[name], g)
    for name in p:
        np.testing.assert_array_equal(p[name], q[name])


# ---- config validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,field,value",
    [
        (SGD, "learning_rate", -0.1),
        (SGD, "learning_rate", 0.0),
        (SGD, "learning_rate", float("inf")),
        (SGD, "learning_rate", float("nan")),
        (SGD, "momentum", 1.0),
        (SGD, "momentum", 1.5),
        (SGD, "momentum", -0.1),
        (Adam, "learning_rate", -1e-3),
        (Adam, "beta_1", 1.0),
        (Adam, "beta_1", -0.1),
        (Adam, "beta_2", 1.0),
        (Adam, "beta_2", 2.0),
        (Adam, "epsilon", 0.0),
        (Adam, "epsilon", -1e-8),
    ],
)
def test_config_rejects_out_of_range_values(cls, field, value):
    with pytest.raises(ValueError, match=re.escape(f"{cls.__name__}.{field}={value!r}")) as info:
        cls(**{field: value})
    assert "allowed" in str(info.value)


def test_config_accepts_boundary_values():
    assert SGD(learning_rate=1e-12, momentum=0.0).momentum == 0.0
    assert SGD(momentum=0.999).momentum == 0.999
    Adam(beta_1=0.0, beta_2=0.0, epsilon=1e-12)


def test_configs_are_frozen():
    with pytest.raises(Exception):
        SGD().learning_rate = 1.0


@pytest.mark.parametrize(
    "config,want",
    [
        ("sgd", SGD()),
        ("SGD", SGD()),
        ("adam", Adam()),
        ("Adam", Adam()),
        ({"name": "sgd", "learning_rate": 0.5, "momentum": 0.9}, SGD(0.5, 0.9)),
        ({"name": "adam", "learning_rate": 0.02, "epsilon": 1e-8}, Adam(learning_rate=0.02, epsilon=1e-8)),
    ],
    ids=str,
)
def test_optimizer_from_config(config, want):
    before = dict(config) if isinstance(config, dict) else None
    got = optimizer_from_config(config)
    assert got == want and type(got) is type(want)
    if before is not None:
        assert config == before  # the caller's dict is not consumed


@pytest.mark.parametrize("config", [SGD(0.3, 0.5), Adam(0.004, 0.85, 0.995, 1e-6)], ids=str)
def test_optimizer_from_config_round_trips(config):
    assert optimizer_from_config(config) is config
    assert optimizer_from_config(config.get_config()) == config


@pytest.mark.parametrize("config", ["rmsprop", {"name": "adagrad"}, {"learning_rate": 0.1}], ids=str)
def test_optimizer_from_config_rejects_unknown_names(config):
    with pytest.raises(ValueError, match="unknown optimizer.*adam.*sgd"):
        optimizer_from_config(config)


def test_optimizer_from_config_validates_values():
    with pytest.raises(ValueError, match=re.escape("SGD.momentum=1.0")):
        optimizer_from_config({"name": "sgd", "momentum": 1.0})


def test_optimizer_from_config_names_an_unknown_field():
    with pytest.raises((TypeError, ValueError), match="lr"):
        optimizer_from_config({"name": "sgd", "lr": 0.1})


# ---- each optimizer class on its own: init_state and update ------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config, want",
    [
        (SGD(0.1), {"velocity": (0,)}),  # no momentum: the kernel never reads the velocity
        (SGD(0.1, momentum=0.9), {"velocity": (2, 3)}),
        (Adam(0.01), {"m": (2, 3), "v": (2, 3)}),
    ],
    ids=str,
)
def test_init_state_is_zeros_of_the_state_keys(config, want, backend, dtype):
    param = np.ones((2, 3), dtype)
    state = config.init_state(param, get_backend(backend))
    assert tuple(state) == type(config).state_keys == tuple(want)
    for key, shape in want.items():
        assert state[key].shape == shape and state[key].dtype == dtype
        np.testing.assert_array_equal(state[key], 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_update_by_hand(backend, dtype):
    be = get_backend(backend)
    config = SGD(learning_rate=0.5, momentum=0.9)
    p, g = np.array(P0, dtype), np.array(G, dtype)
    state = config.init_state(p, be)
    state["velocity"][:] = [1.0, 1.0, 1.0]
    config.update(p, g, state, 0.1, 7, be.optimizer_kernels())  # lr is the argument, not the config's
    # v = 0.9 * 1 + g = [1.4, -0.1, 2.9]; p - 0.1 * v
    np.testing.assert_allclose(state["velocity"], [1.4, -0.1, 2.9], **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(p, [0.86, -1.99, 0.21], **TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_update_uses_step_for_bias_correction(backend, dtype):
    be = get_backend(backend)
    config = Adam(learning_rate=0.5)
    p, g = np.array(P0, dtype), np.array(G, dtype)
    state = config.init_state(p, be)
    config.update(p, g, state, 0.01, 1, be.optimizer_kernels())
    # step 1 is the hand-computed single step above (lr 0.01, not the config's 0.5)
    np.testing.assert_allclose(p, [0.9900000019999996, -1.9900000009999999, 0.4900000005], **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(state["m"], [0.05, -0.1, 0.2], **TOL[np.dtype(dtype)])


@pytest.mark.parametrize("config", [SGD(0.3, 0.5), Adam(0.004, 0.85, 0.995, 1e-6)], ids=str)
def test_get_config_is_name_then_fields(config):
    got = config.get_config()
    assert list(got)[0] == "name" and got["name"] == type(config).name
    assert list(got)[1:] == [f.name for f in dataclasses.fields(config)]


def test_optimizer_refuses_an_unknown_config():
    with pytest.raises(ValueError, match=r"unknown optimizer 'rmsprop'; use one of \['adam', 'sgd'\]"):
        make("rmsprop", "reference")
