"""Neural-network ops: softmax, log_softmax, dropout and batch_norm."""
from __future__ import annotations

import numpy as np

from graph.errors import GraphError, ShapeError
from graph.ops._util import defop, fmt_shape, norm_axes, require_float, same_dtype


def _require_int_axis(axis, node, op):
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise GraphError(f"axis must be one int, got {axis!r}", node, op)


def _softmax_infer(op):
    def infer(node, specs, attrs):
        require_float(specs[0], node, op)
        _require_int_axis(attrs["axis"], node, op)
        norm_axes(attrs["axis"], specs[0].rank, node, op)
        return specs[0]

    return infer


# ---- softmax / log_softmax --------------------------------------------------------
def softmax_ref(ctx, x, axis=-1):
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax_ref(ctx, x, axis=-1):
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


defop(
    "softmax",
    _softmax_infer("softmax"),
    softmax_ref,
    lambda g, y, dy: [g.softmax_grad(dy, y, axis=y.node.attrs["axis"])],
    attrs={"axis": -1},
    num_inputs=1,
)
defop(
    "log_softmax",
    _softmax_infer("log_softmax"),
    log_softmax_ref,
    lambda g, y, dy: [g.log_softmax_grad(dy, y, axis=y.node.attrs["axis"])],
    attrs={"axis": -1},
    num_inputs=1,
)
defop(
    "softmax_grad",
    lambda node, specs, attrs: specs[0],
    lambda ctx, dy, y, axis: y * (dy - np.sum(dy * y, axis=axis, keepdims=True)),
    attrs={"axis": -1},
    num_inputs=2,
    differentiable=False,
)
defop(
    "log_softmax_grad",
    lambda node, specs, attrs: specs[0],
    lambda ctx, dy, y, axis: dy - np.exp(y) * np.sum(dy, axis=axis, keepdims=True),
    attrs={"axis": -1},
    num_inputs=2,
    differentiable=False,
)


# ---- dropout -------------------------------------------------------------------------
def dropout_mask(shape, dtype, rate: float, seed: int, step: int, run_seed: int = 0) -> np.ndarray:
    """The inverted-dropout mask of one step: 0 or 1/(1-rate), drawn from
    (seed, run seed, step) so forward and backward (and a retried step) agree."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(run_seed) & 0xFFFFFFFF, int(step)])
    keep = rng.random(shape) >= rate
    return keep.astype(dtype) * np.asarray(1.0 / (1.0 - rate), dtype)


def _dropout_infer(node, specs, attrs):
    require_float(specs[0], node, "dropout")
    if not 0.0 <= float(attrs["rate"]) < 1.0:
        raise GraphError(f"dropout rate must be in [0, 1), got {attrs['rate']}", node, "dropout")
    return specs[0]


def _dropout_ref(ctx, x, rate, seed):
    if not ctx.training or rate == 0.0:
        return x.copy()
    return x * dropout_mask(x.shape, x.dtype, rate, seed, ctx.step, getattr(ctx, "seed", 0))


defop(
    "dropout",
    _dropout_infer,
    _dropout_ref,
    lambda g, y, dy: [g.dropout_grad(dy, rate=y.node.attrs["rate"], seed=y.node.attrs["seed"])],
    attrs={"rate": 0.5, "seed": 0},
    num_inputs=1,
    random=True,
)
defop(
    "dropout_grad",
    lambda node, specs, attrs: specs[0],
    _dropout_ref,  # the same mask times dy
    attrs={"rate": 0.5, "seed": 0},
    num_inputs=1,
    differentiable=False,
    random=True,
)


# ---- batch_norm ------------------------------------------------------------------------
def _bn_axes(x_ndim, axis):
    axis = axis % x_ndim
    return tuple(i for i in range(x_ndim) if i != axis), axis


def _bn_bshape(x_ndim, axis):
    shape = [1] * x_ndim
    shape[axis % x_ndim] = -1
    return shape


def _bn_infer(node, specs, attrs):
    x, gamma, beta, mm, mv = specs
    require_float(x, node, "batch_norm")
    same_dtype(specs, node, "batch_norm")
    _require_int_axis(attrs["axis"], node, "batch_norm")
    (ax,) = norm_axes(attrs["axis"], x.rank, node, "batch_norm")
    c = x.shape[ax]
    for s, what in ((gamma, "gamma"), (beta, "beta"), (mm, "moving_mean"), (mv, "moving_variance")):
        if s.shape != (c,):
            raise ShapeError(
                f"{what} must have shape ({c},) for input {fmt_shape(x.shape)} on axis {attrs['axis']}, "
                f"got {fmt_shape(s.shape)}",
                node,
                "batch_norm",
            )
    return x


def batch_moments(x, axis):
    red, _ = _bn_axes(x.ndim, axis)
    mean = np.mean(x, axis=red)
    var = np.mean(np.square(x - mean.reshape(_bn_bshape(x.ndim, axis))), axis=red)
    return mean, var


def _bn_stats(ctx, x, mm, mv, axis):
    return batch_moments(x, axis) if ctx.training else (mm, mv)


def _bn_ref(ctx, x, gamma, beta, mm, mv, axis, epsilon, momentum):
    mean, var = _bn_stats(ctx, x, mm, mv, axis)
    b = _bn_bshape(x.ndim, axis)
    rstd = 1.0 / np.sqrt(var + np.asarray(epsilon, x.dtype))
    return ((x - mean.reshape(b)) * (rstd * gamma).reshape(b) + beta.reshape(b)).astype(x.dtype)


def _bn_state_update(ctx, x, gamma, beta, mm, mv, axis, epsilon, momentum):
    """New moving statistics after a training step (Keras rule, biased variance)."""
    mean, var = batch_moments(x, axis)
    m = np.asarray(momentum, x.dtype)
    return {3: mm * m + mean * (1 - m), 4: mv * m + var * (1 - m)}


def _bn_grad_ref(ctx, dy, x, gamma, mm, mv, wrt, axis, epsilon):
    red, _ = _bn_axes(x.ndim, axis)
    b = _bn_bshape(x.ndim, axis)
    mean, var = _bn_stats(ctx, x, mm, mv, axis)
    rstd = (1.0 / np.sqrt(var + np.asarray(epsilon, x.dtype))).reshape(b)
    xhat = (x - mean.reshape(b)) * rstd
    if wrt == "beta":
        return np.sum(dy, axis=red)
    if wrt == "gamma":
        return np.sum(dy * xhat, axis=red)
    dxhat = dy * gamma.reshape(b)
    if not ctx.training:
        return dxhat * rstd
    n = x.size // x.shape[axis % x.ndim]
    return (
        rstd
        / n
        * (n * dxhat - np.sum(dxhat, axis=red, keepdims=True) - xhat * np.sum(dxhat * xhat, axis=red, keepdims=True))
    ).astype(x.dtype)


def _bn_grad(g, y, dy):
    x, gamma, beta, mm, mv = (g.tensor(n) for n in y.node.inputs)
    a = y.node.attrs
    kw = {"axis": a["axis"], "epsilon": a["epsilon"]}
    return [
        g.batch_norm_grad(dy, x, gamma, mm, mv, wrt="x", **kw),
        g.batch_norm_grad(dy, x, gamma, mm, mv, wrt="gamma", **kw),
        g.batch_norm_grad(dy, x, gamma, mm, mv, wrt="beta", **kw),
        None,
        None,
    ]


def _bn_grad_infer(node, specs, attrs):
    if attrs["wrt"] == "x":
        return specs[1]
    return specs[2]


defop(
    "batch_norm",
    _bn_infer,
    _bn_ref,
    _bn_grad,
    attrs={"axis": -1, "epsilon": 1e-3, "momentum": 0.99},
    num_inputs=5,
    state_update=_bn_state_update,
)
defop(
    "batch_norm_grad",
    _bn_grad_infer,
    _bn_grad_ref,
    attrs={"wrt": "x", "axis": -1, "epsilon": 1e-3},
    num_inputs=5,
    differentiable=False,
)
