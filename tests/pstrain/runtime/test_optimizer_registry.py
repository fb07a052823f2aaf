"""The optimizer registry: unknown optimizers are refused by name, and a new optimizer
is one registered class that works end to end (config round trip, Optimizer.apply,
state_dict / load_state_dict)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from pstrain.kernels import get_backend
from pstrain.runtime import optimizers
from pstrain.runtime.optimizers import (
    SGD,
    Adam,
    Optimizer,
    UpdateRule,
    known_optimizers,
    optimizer_from_config,
    register_optimizer,
)

BACKENDS = ["reference", "cpu"]


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so classes registered by a test do not leak."""
    monkeypatch.setattr(optimizers, "_REGISTRY", dict(optimizers._REGISTRY))


@pytest.fixture
def signum(registry):
    """Sign-SGD with momentum (Bernstein et al.), built from the backends' SGD kernel:
    ``v = momentum * v + sign(g); p -= lr * v``."""

    @register_optimizer
    @dataclass(frozen=True)
    class Signum(UpdateRule):
        name: ClassVar[str] = "signum"
        state_keys: ClassVar[tuple[str, ...]] = ("velocity",)
        learning_rate: float = 0.01
        momentum: float = 0.0

        def init_state(self, param, backend):
            return {"velocity": backend.zeros(param.shape, param.dtype)}

        def update(self, param, grad, state, lr, step, kernels):
            kernels["sgd"](param, np.sign(grad), state["velocity"], lr, self.momentum)

    return Signum


# ---- unknown optimizers ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rmsprop", "adagrad", "sgd2", ""])
def test_an_unknown_name_is_named_with_the_known_ones(name):
    for config in (name, {"name": name, "learning_rate": 0.1}):
        with pytest.raises(ValueError, match=re.escape(f"unknown optimizer '{name}'; use one of ['adam', 'sgd']")):
            optimizer_from_config(config)
        with pytest.raises(ValueError, match=re.escape(f"unknown optimizer '{name}'")):
            Optimizer(config, get_backend("reference"))


@pytest.mark.parametrize("config", [object(), 0.1, ["sgd"], None], ids=repr)
def test_an_object_that_is_no_optimizer_is_refused(config):
    # Once, anything that was not SGD silently ran Adam's update.
    with pytest.raises(ValueError, match=r"unknown optimizer .*use one of \['adam', 'sgd'\]"):
        Optimizer(config, get_backend("reference"))


def test_an_unregistered_optimizer_class_is_refused(registry):
    @dataclass(frozen=True)
    class Lion(UpdateRule):
        name: ClassVar[str] = "lion"
        state_keys: ClassVar[tuple[str, ...]] = ()
        learning_rate: float = 1e-4

        def init_state(self, param, backend):
            return {}

        def update(self, param, grad, state, lr, step, kernels):
            raise AssertionError("must not run")

    with pytest.raises(ValueError, match=r"unknown optimizer Lion \(name 'lion'\).*register_optimizer"):
        Optimizer(Lion(), get_backend("reference"))


def test_the_built_in_optimizers_are_registered():
    assert known_optimizers() == ["adam", "sgd"]
    assert optimizer_from_config("sgd") == SGD() and optimizer_from_config("adam") == Adam()


# ---- a new optimizer end to end ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_registered_optimizer_works_end_to_end(signum, backend):
    assert known_optimizers() == ["adam", "sgd", "signum"]
    config = optimizer_from_config({"name": "signum", "learning_rate": 0.5, "momentum": 0.5})
    assert config == signum(0.5, 0.5) and config.get_config() == {"name": "signum", "learning_rate": 0.5, "momentum": 0.5}

    opt = Optimizer(config.get_config(), get_backend(backend))
    p = np.array([1.0, -2.0, 0.5])
    opt.apply("w", p, np.array([0.3, -7.0, 0.0]))
    # v = sign(g) = [1, -1, 0]; p -= 0.5 * v
    np.testing.assert_array_equal(p, [0.5, -1.5, 0.5])
    opt.apply("w", p, np.array([-2.0, -1.0, 4.0]))
    # v = 0.5 * v + sign(g) = [-0.5, -1.5, 1]; p -= 0.5 * v
    np.testing.assert_array_equal(p, [0.75, -0.75, 0.0])

    saved = opt.state_dict()
    assert saved["w"]["t"] == 2 and sorted(saved["w"]) == ["t", "velocity"]
    np.testing.assert_array_equal(saved["w"]["velocity"], [-0.5, -1.5, 1.0])
    fresh = Optimizer(config, get_backend(backend))
    fresh.load_state_dict(saved)
    q = p.copy()
    g = np.array([1.0, 1.0, 1.0])
    opt.apply("w", p, g)
    fresh.apply("w", q, g)
    np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError, match=r"Signum needs \['t', 'velocity'\]"):
        fresh.load_state_dict({"w": {"m": g, "v": g, "t": 1}})  # Adam state


# ---- registering -------------------------------------------------------------------------------------
def test_a_taken_name_is_refused(registry):
    @dataclass(frozen=True)
    class MySGD(SGD):
        pass  # inherits name "sgd"

    with pytest.raises(ValueError, match=r"the name 'sgd' is already registered to SGD; choose another name"):
        register_optimizer(MySGD)
    assert register_optimizer(SGD) is SGD  # registering the same class again is harmless


def test_registration_checks_the_class(registry):
    class NotADataclass(UpdateRule):
        name: ClassVar[str] = "nodc"
        state_keys: ClassVar[tuple[str, ...]] = ()

        def init_state(self, param, backend):
            return {}

        def update(self, param, grad, state, lr, step, kernels):
            pass

    with pytest.raises(ValueError, match=r"@dataclass\(frozen=True\)"):
        register_optimizer(NotADataclass)

    @dataclass(frozen=True)
    class NoLearningRate(NotADataclass):
        name: ClassVar[str] = "nolr"

    with pytest.raises(ValueError, match="needs a learning_rate field"):
        register_optimizer(NoLearningRate)

    @dataclass(frozen=True)
    class Shouting(NotADataclass):
        name: ClassVar[str] = "LOUD"
        learning_rate: float = 0.1

    with pytest.raises(ValueError, match="name='LOUD' must be a non-empty lower-case string"):
        register_optimizer(Shouting)

    @dataclass(frozen=True)
    class KeepsT(Shouting):
        name: ClassVar[str] = "keeps_t"
        state_keys: ClassVar[tuple[str, ...]] = ("t",)

    with pytest.raises(ValueError, match="without 't'"):
        register_optimizer(KeepsT)

    with pytest.raises(ValueError, match="must subclass UpdateRule"):
        register_optimizer(dict)  # type: ignore[arg-type]
    assert known_optimizers() == ["adam", "sgd"]
