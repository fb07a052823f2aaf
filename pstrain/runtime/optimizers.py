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

import math
from dataclasses import asdict, dataclass
from typing import Any, Union


def _check_range(cls: str, field: str, value: float, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        hi_s = f"{hi})" if hi_open else f"{hi}]"
        raise ValueError(f"{cls}.{field}={value!r} is out of range; allowed {lo_s}, {hi_s}")


@dataclass(frozen=True)
class CosineDecay:
    """Keras's cosine decay: ``lr(t) = lr0 * ((1 - alpha) * 0.5 * (1 + cos(pi * min(t, T) / T)) + alpha)``
    for update t = 0, 1, ... and T = ``decay_steps``."""

    initial_learning_rate: float
    decay_steps: int
    alpha: float = 0.0

    def __post_init__(self):
        _check_range("CosineDecay", "initial_learning_rate", float(self.initial_learning_rate), 0.0, math.inf, True, True)
        _check_range("CosineDecay", "decay_steps", float(self.decay_steps), 1.0, math.inf, hi_open=True)
        _check_range("CosineDecay", "alpha", float(self.alpha), 0.0, 1.0)

    def __call__(self, step: int) -> float:
        frac = min(step, self.decay_steps) / self.decay_steps
        return self.initial_learning_rate * ((1 - self.alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + self.alpha)

    def get_config(self) -> dict:
        return {"name": "cosine_decay", **asdict(self)}


@dataclass(frozen=True)
class ExponentialDecay:
    """Keras's exponential decay: ``lr(t) = lr0 * decay_rate ** (t / decay_steps)``
    (``t // decay_steps`` when ``staircase``)."""

    initial_learning_rate: float
    decay_steps: int
    decay_rate: float
    staircase: bool = False

    def __post_init__(self):
        _check_range("ExponentialDecay", "initial_learning_rate", float(self.initial_learning_rate), 0.0, math.inf, True, True)
        _check_range("ExponentialDecay", "decay_steps", float(self.decay_steps), 1.0, math.inf, hi_open=True)
        _check_range("ExponentialDecay", "decay_rate", float(self.decay_rate), 0.0, 1.0, lo_open=True)

    def __call__(self, step: int) -> float:
        p = step / self.decay_steps
        return self.initial_learning_rate * self.decay_rate ** (math.floor(p) if self.staircase else p)

    def get_config(self) -> dict:
        return {"name": "exponential_decay", **asdict(self)}


Schedule = Union[CosineDecay, ExponentialDecay]
_SCHEDULES = {"cosine_decay": CosineDecay, "exponential_decay": ExponentialDecay}


def _check_lr(cls: str, lr) -> None:
    if isinstance(lr, (CosineDecay, ExponentialDecay)):
        return
    if isinstance(lr, dict):
        raise ValueError(f"{cls}.learning_rate: pass a schedule object, not a dict")
    _check_range(cls, "learning_rate", float(lr), 0.0, math.inf, lo_open=True, hi_open=True)


def _lr_config(lr):
    return lr.get_config() if hasattr(lr, "get_config") else lr


def _lr_from_config(lr):
    if isinstance(lr, dict):
        lr = dict(lr)
        name = lr.pop("name", None)
        if name not in _SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule '{name}'; use one of {sorted(_SCHEDULES)}")
        return _SCHEDULES[name](**lr)
    return lr


def learning_rate_at(lr, step: int) -> float:
    """The learning rate for update ``step`` (0-based): a constant or a schedule's value."""
    return lr(step) if callable(lr) else lr


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with optional (heavy-ball) momentum."""

    learning_rate: float | Schedule = 0.01
    momentum: float = 0.0

    def __post_init__(self):
        _check_lr("SGD", self.learning_rate)
        _check_range("SGD", "momentum", float(self.momentum), 0.0, 1.0, hi_open=True)

    def get_config(self) -> dict:
        return {"name": "sgd", "learning_rate": _lr_config(self.learning_rate), "momentum": self.momentum}


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba)."""

    learning_rate: float | Schedule = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def __post_init__(self):
        _check_lr("Adam", self.learning_rate)
        _check_range("Adam", "beta_1", float(self.beta_1), 0.0, 1.0, hi_open=True)
        _check_range("Adam", "beta_2", float(self.beta_2), 0.0, 1.0, hi_open=True)
        _check_range("Adam", "epsilon", float(self.epsilon), 0.0, float("inf"), lo_open=True, hi_open=True)

    def get_config(self) -> dict:
        return {"name": "adam", **asdict(self), "learning_rate": _lr_config(self.learning_rate)}


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
    if "learning_rate" in config:
        config["learning_rate"] = _lr_from_config(config["learning_rate"])
    try:
        return _BY_NAME[name](**config)
    except TypeError as exc:  # an unknown field
        raise ValueError(f"bad {name} optimizer config {config}: {exc}") from exc


class Optimizer:
    """Applies an optimizer config to named parameters, in place, keeping per-variable state."""

    def __init__(self, config: SGD | Adam, backend):
        self.config = config
        self.backend = backend
        self.kernels = backend.optimizer_kernels()
        self.state: dict[str, dict[str, Any]] = {}

    def _zeros(self, like):
        return self.backend.zeros(like.shape, like.dtype)

    def apply(self, name: str, param, grad, step: int | None = None) -> None:
        """Update ``param`` in place. ``step`` (0-based global step) drives learning-rate
        schedules; by default it is the number of updates this variable has had."""
        c = self.config
        st = self.state.get(name)
        if isinstance(c, SGD):
            if st is None:
                velocity = self._zeros(param) if c.momentum else self.backend.empty((0,), param.dtype)
                st = self.state[name] = {"velocity": velocity, "t": 0}
            lr = learning_rate_at(c.learning_rate, st["t"] if step is None else step)
            st["t"] += 1
            self.kernels["sgd"](param, grad, st["velocity"], lr, c.momentum)
        else:
            if st is None:
                st = self.state[name] = {"m": self._zeros(param), "v": self._zeros(param), "t": 0}
            lr = learning_rate_at(c.learning_rate, st["t"] if step is None else step)
            st["t"] += 1
            self.kernels["adam"](param, grad, st["m"], st["v"], lr, c.beta_1, c.beta_2, c.epsilon, st["t"])

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The per-variable state as host copies, for checkpoints: SGD ``{"velocity", "t"}``,
        Adam ``{"m", "v", "t"}`` per variable (``t`` an int, the rest NumPy arrays).

        Usage::

            saved = opt.state_dict()
            fresh = Optimizer(opt.config, backend)
            fresh.load_state_dict(saved)   # continues exactly where ``opt`` left off
        """
        return {
            name: {k: int(v) if k == "t" else self.backend.to_host(v).copy() for k, v in st.items()}
            for name, st in self.state.items()
        }

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Replace all state with ``state`` (as returned by ``state_dict``); variables
        missing from it start fresh. Raises ValueError when the state is not this
        optimizer's kind (e.g. Adam moments given to SGD)."""
        want = {"velocity", "t"} if isinstance(self.config, SGD) else {"m", "v", "t"}
        kind = type(self.config).__name__
        for name, st in state.items():
            if set(st) != want:
                raise ValueError(
                    f"optimizer state for variable '{name}' has keys {sorted(st)}; {kind} needs {sorted(want)}"
                )
            if int(st["t"]) < 0:
                raise ValueError(f"optimizer state for variable '{name}' has t={st['t']}; t must be >= 0")
        self.state = {
            name: {k: int(v) if k == "t" else self.backend.asarray(v.copy()) for k, v in st.items()}
            for name, st in state.items()
        }
