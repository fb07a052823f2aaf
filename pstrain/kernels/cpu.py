"""The CPU backend: Numba ``@njit`` kernels, writing into preallocated buffers.

Matrix products go to NumPy's BLAS; the loops around them are fused where that saves a pass over memory: matmul + bias +
activation, activation backward, softmax + cross-entropy (forward and backward),
bias gradients and the optimizer updates. Ops without a kernel of their own use
NumPy ufuncs with ``out=`` (no allocation), and anything else falls back to the
NumPy reference.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from graph.ops._util import norm_axes
from pstrain.kernels.reference import ReferenceBackend

# Activation codes for the fused dense kernel.
ACTIVATIONS = {"linear": 0, "relu": 1, "sigmoid": 2, "tanh": 3}


# ---- fused dense -----------------------------------------------------------------
@njit(cache=True)
def _apply_act(v, act):
    if act == 1:
        return v if v > 0 or v != v else 0.0  # NaN propagates, as in np.maximum
    if act == 2:
        if v >= 0:
            return 1.0 / (1.0 + math.exp(-v))
        e = math.exp(v)
        return e / (1.0 + e)
    if act == 3:
        return math.tanh(v)
    return v


@njit(cache=True)
def bias_act(out, b, act):
    """out = act(out + b), in place: the epilogue of a dense layer."""
    n, m = out.shape
    for i in range(n):
        for j in range(m):
            out[i, j] = _apply_act(out[i, j] + b[j], act)


# ---- elementwise ----------------------------------------------------------------------
@njit(cache=True)
def relu(x, out):
    xf, of = x.ravel(), out.ravel()
    for i in range(xf.size):
        of[i] = _apply_act(xf[i], 1)


@njit(cache=True)
def relu_grad(dy, y, out):
    df, yf, of = dy.ravel(), y.ravel(), out.ravel()
    for i in range(df.size):
        of[i] = df[i] if yf[i] > 0 else 0.0


@njit(cache=True)
def sigmoid(x, out):
    xf, of = x.ravel(), out.ravel()
    for i in range(xf.size):
        of[i] = _apply_act(xf[i], 2)


@njit(cache=True)
def sigmoid_grad(dy, y, out):
    df, yf, of = dy.ravel(), y.ravel(), out.ravel()
    for i in range(df.size):
        of[i] = df[i] * yf[i] * (1 - yf[i])


@njit(cache=True)
def tanh_grad(dy, y, out):
    df, yf, of = dy.ravel(), y.ravel(), out.ravel()
    for i in range(df.size):
        of[i] = df[i] * (1 - yf[i] * yf[i])


@njit(cache=True)
def leaky_relu(x, alpha, out):
    xf, of = x.ravel(), out.ravel()
    for i in range(xf.size):
        v = xf[i]
        of[i] = v if v > 0 else v * alpha


@njit(cache=True)
def leaky_relu_grad(dy, x, alpha, out):
    df, xf, of = dy.ravel(), x.ravel(), out.ravel()
    for i in range(df.size):
        of[i] = df[i] if xf[i] > 0 else df[i] * alpha


# ---- reductions ----------------------------------------------------------------------
@njit(cache=True)
def axpy(a, b, alpha, out):
    """out = a + alpha * b, elementwise over same-shaped C-contiguous arrays: one pass
    (a traced ``v - lr * g`` update). Rounds as ``add(a, mul(b, alpha))`` does."""
    af, bf, of = a.ravel(), b.ravel(), out.ravel()
    for i in range(of.size):
        of[i] = af[i] + alpha * bf[i]


@njit(cache=True)
def column_sum(x, out):
    """out[j] = sum_i x[i, j]  (the bias gradient)."""
    out[:] = 0
    n, m = x.shape
    for i in range(n):
        for j in range(m):
            out[j] += x[i, j]


# ---- softmax and cross-entropy ----------------------------------------------------------
@njit(cache=True)
def softmax_rows(x, out):
    n, k = x.shape
    for i in range(n):
        mx = x[i, 0]
        for j in range(1, k):
            mx = max(mx, x[i, j])
        s = 0.0
        for j in range(k):
            e = math.exp(x[i, j] - mx)
            out[i, j] = e
            s += e
        for j in range(k):
            out[i, j] /= s


@njit(cache=True)
def sparse_softmax_ce(logits, labels, out):
    """Mean over rows of -log softmax(logits)[label], into out[0]."""
    n, k = logits.shape
    total = 0.0
    for i in range(n):
        lab = labels[i]
        if lab < 0 or lab >= k:
            raise ValueError("label out of range for the number of classes")
        mx = logits[i, 0]
        for j in range(1, k):
            mx = max(mx, logits[i, j])
        s = 0.0
        for j in range(k):
            s += math.exp(logits[i, j] - mx)
        total += mx + math.log(s) - logits[i, lab]
    out[0] = total / max(n, 1)


@njit(cache=True)
def sparse_softmax_ce_grad(dloss, logits, labels, out):
    """(softmax(logits) - onehot(labels)) * dloss[0] / n."""
    n, k = logits.shape
    scale = dloss[0] / max(n, 1)
    for i in range(n):
        mx = logits[i, 0]
        for j in range(1, k):
            mx = max(mx, logits[i, j])
        s = 0.0
        for j in range(k):
            e = math.exp(logits[i, j] - mx)
            out[i, j] = e
            s += e
        for j in range(k):
            out[i, j] = out[i, j] / s * scale
        lab = labels[i]
        if lab < 0 or lab >= k:
            raise ValueError("label out of range for the number of classes")
        out[i, lab] -= scale


# ---- checks ---------------------------------------------------------------------------
@njit(cache=True, fastmath={"reassoc"})
def _finite_sum(a):
    # x * 0 is 0 for finite x and NaN for NaN/Inf, so the sum is 0 iff all are finite;
    # reassociation (the only fast-math flag) lets the loop vectorize.
    acc = a.dtype.type(0.0)
    for i in range(a.size):
        acc += a[i] * a.dtype.type(0.0)
    return acc


def all_finite(a: np.ndarray) -> bool:
    """True when ``a`` holds no NaN or Inf (one vectorized pass, no temporaries)."""
    if a.dtype not in (np.float32, np.float64):
        return ReferenceBackend.all_finite(a)
    return _finite_sum(np.ascontiguousarray(a).ravel()) == 0.0


# ---- optimizer updates ------------------------------------------------------------------
@njit(cache=True)
def _sgd(param, grad, velocity, lr, momentum):
    p, g, v = param.ravel(), grad.ravel(), velocity.ravel()
    if momentum != 0:
        for i in range(p.size):
            v[i] = momentum * v[i] + g[i]
            p[i] -= lr * v[i]
    else:
        for i in range(p.size):
            p[i] -= lr * g[i]


@njit(cache=True)
def _adam(param, grad, m, v, lr, beta1, beta2, eps, t):
    p, g, mf, vf = param.ravel(), grad.ravel(), m.ravel(), v.ravel()
    c1 = 1.0 - beta1**t
    c2 = 1.0 - beta2**t
    for i in range(p.size):
        mf[i] = beta1 * mf[i] + (1 - beta1) * g[i]
        vf[i] = beta2 * vf[i] + (1 - beta2) * g[i] * g[i]
        p[i] -= lr * (mf[i] / c1) / (math.sqrt(vf[i] / c2) + eps)


def sgd_update(param, grad, velocity, lr, momentum):
    _sgd(param, grad, velocity, param.dtype.type(lr), param.dtype.type(momentum))


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, t):
    f = param.dtype.type
    _adam(param, grad, m, v, f(lr), f(beta1), f(beta2), f(eps), f(t))


# ---- dispatch ----------------------------------------------------------------------------------
def _ufunc(fn):
    return lambda node: (lambda ctx, out, *xs: fn(*xs, out=out))


def _matmul(node):
    ta, tb = node.attrs["transpose_a"], node.attrs["transpose_b"]
    if len(node.shape) != 2:
        return None

    def k(ctx, out, a, b):
        np.matmul(a.T if ta else a, b.T if tb else b, out=out)

    return k


def _div(node):
    def k(ctx, out, a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            np.true_divide(a, b, out=out)

    return k


def _contiguous(fn):
    """Wrap a Numba kernel that needs C-contiguous inputs of the output's dtype."""

    def factory(node):
        def k(ctx, out, *xs):
            fn(*(np.ascontiguousarray(x) for x in xs), out)

        return k

    return factory


def _with_alpha(fn):
    def factory(node):
        alpha = node.attrs["alpha"]

        def k(ctx, out, *xs):
            fn(*xs, out.dtype.type(alpha), out)

        return k

    return factory


def _sum_to(node):
    def k(ctx, out, dy, x):
        if dy.ndim == 2 and out.ndim == 1 and dy.shape[1] == out.shape[0]:
            column_sum(dy, out)
        elif dy.shape == out.shape:
            out[...] = dy
        else:
            lead = dy.ndim - out.ndim
            axes = tuple(range(lead)) + tuple(
                lead + i for i, d in enumerate(out.shape) if d == 1 and dy.shape[lead + i] != 1
            )
            np.sum(dy, axis=axes, out=out.reshape([1] * lead + list(out.shape)), keepdims=True)

    return k


def _reduce(fn):
    def factory(node):
        a = node.attrs
        axis = None if a["axis"] is None else (a["axis"] if isinstance(a["axis"], int) else tuple(a["axis"]))

        def k(ctx, out, x):
            fn(x, axis=axis, keepdims=a["keepdims"], out=out)

        return k

    return factory


def _unreduce(node):
    """A reduction's gradient broadcast back: the reference's copy and division, with
    the shapes worked out once."""
    a = node.attrs
    axes = norm_axes(a["axis"], len(node.shape), node.name, "unreduce")
    kept = tuple(1 if i in axes else d for i, d in enumerate(node.shape))
    count = max(int(np.prod([node.shape[i] for i in axes])) if axes else 1, 1)

    def k(ctx, out, dy, x):
        np.copyto(out, dy.reshape(kept))
        if a["mean"]:
            np.true_divide(out, out.dtype.type(count), out=out)

    return k


def _sparse_ce(grad: bool):
    def factory(node):
        if not node.attrs["from_logits"]:
            return None

        def k(ctx, out, *xs):
            *head, logits, labels = xs
            logits = np.ascontiguousarray(logits.reshape(-1, logits.shape[-1]))
            labels = labels.reshape(-1)
            if grad:
                sparse_softmax_ce_grad(head[0].reshape(1), logits, labels, out.reshape(logits.shape))
            else:
                sparse_softmax_ce(logits, labels, out.reshape(1))

        return k

    return factory


def _softmax(node):
    if len(node.shape) != 2 or node.attrs["axis"] not in (-1, 1):
        return None
    return _contiguous(softmax_rows)(node)


_KERNELS = {
    "add": _ufunc(np.add),
    "sub": _ufunc(np.subtract),
    "mul": _ufunc(np.multiply),
    "div": _div,
    "maximum": _ufunc(np.maximum),
    "neg": _ufunc(np.negative),
    "square": _ufunc(np.square),
    "exp": _ufunc(np.exp),
    "tanh": _ufunc(np.tanh),
    "abs": _ufunc(np.abs),
    "sign": _ufunc(np.sign),
    "matmul": _matmul,
    "relu": _contiguous(relu),
    "relu_grad": _contiguous(relu_grad),
    "sigmoid": _contiguous(sigmoid),
    "sigmoid_grad": _contiguous(sigmoid_grad),
    "tanh_grad": _contiguous(tanh_grad),
    "leaky_relu": _with_alpha(leaky_relu),
    "leaky_relu_grad": _with_alpha(leaky_relu_grad),
    "sum_to": _sum_to,
    "unreduce": _unreduce,
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "softmax": _softmax,
    "sparse_categorical_crossentropy": _sparse_ce(grad=False),
    "sparse_categorical_crossentropy_grad": _sparse_ce(grad=True),
}


class CpuBackend(ReferenceBackend):
    name = "cpu"

    def kernel(self, node):
        if node.dtype not in (np.float32, np.float64):  # Numba kernels: f32/f64 only
            return super().kernel(node)
        factory = _KERNELS.get(node.op)
        k = factory(node) if factory else None
        return k if k is not None else super().kernel(node)

    def fused(self, pattern, **attrs):
        if pattern == "axpy":
            negate = attrs.get("negate", False)

            def k(ctx, out, a, b, c):
                # -(c * b) is exactly -c * b, and a + -(x) exactly a - x: sub(a, mul(b, c))'s bits
                alpha = out.dtype.type(-c if negate else c)
                axpy(np.ascontiguousarray(a), np.ascontiguousarray(b), alpha, out)

            return k
        if pattern != "dense" or attrs.get("act") not in ACTIVATIONS:
            return None
        act = ACTIVATIONS[attrs["act"]]

        def k(ctx, out, x, w, b):
            # NumPy's BLAS for the product: mixing it with SciPy's (which Numba's
            # np.dot calls) makes two OpenBLAS thread pools fight over the cores.
            np.matmul(x, w, out=out)
            bias_act(out, b, act)

        return k

    def optimizer_kernels(self):
        return {"sgd": sgd_update, "adam": adam_update}

    all_finite = staticmethod(all_finite)
