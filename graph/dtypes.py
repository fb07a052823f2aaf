"""Dtypes the graph IR accepts, and NumPy-style promotion.

Promotion follows NumPy (NEP 50): a Python scalar is "weak" and takes the dtype of
the tensor it meets (``float32 + 0.5`` is float32, ``int8 + 3`` is int8), and a
Python float next to a bool or integer tensor gives float64 (``int32 + 0.5``). One
pstrain rule: a bare Python float, with no tensor to take a dtype from, is float32.
"""
from __future__ import annotations

import numpy as np

from graph.errors import DTypeError

SUPPORTED = tuple(
    np.dtype(t)
    for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64")
)
FLOATS = (np.dtype("float16"), np.dtype("float32"), np.dtype("float64"))


def as_dtype(value, node: str | None = None) -> np.dtype:
    """Return ``value`` as a supported ``np.dtype``; raise DTypeError otherwise."""
    try:
        dt = np.dtype(value)
    except TypeError as exc:
        raise DTypeError(f"'{value}' is not a dtype", node) from exc
    if dt not in SUPPORTED:
        raise DTypeError(
            f"dtype {dt} is not supported; use one of {', '.join(str(d) for d in SUPPORTED)}",
            node,
        )
    return dt


def is_float(dtype) -> bool:
    return np.dtype(dtype) in FLOATS


def promote(a: np.dtype, b: np.dtype, node: str | None = None) -> np.dtype:
    """The dtype NumPy gives ``a op b`` for two arrays."""
    a, b = as_dtype(a, node), as_dtype(b, node)
    return np.result_type(a, b)


def weak_scalar_dtype(value, other: np.dtype | None, node: str | None = None) -> np.dtype:
    """The dtype a Python scalar takes next to a tensor of dtype ``other`` (None: alone)."""
    if isinstance(value, (bool, np.bool_)):
        return np.dtype(bool) if other is None else other
    if isinstance(value, (int, np.integer)):
        if other is None or other == np.dtype(bool):
            return np.dtype("int64")
        if other.kind in "iu" and not np.iinfo(other).min <= value <= np.iinfo(other).max:
            raise DTypeError(f"the Python int {value} does not fit the {other} tensor it meets; cast one of them", node)
        return other
    if isinstance(value, (float, np.floating)):
        if other is None:
            return np.dtype("float32")
        return other if is_float(other) else np.dtype("float64")
    raise DTypeError(f"cannot use {type(value).__name__} value {value!r} as a tensor", node)
