"""Weight penalties, Keras names: a Dense layer's kernel_regularizer and
bias_regularizer add them to the loss (a bias is penalized only when asked).

Usage::

    nn.Dense(64, kernel_regularizer=nn.regularizers.L2(1e-4), bias_regularizer=nn.regularizers.L1(1e-5))
"""
from __future__ import annotations

from dataclasses import dataclass

from graph.core import Graph, Tensor


@dataclass(frozen=True)
class L1:
    l1: float = 0.01

    def __post_init__(self):
        if float(self.l1) < 0:
            raise ValueError(f"L1.l1={self.l1!r} must be >= 0")

    def penalty(self, g: Graph, w: Tensor) -> Tensor:
        return g.l1_penalty(w, l=float(self.l1), name=f"{w.name}/l1")

    def get_config(self) -> dict:
        return {"name": "l1", "l1": self.l1}


@dataclass(frozen=True)
class L2:
    l2: float = 0.01

    def __post_init__(self):
        if float(self.l2) < 0:
            raise ValueError(f"L2.l2={self.l2!r} must be >= 0")

    def penalty(self, g: Graph, w: Tensor) -> Tensor:
        return g.l2_penalty(w, l=float(self.l2), name=f"{w.name}/l2")

    def get_config(self) -> dict:
        return {"name": "l2", "l2": self.l2}


def get(config) -> L1 | L2 | None:
    if config is None or isinstance(config, (L1, L2)):
        return config
    if isinstance(config, str):
        config = {"name": config}
    config = dict(config)
    name = config.pop("name", "").lower()
    if name == "l1":
        return L1(**config)
    if name == "l2":
        return L2(**config)
    raise ValueError(f"unknown regularizer '{name}'; use nn.regularizers.L1(l) or L2(l)")
