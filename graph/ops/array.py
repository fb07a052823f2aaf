"""Shape-changing ops: matmul, reshape, expand_dims, transpose and reductions."""
from __future__ import annotations

import numpy as np

from graph import dtypes
from graph.errors import GraphError, ShapeError
from graph.ops._util import (
    broadcast_shapes,
    defop,
    fmt_shape,
    norm_axes,
    num_elements,
    require_float,
    same_dtype,
    unbroadcast,
)
from graph.registry import TensorSpec


# ---- matmul ------------------------------------------------------------------
def _mm_dims(shape, transpose):
    m, k = shape[-2], shape[-1]
    return (k, m) if transpose else (m, k)


def _matmul_infer(node, specs, attrs):
    a, b = specs
    for s, what in ((a, "a"), (b, "b")):
        if s.rank < 2:
            raise ShapeError(f"matmul input {what} must have rank >= 2, got shape {fmt_shape(s.shape)}", node, "matmul")
        require_float(s, node, "matmul", f"matmul input {what}")
    dt = same_dtype(specs, node, "matmul")
    m, k1 = _mm_dims(a.shape, attrs["transpose_a"])
    k2, n = _mm_dims(b.shape, attrs["transpose_b"])
    if k1 is not None and k2 is not None and k1 != k2:
        raise ShapeError(
            f"inner dimensions differ: {fmt_shape(a.shape)} @ {fmt_shape(b.shape)} "
            f"(transpose_a={attrs['transpose_a']}, transpose_b={attrs['transpose_b']}) needs {k1} == {k2}",
            node,
            "matmul",
        )
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2], node, "matmul")
    return TensorSpec(batch + (m, n), dt)


def _matmul_ref(ctx, a, b, transpose_a, transpose_b):
    if transpose_a:
        a = np.swapaxes(a, -1, -2)
    if transpose_b:
        b = np.swapaxes(b, -1, -2)
    return np.matmul(a, b)


def _matmul_grad(g, y, dy):
    a, b = (g.tensor(n) for n in y.node.inputs)
    ta, tb = y.node.attrs["transpose_a"], y.node.attrs["transpose_b"]
    if not ta and not tb:
        da, db = g.matmul(dy, b, transpose_b=True), g.matmul(a, dy, transpose_a=True)
    elif ta and not tb:
        da, db = g.matmul(b, dy, transpose_b=True), g.matmul(a, dy)
    elif not ta and tb:
        da, db = g.matmul(dy, b), g.matmul(dy, a, transpose_a=True)
    else:
        da = g.matmul(b, dy, transpose_a=True, transpose_b=True)
        db = g.matmul(dy, a, transpose_a=True, transpose_b=True)
    return [unbroadcast(g, da, a), unbroadcast(g, db, b)]


defop(
    "matmul",
    _matmul_infer,
    _matmul_ref,
    _matmul_grad,
    attrs={"transpose_a": False, "transpose_b": False},
    num_inputs=2,
)


# ---- reshape family ------------------------------------------------------------
def _reshape_infer(node, specs, attrs):
    (x,) = specs
    want = tuple(attrs["shape"])
    target = [-1 if d is None else int(d) for d in want]  # None in the target means -1

    def cannot(why):
        return ShapeError(f"cannot reshape {fmt_shape(x.shape)} to {want}: {why}", node, "reshape")

    if target.count(-1) > 1:
        raise cannot("more than one unknown (-1) dimension")
    if any(d < -1 for d in target):
        raise cannot("negative dimension")
    known = num_elements(d for d in target if d != -1)
    n_in = num_elements(x.shape)
    if -1 not in target:
        if n_in is not None and n_in != known:
            raise cannot(f"{n_in} elements into {known}")
        return TensorSpec(tuple(target), x.dtype)
    if known == 0:
        raise cannot("-1 next to a zero-size dimension is ambiguous")
    idx = target.index(-1)
    if n_in is None:
        # An unknown (batch) input dim fits any target for some batch size;
        # the run-time reshape checks the actual one.
        target[idx] = None
    elif n_in % known:
        raise cannot(f"{n_in} elements do not divide into rows of {known}")
    else:
        target[idx] = n_in // known
    return TensorSpec(tuple(target), x.dtype)


def _reshape_ref(ctx, x, shape):
    return np.reshape(x, [-1 if d is None else d for d in shape])


def _reshape_like_grad(g, y, dy):
    return [g.reshape_like(dy, g.tensor(y.node.inputs[0]))]


defop("reshape", _reshape_infer, _reshape_ref, _reshape_like_grad, attrs={"shape": ()}, num_inputs=1)
defop(
    "reshape_like",
    lambda node, specs, attrs: TensorSpec(specs[1].shape, specs[0].dtype),
    lambda ctx, x, like: np.reshape(x, like.shape),
    num_inputs=2,
    differentiable=False,
)


def _expand_dims_infer(node, specs, attrs):
    (x,) = specs
    axis = int(attrs["axis"])
    if not -(x.rank + 1) <= axis <= x.rank:
        raise ShapeError(f"axis {axis} is out of range for rank {x.rank}", node, "expand_dims")
    axis %= x.rank + 1
    return TensorSpec(x.shape[:axis] + (1,) + x.shape[axis:], x.dtype)


defop(
    "expand_dims",
    _expand_dims_infer,
    lambda ctx, x, axis: np.expand_dims(x, axis),
    _reshape_like_grad,
    attrs={"axis": 0},
    num_inputs=1,
)


def _perm(attrs, rank, node):
    perm = attrs["perm"]
    if perm is None or len(perm) == 0:
        return tuple(reversed(range(rank)))
    perm = tuple(int(p) % rank if -rank <= int(p) < rank else -1 for p in perm)
    if sorted(perm) != list(range(rank)):
        raise ShapeError(f"perm {attrs['perm']} is not a permutation of {rank} axes", node, "transpose")
    return perm


def _transpose_infer(node, specs, attrs):
    (x,) = specs
    perm = _perm(attrs, x.rank, node)
    return TensorSpec(tuple(x.shape[p] for p in perm), x.dtype)


def _transpose_grad(g, y, dy):
    perm = _perm(y.node.attrs, len(y.shape), y.name)
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return [g.transpose(dy, perm=inverse)]


defop(
    "transpose",
    _transpose_infer,
    lambda ctx, x, perm: np.transpose(x, None if not perm else perm),
    _transpose_grad,
    attrs={"perm": None},
    num_inputs=1,
)


# ---- reductions ------------------------------------------------------------------
def _reduce_infer(op):
    def infer(node, specs, attrs):
        (x,) = specs
        if op == "reduce_mean":
            require_float(x, node, op)
        axes = norm_axes(attrs["axis"], x.rank, node, op)
        if attrs["keepdims"]:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        dtype = x.dtype
        if op == "reduce_sum" and not dtypes.is_float(dtype):
            # NumPy sums bool and integers in int64 (uint8 in uint64, which pstrain
            # does not support; int64 holds any such sum as well).
            dtype = np.dtype("int64")
        return TensorSpec(shape, dtype)

    return infer


def _axis_arg(axis):
    if axis is None:
        return None
    return axis if isinstance(axis, (int, np.integer)) else tuple(axis)


def _reduce_max_ref(ctx, x, axis, keepdims):
    if x.size == 0:
        raise ValueError("reduce_max of an empty tensor")
    return np.max(x, axis=_axis_arg(axis), keepdims=keepdims)


def _reduce_grad(mean):
    def grad(g, y, dy):
        x = g.tensor(y.node.inputs[0])
        a = y.node.attrs
        return [g.unreduce(dy, x, axis=a["axis"], keepdims=a["keepdims"], mean=mean)]

    return grad


def _reduce_max_grad(g, y, dy):
    x = g.tensor(y.node.inputs[0])
    a = y.node.attrs
    return [g.reduce_max_grad(dy, x, y, axis=a["axis"], keepdims=a["keepdims"])]


_RATTRS = {"axis": None, "keepdims": False}
defop(
    "reduce_sum",
    _reduce_infer("reduce_sum"),
    lambda ctx, x, axis, keepdims: np.sum(x, axis=_axis_arg(axis), keepdims=keepdims),
    _reduce_grad(False),
    attrs=_RATTRS,
    num_inputs=1,
)
defop(
    "reduce_mean",
    _reduce_infer("reduce_mean"),
    lambda ctx, x, axis, keepdims: np.mean(x, axis=_axis_arg(axis), keepdims=keepdims),
    _reduce_grad(True),
    attrs=_RATTRS,
    num_inputs=1,
)
defop("reduce_max", _reduce_infer("reduce_max"), _reduce_max_ref, _reduce_max_grad, attrs=_RATTRS, num_inputs=1)


def _expand_back(dy, x_shape, axis, keepdims):
    axes = norm_axes(axis, len(x_shape), None, "unreduce")
    if not keepdims:
        for a in axes:
            dy = np.expand_dims(dy, a)
    return dy, axes


def _unreduce_ref(ctx, dy, x, axis, keepdims, mean):
    dy, axes = _expand_back(dy, x.shape, axis, keepdims)
    out = np.broadcast_to(dy, x.shape).astype(dy.dtype, copy=True)
    if mean:
        count = int(np.prod([x.shape[a] for a in axes])) if axes else 1
        out /= np.asarray(max(count, 1), dtype=out.dtype)
    return out


def _reduce_max_grad_ref(ctx, dy, x, y, axis, keepdims):
    dy, _ = _expand_back(dy, x.shape, axis, keepdims)
    y, _ = _expand_back(y, x.shape, axis, keepdims)
    mask = (x == y).astype(dy.dtype)
    # Ties share the gradient evenly (PyTorch's amax rule).
    count = np.sum(mask, axis=_axis_arg(axis), keepdims=True)
    return mask * dy / count


defop(
    "unreduce",
    lambda node, specs, attrs: TensorSpec(specs[1].shape, specs[0].dtype),
    _unreduce_ref,
    attrs={"axis": None, "keepdims": False, "mean": False},
    num_inputs=2,
    differentiable=False,
    doc="Broadcast a reduction's gradient back over the reduced axes.",
)
defop(
    "reduce_max_grad",
    lambda node, specs, attrs: TensorSpec(specs[1].shape, specs[0].dtype),
    _reduce_max_grad_ref,
    attrs=_RATTRS,
    num_inputs=3,
    differentiable=False,
)


# ---- concat ------------------------------------------------------------------
def _concat_axis(specs, attrs, node) -> int:
    if not specs:
        raise GraphError("concat needs at least one input", node, "concat")
    rank = specs[0].rank
    if rank == 0:
        raise ShapeError("concat needs inputs of rank >= 1, got a scalar", node, "concat")
    return norm_axes(int(attrs["axis"]), rank, node, "concat")[0]


def _concat_infer(node, specs, attrs):
    axis = _concat_axis(specs, attrs, node)
    first = specs[0]
    dt = first.dtype
    total = 0
    for i, s in enumerate(specs):
        if s.rank != first.rank:
            raise ShapeError(f"concat input {i} has rank {s.rank} ({fmt_shape(s.shape)}), input 0 has rank "
                             f"{first.rank} ({fmt_shape(first.shape)})", node, "concat")
        for d, (a, b) in enumerate(zip(first.shape, s.shape)):
            if d != axis and a is not None and b is not None and a != b:
                raise ShapeError(f"concat input {i} {fmt_shape(s.shape)} differs from input 0 {fmt_shape(first.shape)} "
                                 f"in axis {d}; only axis {axis} may differ", node, "concat")
        dt = dtypes.promote(dt, s.dtype, node)
        total = None if total is None or s.shape[axis] is None else total + s.shape[axis]
    shape = tuple(total if d == axis else first.shape[d] for d in range(first.rank))
    return TensorSpec(shape, dt)


def _concat_ref(ctx, *xs, axis):
    return np.concatenate(xs, axis=axis)


def _concat_grad(g, y, dy):
    inputs = [g.tensor(n) for n in y.node.inputs]
    return [g.op("concat_grad", [dy, *inputs], index=i, axis=y.node.attrs["axis"]) for i in range(len(inputs))]


def _concat_grad_ref(ctx, dy, *xs, index, axis):
    start = sum(x.shape[axis] for x in xs[:index])
    return np.take(dy, np.arange(start, start + xs[index].shape[axis]), axis=axis).astype(xs[index].dtype, copy=False)


defop("concat", _concat_infer, _concat_ref, _concat_grad, attrs={"axis": 0},
      doc="Join tensors along an existing axis; all other dimensions must agree.")
defop("concat_grad", lambda node, specs, attrs: TensorSpec(specs[1 + attrs["index"]].shape, specs[1 + attrs["index"]].dtype),
      _concat_grad_ref, attrs={"index": 0, "axis": 0}, differentiable=False,
      doc="The slice of a concat's gradient that belongs to input ``index``.")
