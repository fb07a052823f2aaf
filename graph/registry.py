"""The op registry: one ``OpDef`` per op type.

An OpDef carries everything the rest of pstrain needs to know about an op:
its attrs and their defaults, static shape/dtype inference, the NumPy reference
semantics (the ground truth every kernel is tested against) and the gradient rule
(which builds backward nodes in the graph).

Usage::

    from graph.registry import get_op
    spec = get_op("relu").infer([TensorSpec((None, 3), np.float32)], {})
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from graph.errors import UnknownOpError

Shape = tuple  # of int | None (None: unknown, e.g. the batch dimension)


@dataclass(frozen=True)
class TensorSpec:
    """Static shape and dtype of a node's output."""

    shape: Shape
    dtype: np.dtype

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass
class RunContext:
    """Per-run facts some ops need: training vs inference, and the global step
    (dropout derives its mask from seed and step, so forward and backward agree)."""

    training: bool = True
    step: int = 0
    seed: int = 0  # mixed into random ops, e.g. per worker


# infer(node_name, input_specs, attrs) -> TensorSpec
InferFn = Callable[[str, Sequence[TensorSpec], dict], TensorSpec]
# reference(ctx, *inputs, **attrs) -> ndarray
ReferenceFn = Callable[..., np.ndarray]
# grad(g, node_tensor, dy) -> list of gradient tensors (or None) per input
GradFn = Callable[..., list]
# state_update(ctx, *inputs, **attrs) -> {input_index: new value} (training only)
StateFn = Callable[..., dict]


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: InferFn
    reference: ReferenceFn | None
    grad: GradFn | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    num_inputs: int | None = None  # None: variadic
    differentiable: bool = True
    state_update: StateFn | None = None
    random: bool = False  # draws random numbers (never constant-folded or merged by CSE)
    doc: str = ""


_REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in _REGISTRY:
        raise ValueError(f"op '{opdef.name}' registered twice")
    _REGISTRY[opdef.name] = opdef
    return opdef


def get_op(name: str, node: str | None = None) -> OpDef:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownOpError(
            f"unknown op '{name}'; known ops: {', '.join(sorted(_REGISTRY))}", node, name
        ) from None


def all_ops() -> dict[str, OpDef]:
    _ensure_loaded()
    return dict(_REGISTRY)


def _ensure_loaded() -> None:
    # The op modules register themselves on import.
    import graph.ops  # noqa: F401
