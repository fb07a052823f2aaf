"""Losses (Keras semantics: mean over the batch) and L1/L2 penalties.

Each loss takes ``(prediction, target)`` and returns a scalar; targets get no
gradient. Cross-entropies on probabilities clip to [1e-7, 1 - 1e-7] like Keras;
with ``from_logits=True`` they are computed stably from logits (the fused path the
Keras API lowers softmax + cross-entropy to).
"""
from __future__ import annotations

import numpy as np

from graph.errors import DTypeError, GraphError, ShapeError
from graph.ops._util import defop, fmt_shape, require_float
from graph.ops.nn import log_softmax_ref, softmax_ref
from graph.registry import TensorSpec

EPSILON = 1e-7


def _scalar(spec):
    return TensorSpec((), spec.dtype)


def _rows(x):
    """Number of examples a cross-entropy averages over: all axes but the last."""
    return max(x.size // x.shape[-1], 1) if x.ndim else 1


def _check_same_shape(op):
    def infer(node, specs, attrs):
        p, t = specs
        require_float(p, node, op, "prediction")
        require_float(t, node, op, "target")
        if p.dtype != t.dtype:
            raise DTypeError(f"prediction is {p.dtype} but target is {t.dtype}; cast the target", node, op)
        if len(p.shape) != len(t.shape) or any(
            a is not None and b is not None and a != b for a, b in zip(p.shape, t.shape)
        ):
            raise ShapeError(
                f"prediction shape {fmt_shape(p.shape)} and target shape {fmt_shape(t.shape)} differ", node, op
            )
        return _scalar(p)

    return infer


def _sparse_infer(node, specs, attrs):
    p, t = specs
    op = "sparse_categorical_crossentropy"
    require_float(p, node, op, "prediction")
    if t.dtype.kind not in "iu":
        raise DTypeError(f"labels must be integers, got {t.dtype}", node, op)
    want = p.shape[:-1]
    got = t.shape[:-1] if len(t.shape) == len(p.shape) and t.shape[-1] == 1 else t.shape
    if len(got) != len(want) or any(a is not None and b is not None and a != b for a, b in zip(got, want)):
        raise ShapeError(
            f"labels of shape {fmt_shape(t.shape)} do not match predictions {fmt_shape(p.shape)}; "
            f"expected {fmt_shape(want)}",
            node,
            op,
        )
    return _scalar(p)


def _loss_grad(name):
    def grad(g, y, dy):
        p, t = (g.tensor(n) for n in y.node.inputs)
        return [g.op(name + "_grad", [dy, p, t], **y.node.attrs), None]

    return grad


def _defloss(name, infer, ref, grad_ref, attrs=None):
    defop(name, infer, ref, _loss_grad(name), attrs=attrs, num_inputs=2)
    defop(
        name + "_grad",
        lambda node, specs, attrs: specs[1],
        grad_ref,
        attrs=attrs,
        num_inputs=3,
        differentiable=False,
    )


def _cast(v, like):
    return np.asarray(v, dtype=like.dtype)


# ---- regression ----------------------------------------------------------------------
_defloss(
    "mse",
    _check_same_shape("mse"),
    lambda ctx, p, t: _cast(np.mean(np.square(p - t)), p),
    lambda ctx, dl, p, t: (p - t) * (dl * _cast(2.0 / max(p.size, 1), p)),
)
_defloss(
    "mae",
    _check_same_shape("mae"),
    lambda ctx, p, t: _cast(np.mean(np.abs(p - t)), p),
    lambda ctx, dl, p, t: np.sign(p - t) * (dl * _cast(1.0 / max(p.size, 1), p)),
)


# ---- binary cross-entropy ------------------------------------------------------------------
def _bce_ref(ctx, p, t, from_logits):
    if from_logits:
        loss = np.maximum(p, 0) - p * t + np.log1p(np.exp(-np.abs(p)))
    else:
        q = np.clip(p, EPSILON, 1 - EPSILON)
        loss = -(t * np.log(q) + (1 - t) * np.log(1 - q))
    return _cast(np.mean(loss), p)


def _bce_grad_ref(ctx, dl, p, t, from_logits):
    scale = dl * _cast(1.0 / max(p.size, 1), p)
    if from_logits:
        e = np.exp(-np.abs(p))
        sig = np.where(p >= 0, 1 / (1 + e), e / (1 + e))
        return ((sig - t) * scale).astype(p.dtype)
    inside = (p > EPSILON) & (p < 1 - EPSILON)
    q = np.clip(p, EPSILON, 1 - EPSILON)
    return (np.where(inside, (q - t) / (q * (1 - q)), 0) * scale).astype(p.dtype)


_defloss("binary_crossentropy", _check_same_shape("binary_crossentropy"), _bce_ref, _bce_grad_ref, {"from_logits": False})


# ---- categorical cross-entropy ----------------------------------------------------------------
def _cce_ref(ctx, p, t, from_logits):
    if from_logits:
        return _cast(-np.sum(t * log_softmax_ref(ctx, p)) / _rows(p), p)
    q = np.clip(p / np.sum(p, axis=-1, keepdims=True), EPSILON, 1 - EPSILON)
    return _cast(-np.sum(t * np.log(q)) / _rows(p), p)


def _cce_grad_ref(ctx, dl, p, t, from_logits):
    scale = dl * _cast(1.0 / _rows(p), p)
    if from_logits:
        return ((softmax_ref(ctx, p) * np.sum(t, axis=-1, keepdims=True) - t) * scale).astype(p.dtype)
    # Through Keras's normalisation q = p / sum(p) and the clip.
    s = np.sum(p, axis=-1, keepdims=True)
    q = p / s
    inside = (q > EPSILON) & (q < 1 - EPSILON)
    gq = np.where(inside, -t / np.clip(q, EPSILON, 1 - EPSILON), 0)
    return ((gq - np.sum(gq * q, axis=-1, keepdims=True)) / s * scale).astype(p.dtype)


_defloss(
    "categorical_crossentropy",
    _check_same_shape("categorical_crossentropy"),
    _cce_ref,
    _cce_grad_ref,
    {"from_logits": False},
)


def one_hot(labels, p):
    labels = labels.reshape(p.shape[:-1]).astype(np.int64)
    k = p.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        bad = labels[(labels < 0) | (labels >= k)].flat[0]
        raise ValueError(f"label {bad} is out of range for {k} classes")
    t = np.zeros(p.shape, p.dtype)
    np.put_along_axis(t, labels[..., None], 1, axis=-1)
    return t


_defloss(
    "sparse_categorical_crossentropy",
    _sparse_infer,
    lambda ctx, p, t, from_logits: _cce_ref(ctx, p, one_hot(t, p), from_logits),
    lambda ctx, dl, p, t, from_logits: _cce_grad_ref(ctx, dl, p, one_hot(t, p), from_logits),
    {"from_logits": False},
)


# ---- penalties -------------------------------------------------------------------------------------
def _penalty_infer(op):
    def infer(node, specs, attrs):
        require_float(specs[0], node, op)
        if float(attrs["l"]) < 0:
            raise GraphError(f"penalty factor l must be >= 0, got {attrs['l']}", node, op)
        return _scalar(specs[0])

    return infer


defop(
    "l1_penalty",
    _penalty_infer("l1_penalty"),
    lambda ctx, w, l: _cast(l * np.sum(np.abs(w)), w),
    lambda g, y, dy: [g.mul(g.sign(g.tensor(y.node.inputs[0])), g.mul(dy, float(y.node.attrs["l"])))],
    attrs={"l": 0.01},
    num_inputs=1,
)
defop(
    "l2_penalty",
    _penalty_infer("l2_penalty"),
    lambda ctx, w, l: _cast(l * np.sum(np.square(w)), w),
    lambda g, y, dy: [g.mul(g.tensor(y.node.inputs[0]), g.mul(dy, 2.0 * float(y.node.attrs["l"])))],
    attrs={"l": 0.01},
    num_inputs=1,
)
