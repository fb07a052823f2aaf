"""Sources (placeholder, variable, constant) and elementwise ops.

Binary ops broadcast like NumPy; their gradients are summed back to each input's
shape with ``sum_to``. Each op's forward sits beside its backward rule.
"""
from __future__ import annotations

import numpy as np

from graph import dtypes
from graph.errors import DTypeError, GraphError
from graph.ops._util import (
    broadcast_shapes,
    defop,
    require_float,
    sum_to_shape,
    unbroadcast,
)
from graph.registry import TensorSpec


# ---- sources --------------------------------------------------------------------
def _no_infer(node, specs, attrs):  # sources get their spec from the builder
    raise GraphError("source ops are created with g.placeholder/variable/constant", node)


def _source_ref(ctx, **attrs):
    raise GraphError("placeholders and variables are bound by the executor, not computed")


defop("placeholder", _no_infer, _source_ref, num_inputs=0, differentiable=False)
defop("variable", _no_infer, _source_ref, attrs={"trainable": True}, num_inputs=0, differentiable=False)
defop("constant", _no_infer, lambda ctx, value: value, attrs={"value": None}, num_inputs=0, differentiable=False)


def _like_infer(node, specs, attrs):
    return specs[0]


defop("zeros_like", _like_infer, lambda ctx, x: np.zeros_like(x), num_inputs=1, differentiable=False)
defop("ones_like", _like_infer, lambda ctx, x: np.ones_like(x), num_inputs=1, differentiable=False)


# ---- binary, broadcasting ----------------------------------------------------
def _binary_infer(op):
    def infer(node, specs, attrs):
        a, b = specs
        if a.dtype == np.bool_ and b.dtype == np.bool_ and op in ("sub", "div"):
            raise DTypeError(f"'{op}' is not defined for bool tensors", node, op)
        dt = dtypes.promote(a.dtype, b.dtype, node)
        if op == "div" and not dtypes.is_float(dt):
            dt = np.dtype("float64")  # NumPy's true division of any integers
        return TensorSpec(broadcast_shapes(a.shape, b.shape, node, op), dt)

    return infer


def _add_grad(g, y, dy):
    a, b = (g.tensor(n) for n in y.node.inputs)
    return [unbroadcast(g, dy, a), unbroadcast(g, dy, b)]


def _sub_grad(g, y, dy):
    a, b = (g.tensor(n) for n in y.node.inputs)
    return [unbroadcast(g, dy, a), unbroadcast(g, g.neg(dy), b)]


def _mul_grad(g, y, dy):
    a, b = (g.tensor(n) for n in y.node.inputs)
    return [unbroadcast(g, g.mul(dy, b), a), unbroadcast(g, g.mul(dy, a), b)]


def _div_grad(g, y, dy):
    a, b = (g.tensor(n) for n in y.node.inputs)
    # d(a/b)/db = -a/b^2 = -y/b
    return [unbroadcast(g, g.div(dy, b), a), unbroadcast(g, g.neg(g.div(g.mul(dy, y), b)), b)]


def _maximum_grad(g, y, dy):
    a, b = (g.tensor(n) for n in y.node.inputs)
    return [
        unbroadcast(g, g.maximum_grad(dy, a, b, wrt=0), a),
        unbroadcast(g, g.maximum_grad(dy, a, b, wrt=1), b),
    ]


def _div_ref(ctx, a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(a, b)


defop("add", _binary_infer("add"), lambda ctx, a, b: np.add(a, b), _add_grad, num_inputs=2)
defop("sub", _binary_infer("sub"), lambda ctx, a, b: np.subtract(a, b), _sub_grad, num_inputs=2)
defop("mul", _binary_infer("mul"), lambda ctx, a, b: np.multiply(a, b), _mul_grad, num_inputs=2)
defop("div", _binary_infer("div"), _div_ref, _div_grad, num_inputs=2)
defop("maximum", _binary_infer("maximum"), lambda ctx, a, b: np.maximum(a, b), _maximum_grad, num_inputs=2)


def _pow_ref(ctx, a, b):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.power(a, b)


def _pow_grad(g, y, dy):
    a, b = (g.tensor(n) for n in y.node.inputs)
    # d(a^b)/da = b a^(b-1); d(a^b)/db = a^b log(a), taken as 0 where a <= 0 (as TensorFlow does)
    return [unbroadcast(g, g.mul(dy, g.mul(b, g.pow(a, g.sub(b, 1.0)))), a),
            unbroadcast(g, g.pow_grad_exponent(dy, a, y), b)]


defop("pow", _binary_infer("pow"), _pow_ref, _pow_grad, num_inputs=2, doc="a ** b, broadcasting.")


def _pow_grad_exponent_ref(ctx, dy, a, y):
    with np.errstate(divide="ignore", invalid="ignore"):
        return dy * y * np.where(a > 0, np.log(np.where(a > 0, a, 1)), 0).astype(y.dtype)


defop("pow_grad_exponent", lambda node, specs, attrs: specs[2], _pow_grad_exponent_ref, num_inputs=3, differentiable=False)


def _maximum_grad_ref(ctx, dy, a, b, wrt):
    # Ties split the gradient evenly, as PyTorch does.
    a, b = np.broadcast_arrays(a, b)
    mine, other = (a, b) if wrt == 0 else (b, a)
    w = np.where(mine > other, 1.0, np.where(mine == other, 0.5, 0.0)).astype(dy.dtype)
    return dy * w


defop(
    "maximum_grad",
    lambda node, specs, attrs: specs[0],
    _maximum_grad_ref,
    attrs={"wrt": 0},
    num_inputs=3,
    differentiable=False,
)


def _sum_to_infer(node, specs, attrs):
    return TensorSpec(specs[1].shape, specs[0].dtype)


defop(
    "sum_to",
    _sum_to_infer,
    lambda ctx, dy, x: sum_to_shape(dy, x.shape),
    num_inputs=2,
    differentiable=False,
    doc="Sum a broadcast gradient back to the shape of its second input.",
)


# ---- unary -------------------------------------------------------------------
def _unary_infer(op, float_only=True):
    def infer(node, specs, attrs):
        (x,) = specs
        if float_only:
            require_float(x, node, op)
        elif x.dtype == np.bool_ and op in ("neg", "sign", "square"):
            # NumPy has no bool loop for these (square would silently give int8)
            raise DTypeError(f"'{op}' is not defined for bool tensors; cast to a number first", node, op)
        return x

    return infer


def _unary(name, ref, grad, float_only=True, attrs=None):
    defop(name, _unary_infer(name, float_only), ref, grad, attrs=attrs, num_inputs=1)


def _x(g, y):
    return g.tensor(y.node.inputs[0])


def _log_ref(ctx, x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x)


def _sqrt_ref(ctx, x):
    with np.errstate(invalid="ignore"):
        return np.sqrt(x)


def _exp_ref(ctx, x):
    with np.errstate(over="ignore"):
        return np.exp(x)


def _sigmoid_ref(ctx, x):
    # Stable for large |x|: exp of a non-positive number only.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)


def _zero_grad(g, y, dy):
    return [g.zeros_like(_x(g, y))]


_unary("neg", lambda ctx, x: np.negative(x), lambda g, y, dy: [g.neg(dy)], float_only=False)
_unary("exp", _exp_ref, lambda g, y, dy: [g.mul(dy, y)])
_unary("log", _log_ref, lambda g, y, dy: [g.div(dy, _x(g, y))])
_unary("sqrt", _sqrt_ref, lambda g, y, dy: [g.div(dy, g.mul(y, 2.0))])
_unary("square", lambda ctx, x: np.square(x), lambda g, y, dy: [g.mul(dy, g.mul(_x(g, y), 2.0))], float_only=False)
_unary("abs", lambda ctx, x: np.abs(x), lambda g, y, dy: [g.mul(dy, g.sign(_x(g, y)))], float_only=False)
_unary("sign", lambda ctx, x: np.sign(x), _zero_grad, float_only=False)
_unary("step", lambda ctx, x: (x > 0).astype(x.dtype), _zero_grad, float_only=False)
_unary("sin", lambda ctx, x: np.sin(x), lambda g, y, dy: [g.mul(dy, g.cos(_x(g, y)))])
_unary("cos", lambda ctx, x: np.cos(x), lambda g, y, dy: [g.neg(g.mul(dy, g.sin(_x(g, y))))])
_unary("sigmoid", _sigmoid_ref, lambda g, y, dy: [g.sigmoid_grad(dy, y)])
_unary("tanh", lambda ctx, x: np.tanh(x), lambda g, y, dy: [g.tanh_grad(dy, y)])
_unary("relu", lambda ctx, x: np.maximum(x, 0).astype(x.dtype), lambda g, y, dy: [g.relu_grad(dy, y)])
_unary(
    "leaky_relu",
    lambda ctx, x, alpha: np.where(x > 0, x, x * np.asarray(alpha, x.dtype)),
    lambda g, y, dy: [g.leaky_relu_grad(dy, _x(g, y), alpha=y.node.attrs["alpha"])],
    attrs={"alpha": 0.2},
)


def _grad_op(name, ref, attrs=None):
    defop(name, lambda node, specs, attrs: specs[0], ref, attrs=attrs, num_inputs=2, differentiable=False)


_grad_op("sigmoid_grad", lambda ctx, dy, y: dy * y * (1 - y))
_grad_op("tanh_grad", lambda ctx, dy, y: dy * (1 - y * y))
_grad_op("relu_grad", lambda ctx, dy, y: np.where(y > 0, dy, 0).astype(dy.dtype))
_grad_op(
    "leaky_relu_grad",
    lambda ctx, dy, x, alpha: np.where(x > 0, dy, dy * np.asarray(alpha, dy.dtype)),
    attrs={"alpha": 0.2},
)


# ---- cast --------------------------------------------------------------------
def _cast_infer(node, specs, attrs):
    return TensorSpec(specs[0].shape, dtypes.as_dtype(attrs["dtype"], node))


def _cast_grad(g, y, dy):
    x = _x(g, y)  # a float -> float cast passes the gradient back in x's dtype; to or from an integer, none
    return [g.cast(dy, dtype=str(x.dtype)) if dtypes.is_float(x.dtype) and dtypes.is_float(y.dtype) else None]


defop("cast", _cast_infer, lambda ctx, x, dtype: np.asarray(x).astype(dtype), _cast_grad, attrs={"dtype": "float32"},
      num_inputs=1, doc="x as another dtype (float to int truncates toward zero, as NumPy's astype).")
