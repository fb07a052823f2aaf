"""Activation functions by Keras name, lowered to graph ops."""
from __future__ import annotations

from graph.core import Graph, Tensor

NAMES = ("linear", "sigmoid", "tanh", "relu", "leaky_relu", "softmax")


def check(name: str | None, where: str) -> str:
    name = "linear" if name is None else name
    if name not in NAMES:
        raise ValueError(f"{where}: unknown activation '{name}'; use one of {', '.join(NAMES)}")
    return name


def apply(g: Graph, name: str, x: Tensor, layer: str) -> Tensor:
    if name == "linear":
        return x
    if name == "leaky_relu":
        return g.leaky_relu(x, name=f"{layer}/leaky_relu")
    return g.op(name, [x], name=f"{layer}/{name}")
