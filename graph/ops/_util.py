"""Shape and dtype helpers shared by the op definitions."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from graph import dtypes
from graph.errors import DTypeError, GraphError, ShapeError
from graph.registry import OpDef, TensorSpec, register


def broadcast_shapes(a: tuple, b: tuple, node: str, op: str) -> tuple:
    """NumPy broadcasting on static shapes where ``None`` is unknown."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == 1:
            out.append(db)
        elif db == 1:
            out.append(da)
        elif da is None:
            out.append(db)
        elif db is None or da == db:
            out.append(da)
        else:
            raise ShapeError(f"shapes {_fmt(a)} and {_fmt(b)} cannot be broadcast together", node, op)
    return tuple(reversed(out))


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


fmt_shape = _fmt


def require_float(spec: TensorSpec, node: str, op: str, what: str = "input") -> None:
    if not dtypes.is_float(spec.dtype):
        raise DTypeError(f"{what} must be a float tensor, got {spec.dtype}", node, op)


def same_dtype(specs: Sequence[TensorSpec], node: str, op: str) -> np.dtype:
    first = specs[0].dtype
    for s in specs[1:]:
        if s.dtype != first:
            raise DTypeError(f"dtypes {first} and {s.dtype} clash; cast one of the inputs", node, op)
    return first


def norm_axes(axis, rank: int, node: str, op: str) -> tuple:
    """Normalize an axis attr (None, int or list) to a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(rank))
    axes = [axis] if isinstance(axis, (int, np.integer)) else list(axis)
    out = []
    for a in axes:
        a = int(a)
        if not -rank <= a < rank:
            raise ShapeError(f"axis {a} is out of range for rank {rank}", node, op)
        out.append(a % rank)
    if len(set(out)) != len(out):
        raise GraphError(f"repeated axis in {axis}", node, op)
    return tuple(sorted(out))


def num_elements(shape) -> int | None:
    n = 1
    for d in shape:
        if d is None:
            return None
        n *= d
    return n


def sum_to_shape(x: np.ndarray, shape: tuple) -> np.ndarray:
    """Reduce ``x`` (a broadcast result) back to ``shape`` by summing."""
    if x.shape == tuple(shape):
        return x
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1
    )
    return np.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)


def defop(name: str, infer, reference, grad=None, attrs=None, num_inputs=None, **kw) -> OpDef:
    return register(OpDef(name, infer, reference, grad, dict(attrs or {}), num_inputs, **kw))


def unbroadcast(g, dy, x):
    """Gradient ``dy`` of a broadcast result, reduced to the shape of input ``x``.

    Equal static shapes mean no broadcast happened (``None`` is the one batch size)."""
    return dy if dy.shape == x.shape else g.sum_to(dy, x)
