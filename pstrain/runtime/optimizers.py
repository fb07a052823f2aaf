"""Optimizers: one class per optimizer (its validated settings and its update rule),
a registry by name, and the ``Optimizer`` that applies one to named parameters.

The same ``Optimizer`` applies updates in the in-process trainer and (with the
distributed runtime) in every parameter-server shard, so both paths produce the
same numbers. Rules follow PyTorch: SGD ``v = momentum * v + g; p -= lr * v``;
Adam with bias correction and ``p -= lr * m_hat / (sqrt(v_hat) + epsilon)``
(epsilon defaults to Keras's 1e-7).

Adding an optimizer is one ``UpdateRule`` subclass, decorated with
``@register_optimizer``, plus its kernels in every backend's ``optimizer_kernels()``
(``pstrain.kernels``); it is then known by name to configs, job files and shards.

Usage::

    opt = Optimizer(SGD(learning_rate=0.1, momentum=0.9), backend)
    opt.apply("dense/kernel", param, grad)   # in place
    optimizer_from_config({"name": "adam", "learning_rate": 0.01})   # Adam(learning_rate=0.01)
"""
from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Union


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


class UpdateRule(ABC):
    """One optimizer: its settings and how it updates a parameter.

    Subclasses are frozen dataclasses with a ``learning_rate`` field (a float or a
    schedule), validated in ``__post_init__``; they name themselves (``name``, as in
    configs) and the state arrays they keep per variable (``state_keys``). Register
    one with ``@register_optimizer``.

    Usage::

        @register_optimizer
        @dataclass(frozen=True)
        class SignSGD(UpdateRule):
            name: ClassVar[str] = "sign_sgd"
            state_keys: ClassVar[tuple[str, ...]] = ()
            learning_rate: float = 0.01

            def init_state(self, param, backend):
                return {}

            def update(self, param, grad, state, lr, step, kernels):
                kernels["sign_sgd"](param, grad, lr)
    """

    name: ClassVar[str]
    state_keys: ClassVar[tuple[str, ...]]
    learning_rate: float | Schedule

    @abstractmethod
    def init_state(self, param, backend) -> dict[str, Any]:
        """Fresh state for ``param``: ``{key: array}`` for every key in ``state_keys``,
        allocated on ``backend`` (a ``pstrain.kernels`` backend)."""

    @abstractmethod
    def update(self, param, grad, state: Mapping[str, Any], lr: float, step: int,
               kernels: Mapping[str, Callable[..., None]]) -> None:
        """Update ``param`` and the arrays in ``state`` in place with ``grad``, at learning
        rate ``lr``; ``step`` counts this variable's updates including this one (1, 2, ...).
        ``kernels`` is the backend's ``optimizer_kernels()``."""

    def get_config(self) -> dict:
        """The settings as plain JSON-able values, ``name`` first (``optimizer_from_config``
        turns it back into an equal object)."""
        config: dict[str, Any] = {"name": self.name}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            config[field.name] = _lr_config(value) if field.name == "learning_rate" else value
        return config


_REGISTRY: dict[str, type[UpdateRule]] = {}


def register_optimizer(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Class decorator: make ``cls`` known by ``cls.name`` to ``optimizer_from_config``
    and ``Optimizer`` (see ``UpdateRule`` for an example).

    Raises ValueError when ``cls`` is not a frozen ``UpdateRule`` dataclass with a
    ``learning_rate`` field, or when its name is taken by another class.
    """
    where = f"register_optimizer({cls.__name__})"
    if not (isinstance(cls, type) and issubclass(cls, UpdateRule)):
        raise ValueError(f"{where}: the class must subclass UpdateRule")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise ValueError(f"{where}: decorate the class with @dataclass(frozen=True) first (below @register_optimizer)")
    if "learning_rate" not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"{where}: the class needs a learning_rate field (a float or a schedule)")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"{where}: name={name!r} must be a non-empty lower-case string (configs use it)")
    if not isinstance(getattr(cls, "state_keys", None), tuple) or "t" in cls.state_keys:
        raise ValueError(f"{where}: state_keys must be a tuple of state array names, without 't' (kept by Optimizer)")
    taken = _REGISTRY.get(name)
    if taken is not None and taken is not cls:
        raise ValueError(f"{where}: the name '{name}' is already registered to {taken.__name__}; choose another name")
    _REGISTRY[name] = cls
    return cls


def known_optimizers() -> list[str]:
    """The registered optimizer names, sorted (``["adam", "sgd"]`` built in)."""
    return sorted(_REGISTRY)


@register_optimizer
@dataclass(frozen=True)
class SGD(UpdateRule):
    """Stochastic gradient descent with optional (heavy-ball) momentum."""

    name: ClassVar[str] = "sgd"
    state_keys: ClassVar[tuple[str, ...]] = ("velocity",)
    learning_rate: float | Schedule = 0.01
    momentum: float = 0.0

    def __post_init__(self):
        _check_lr("SGD", self.learning_rate)
        _check_range("SGD", "momentum", float(self.momentum), 0.0, 1.0, hi_open=True)

    def init_state(self, param, backend) -> dict[str, Any]:
        # Without momentum the kernel ignores the velocity: keep an empty one, not a copy of param.
        velocity = backend.zeros(param.shape, param.dtype) if self.momentum else backend.empty((0,), param.dtype)
        return {"velocity": velocity}

    def update(self, param, grad, state, lr, step, kernels) -> None:
        kernels["sgd"](param, grad, state["velocity"], lr, self.momentum)


@register_optimizer
@dataclass(frozen=True)
class Adam(UpdateRule):
    """Adam (Kingma & Ba)."""

    name: ClassVar[str] = "adam"
    state_keys: ClassVar[tuple[str, ...]] = ("m", "v")
    learning_rate: float | Schedule = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def __post_init__(self):
        _check_lr("Adam", self.learning_rate)
        _check_range("Adam", "beta_1", float(self.beta_1), 0.0, 1.0, hi_open=True)
        _check_range("Adam", "beta_2", float(self.beta_2), 0.0, 1.0, hi_open=True)
        _check_range("Adam", "epsilon", float(self.epsilon), 0.0, float("inf"), lo_open=True, hi_open=True)

    def init_state(self, param, backend) -> dict[str, Any]:
        return {"m": backend.zeros(param.shape, param.dtype), "v": backend.zeros(param.shape, param.dtype)}

    def update(self, param, grad, state, lr, step, kernels) -> None:
        kernels["adam"](param, grad, state["m"], state["v"], lr, self.beta_1, self.beta_2, self.epsilon, step)


def optimizer_from_config(config: UpdateRule | Mapping[str, Any] | str) -> UpdateRule:
    """An optimizer from a name ("sgd", "adam", any registered one), a config dict
    (``get_config()``'s form) or an optimizer object (returned as is).

    Raises ValueError naming an unknown optimizer and listing the known ones, or
    naming a field that is unknown or out of range.

    Usage::

        optimizer_from_config("sgd")                                   # SGD()
        optimizer_from_config({"name": "adam", "learning_rate": 0.02})  # Adam(learning_rate=0.02)
    """
    if isinstance(config, UpdateRule):
        if _REGISTRY.get(config.name) is not type(config):
            raise ValueError(
                f"unknown optimizer {type(config).__name__} (name '{config.name}'); use one of {known_optimizers()}, "
                "or register the class with @register_optimizer"
            )
        return config
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping):
        raise ValueError(
            f"unknown optimizer {config!r}; use one of {known_optimizers()}, "
            "by name, as a config dict or as an optimizer object such as SGD(0.1)"
        )
    config = dict(config)
    name = str(config.pop("name", "")).lower()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer '{name}'; use one of {known_optimizers()}")
    if "learning_rate" in config:
        config["learning_rate"] = _lr_from_config(config["learning_rate"])
    try:
        return cls(**config)
    except TypeError as exc:  # an unknown field
        fields = [f.name for f in dataclasses.fields(cls)]
        raise ValueError(f"bad {name} optimizer config {config}: {exc}; {cls.__name__} takes {fields}") from exc


class Optimizer:
    """Applies an optimizer to named parameters, in place, keeping per-variable state
    (the rule's ``state_keys`` arrays plus ``t``, the variable's update count).

    ``config`` is anything ``optimizer_from_config`` takes; an unknown one raises ValueError.
    """

    def __init__(self, config: UpdateRule | Mapping[str, Any] | str, backend):
        self.config = optimizer_from_config(config)
        self.backend = backend
        self.kernels = backend.optimizer_kernels()
        self.state: dict[str, dict[str, Any]] = {}

    def apply(self, name: str, param, grad, step: int | None = None) -> None:
        """Update ``param`` in place. ``step`` (0-based global step) drives learning-rate
        schedules; by default it is the number of updates this variable has had."""
        rule = self.config
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {**rule.init_state(param, self.backend), "t": 0}
        lr = learning_rate_at(rule.learning_rate, st["t"] if step is None else step)
        st["t"] += 1
        rule.update(param, grad, st, lr, st["t"], self.kernels)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The per-variable state as host copies, for checkpoints: the rule's
        ``state_keys`` plus ``t`` per variable (SGD ``{"velocity", "t"}``, Adam
        ``{"m", "v", "t"}``; ``t`` an int, the rest NumPy arrays).

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
        want = {*self.config.state_keys, "t"}
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
