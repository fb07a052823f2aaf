"""Optimizers: validated configs and the update rules that apply them.

The same ``Optimizer`` applies updates in the in-process trainer and (with the
distributed runtime) in every parameter-server shard, so both paths produce the
same numbers. Rules follow PyTorch: SGD ``v = momentum * v + g; p -= lr * v``;
Adam with bias correction and ``p -= lr * m_hat / (sqrt(v_hat) + epsilon)``
(epsilon defaults to Keras's 1e-7).

Usage::

    opt = Optimizer(SGD(learning_rate=0.1, momentum=0.9), backend)
    opt.apply("dense/kernel", param, grad)   # in place
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


def _check_range(cls: str, field: str, value: float, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        hi_s = f"{hi})" if hi_open else f"{hi}]"
        raise ValueError(f"{cls}.{field}={value!r} is out of range; allowed {lo_s}, {hi_s}")


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with optional (heavy-ball) momentum."""

    learning_rate: float = 0.01
    momentum: float = 0.0

    def __post_init__(self):
        _check_range("SGD", "learning_rate", float(self.learning_rate), 0.0, float("inf"), lo_open=True, hi_open=True)
        _check_range("SGD", "momentum", float(self.momentum), 0.0, 1.0, hi_open=True)

    def get_config(self) -> dict:
        return {"name": "sgd", **asdict(self)}


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba)."""

    learning_rate: float = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def __post_init__(self):
        _check_range("Adam", "learning_rate", float(self.learning_rate), 0.0, float("inf"), lo_open=True, hi_open=True)
        _check_range("Adam", "beta_1", float(self.beta_1), 0.0, 1.0, hi_open=True)
        _check_range("Adam", "beta_2", float(self.beta_2), 0.0, 1.0, hi_open=True)
        _check_range("Adam", "epsilon", float(self.epsilon), 0.0, float("inf"), lo_open=True, hi_open=True)

    def get_config(self) -> dict:
        return {"name": "adam", **asdict(self)}


_BY_NAME = {"sgd": SGD, "adam": Adam}


def optimizer_from_config(config: dict | str | Any) -> SGD | Adam:
    """An optimizer config from a name ("sgd", "adam"), a dict or a config object."""
    if isinstance(config, (SGD, Adam)):
        return config
    if isinstance(config, str):
        config = {"name": config}
    config = dict(config)
    name = str(config.pop("name", "")).lower()
    if name not in _BY_NAME:
        raise ValueError(f"unknown optimizer '{name}'; use one of {sorted(_BY_NAME)}")
    return _BY_NAME[name](**config)


class Optimizer:
    """Applies an optimizer config to named parameters, in place, keeping per-variable state."""

    def __init__(self, config: SGD | Adam, backend):
        self.config = config
        self.backend = backend
        self.kernels = backend.optimizer_kernels()
        self.state: dict[str, dict[str, Any]] = {}

    def _zeros(self, like):
        z = self.backend.empty(like.shape, like.dtype)
        z[...] = 0
        return z

    def apply(self, name: str, param, grad) -> None:
        c = self.config
        st = self.state.get(name)
        if isinstance(c, SGD):
            if st is None:
                st = self.state[name] = {"velocity": self._zeros(param) if c.momentum else self.backend.empty((0,), param.dtype)}
            self.kernels["sgd"](param, grad, st["velocity"], c.learning_rate, c.momentum)
        else:
            if st is None:
                st = self.state[name] = {"m": self._zeros(param), "v": self._zeros(param), "t": 0}
            st["t"] += 1
            self.kernels["adam"](param, grad, st["m"], st["v"], c.learning_rate, c.beta_1, c.beta_2, c.epsilon, st["t"])
