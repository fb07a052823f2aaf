"""Dtypes the graph IR accepts, and NumPy-style promotion.

Promotion follows NumPy (NEP 50) with one pstrain rule: a Python float is a "weak"
float32, so ``int32 + 0.5`` is float32 and ``float64 + 0.5`` stays float64.
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


def weak_scalar_dtype(value, other: np.dtype | None) -> np.dtype:
    """The dtype a Python scalar takes next to a tensor of dtype ``other``."""
    if isinstance(value, (bool, np.bool_)):
        return np.dtype(bool) if other is None else other
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return np.dtype("int64") if other is None or other == np.dtype(bool) else other
    if isinstance(value, (float, np.floating)):
        if other is not None and is_float(other):
            return other
        return np.dtype("float32")
    raise DTypeError(f"cannot use {type(value).__name__} value {value!r} as a tensor")
