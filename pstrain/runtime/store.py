"""A parameter store: variables, their optimizer, and the checks every push passes.

This is the core of a parameter-server shard with no transport attached: the
in-process trainer talks to it directly, and a gRPC shard wraps it. A push is
checked whole (unknown variable, shape, dtype, NaN/Inf) before anything is
applied, so a bad gradient never corrupts a parameter.

Usage::

    store = ParameterStore(initial, trainable={"w"}, optimizer=Optimizer(SGD(0.1), backend))
    params = store.pull()
    store.push({"w": grad_w})
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from pstrain.runtime.optimizers import Optimizer


class PushRejected(ValueError):
    """A push failed validation; nothing of it was applied. ``reason`` is a short
    machine-readable cause (unknown_variable, shape, dtype, non_finite)."""

    def __init__(self, reason: str, variable: str, message: str):
        self.reason = reason
        self.variable = variable
        super().__init__(f"push rejected for variable '{variable}': {message}")


class ParameterStore:
    def __init__(self, initial: Mapping[str, np.ndarray], trainable: set[str] | None, optimizer: Optimizer):
        backend = optimizer.backend
        self.backend = backend
        self.params = {k: backend.asarray(np.array(v, copy=True)) for k, v in initial.items()}
        self.trainable = set(initial) if trainable is None else set(trainable)
        self.optimizer = optimizer
        self.version = 0

    def pull(self) -> dict:
        """The current parameters (the store's own arrays: read, don't write)."""
        return self.params

    def push(self, grads: Mapping[str, np.ndarray], assign: Mapping[str, np.ndarray] | None = None) -> int:
        """Apply gradients (trainable variables) and assignments (state variables,
        e.g. batch-norm moving statistics) as one update; returns the new version."""
        assign = assign or {}
        for name, g in grads.items():
            self._check(name, g, trainable=True)
        for name, v in assign.items():
            self._check(name, v, trainable=False)
        for name, g in grads.items():
            self.optimizer.apply(name, self.params[name], g)
        for name, v in assign.items():
            self.backend.copy_into(self.params[name], v)
        self.version += 1
        return self.version

    def _check(self, name: str, value, trainable: bool) -> None:
        if name not in self.params:
            raise PushRejected("unknown_variable", name, f"no such variable; known: {sorted(self.params)}")
        if trainable and name not in self.trainable:
            raise PushRejected("unknown_variable", name, "variable is not trainable; send its new value as an assignment")
        p = self.params[name]
        if tuple(value.shape) != tuple(p.shape):
            raise PushRejected("shape", name, f"shape {tuple(value.shape)} does not match the variable's {tuple(p.shape)}")
        if value.dtype != p.dtype:
            raise PushRejected("dtype", name, f"dtype {value.dtype} does not match the variable's {p.dtype}")
        if not self.backend.all_finite(value):
            raise PushRejected("non_finite", name, "contains NaN or Inf; nothing was applied")
