"""Activation functions, lowered to graph ops: a Keras name, one of these functions,
a ``LeakyReLU(alpha)`` or any callable that takes and returns a graph tensor.

Usage::

    nn.Dense(64, activation="relu")
    nn.Dense(64, activation=nn.activations.LeakyReLU(alpha=0.1))
    nn.Dense(64, activation=lambda x: nn.activations.tanh(x) * 2.0)   # in-process only

Every function here takes a graph tensor and returns one (``name`` names the node).
A callable of your own works for fit/evaluate/predict in this process, but a model
config cannot hold Python code, so ``model.save`` and ``fit(cluster=...)`` refuse it
(``serialize`` says so, naming the callable).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

from graph.core import Tensor

ActivationFn = Callable[[Tensor], Tensor]


def linear(x: Tensor, name: str | None = None) -> Tensor:
    return x


def sigmoid(x: Tensor, name: str | None = None) -> Tensor:
    return x.graph.sigmoid(x, name=name)


def tanh(x: Tensor, name: str | None = None) -> Tensor:
    return x.graph.tanh(x, name=name)


def relu(x: Tensor, name: str | None = None) -> Tensor:
    return x.graph.relu(x, name=name)


def softmax(x: Tensor, name: str | None = None) -> Tensor:
    return x.graph.softmax(x, name=name)


def leaky_relu(x: Tensor, alpha: float = 0.2, name: str | None = None) -> Tensor:
    """``x`` where x > 0, else ``alpha * x`` (Keras's ``negative_slope``)."""
    return x.graph.leaky_relu(x, alpha=_slope(alpha), name=name)


def step(x: Tensor, name: str | None = None) -> Tensor:
    """The perceptron's step: 1 where x > 0, else 0 (so step(0) = 0). Its gradient is
    0 everywhere, so layers below a step head do not learn by gradient descent."""
    return x.graph.step(x, name=name)


def sign(x: Tensor, name: str | None = None) -> Tensor:
    """The perceptron's sign: 1 where x > 0, else -1, so sign(0) = -1. This is *not*
    NumPy's ``np.sign`` (nor the graph op ``sign``), for which sign(0) = 0: a
    perceptron's output is always one of its two classes. Built as ``2 * step(x) - 1``;
    its gradient is 0 everywhere."""
    g = x.graph
    return g.sub(g.mul(g.step(x), 2.0), 1.0, name=name)


BUILTINS: dict[str, ActivationFn] = {
    f.__name__: f for f in (linear, sigmoid, tanh, relu, leaky_relu, softmax, step, sign)
}
NAMES = tuple(BUILTINS)


def _slope(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or alpha != alpha:
        raise ValueError(f"leaky_relu: alpha must be a number, got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class LeakyReLU:
    """A leaky ReLU with slope ``alpha`` below 0 (Keras's layer default, 0.3); call it
    on a graph tensor, or pass it as ``activation=`` to a layer.

    Usage: ``nn.Dense(32, activation=nn.activations.LeakyReLU(0.1))``
    """

    alpha: float = 0.3

    def __post_init__(self):
        object.__setattr__(self, "alpha", _slope(self.alpha))

    def __call__(self, x: Tensor, name: str | None = None) -> Tensor:
        return leaky_relu(x, self.alpha, name=name)

    def get_config(self) -> dict:
        return {"name": "leaky_relu", "alpha": self.alpha}


def get(identifier, where: str) -> ActivationFn:
    """The activation for a Keras name (None: linear), a saved config
    (``{"name": "leaky_relu", "alpha": 0.1}``), or a callable, returned as is."""
    if identifier is None:
        return linear
    if isinstance(identifier, dict):
        config = dict(identifier)
        if config.pop("name", None) == "leaky_relu" and set(config) <= {"alpha"}:
            return LeakyReLU(**config)
        raise ValueError(f"{where}: unknown activation config {identifier!r}")
    if isinstance(identifier, str):
        if identifier not in BUILTINS:
            raise ValueError(f"{where}: unknown activation '{identifier}'; use one of {', '.join(NAMES)} or a callable")
        # "leaky_relu" by name has Keras's function default slope, 0.2
        return LeakyReLU(0.2) if identifier == "leaky_relu" else BUILTINS[identifier]
    if callable(identifier):
        return identifier
    raise ValueError(f"{where}: activation must be a name ({', '.join(NAMES)}) or a callable, got {identifier!r}")


def name_of(fn: ActivationFn) -> str | None:
    """The Keras name of a built-in activation (a head a loss can fuse); None for others."""
    if isinstance(fn, LeakyReLU):
        return "leaky_relu"
    return next((n for n, f in BUILTINS.items() if f is fn), None)  # by identity: a callable need not hash


def serialize(fn: ActivationFn, where: str) -> str | dict:
    """What a model config stores for ``fn``; a callable of your own cannot be stored."""
    if isinstance(fn, LeakyReLU):
        return fn.get_config()
    name = name_of(fn)
    if name is None:
        raise ValueError(
            f"{where}: activation {describe(fn)} is a Python callable; it works in this process only "
            "(fit/evaluate/predict) and cannot go into a model config (save, fit(cluster=...), psctl). "
            f"Use a named activation ({', '.join(NAMES)}) or nn.activations.LeakyReLU(alpha) to save or ship the model"
        )
    return name


def apply(fn: ActivationFn, x: Tensor, layer: str) -> Tensor:
    """``fn(x)`` for ``layer``: built-ins name their node ``layer/name``; a callable
    of your own must return a tensor of the same graph, shape and dtype as ``x``."""
    name = name_of(fn)
    if name is not None:
        return fn(x, name=f"{layer}/{name}")
    y = fn(x)
    if not isinstance(y, Tensor) or y.graph is not x.graph:
        raise TypeError(
            f"layer '{layer}': activation {describe(fn)} returned {type(y).__name__}; it must return a graph "
            "tensor built from its input with graph ops (e.g. lambda x: x * 2.0, or nn.activations.relu(x))"
        )
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(
            f"layer '{layer}': activation {describe(fn)} turned a {x.dtype} tensor of shape {x.shape} into a "
            f"{y.dtype} one of shape {y.shape}; an activation must keep shape and dtype"
        )
    return y


def describe(fn) -> str:
    """A callable's name as a user wrote it (``module.qualname``)."""
    qual = getattr(fn, "__qualname__", None)
    if qual is None:
        return repr(fn)
    module = getattr(fn, "__module__", None)
    return f"'{module}.{qual}'" if module else f"'{qual}'"
