"""Every kernel of the Numba CPU backend against the NumPy reference.

Each op kernel ``CpuBackend().kernel(node)`` (one per entry of ``cpu._KERNELS``) and
the fused dense kernel run on random inputs over shapes (broadcasting, one row, odd
sizes) in float32 and float64, and must agree with ``get_op(op).reference``. The
optimizer updates are compared with the reference backend's NumPy rules.
"""
from __future__ import annotations

import numpy as np
import pytest

from graph.core import Node
from graph.registry import RunContext, TensorSpec, get_op
from pstrain.kernels import cpu, reference
from pstrain.kernels.cpu import ACTIVATIONS, CpuBackend

DTYPES = [np.float32, np.float64]
TOL = {
    np.dtype(np.float16): dict(rtol=1e-3, atol=1e-3),
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6),
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-13),
}

BACKEND = CpuBackend()


def tol(dtype) -> dict:
    return TOL[np.dtype(dtype)]


def make_node(op: str, inputs, **attrs) -> Node:
    """A node with the concrete output shape and dtype ``infer`` gives for ``inputs``."""
    opdef = get_op(op)
    full = {**opdef.attrs, **attrs}
    names = [f"in{i}" for i in range(len(inputs))]
    spec = opdef.infer(f"test_{op}", [TensorSpec(np.shape(a), np.asarray(a).dtype) for a in inputs], full)
    return Node(f"test_{op}", op, names, full, np.dtype(spec.dtype), tuple(spec.shape))


def run_both(op: str, inputs, **attrs):
    """(cpu result, reference result) of ``op`` on ``inputs``."""
    node = make_node(op, inputs, **attrs)
    kernel = BACKEND.kernel(node)
    assert kernel is not None
    out = np.empty(node.shape, node.dtype)
    kernel(RunContext(), out, *inputs)
    want = get_op(op).reference(RunContext(), *inputs, **node.attrs)
    return out, np.asarray(want)


def check_op(op: str, inputs, **attrs) -> None:
    got, want = run_both(op, inputs, **attrs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, equal_nan=True, **tol(got.dtype))


def randn(rng, shape, dtype):
    return np.asarray(rng.standard_normal(shape), dtype=dtype)


# ---- coverage ------------------------------------------------------------------------
BINARY = ["add", "sub", "mul", "div", "maximum"]
UNARY_UFUNCS = ["neg", "square", "exp", "tanh", "abs", "sign"]
ACT = ["relu", "sigmoid", "leaky_relu"]
ACT_GRADS = ["relu_grad", "sigmoid_grad", "tanh_grad", "leaky_relu_grad"]
OTHERS = [
    "matmul",
    "sum_to",
    "unreduce",
    "reduce_sum",
    "reduce_mean",
    "softmax",
    "sparse_categorical_crossentropy",
    "sparse_categorical_crossentropy_grad",
]


def test_every_cpu_kernel_op_is_covered():
    # A new entry in _KERNELS needs a test here too.
    assert set(cpu._KERNELS) == set(BINARY + UNARY_UFUNCS + ACT + ACT_GRADS + OTHERS)


# ---- elementwise -----------------------------------------------------------------------
BINARY_SHAPES = [
    ((3, 4), (3, 4)),
    ((1, 7), (1, 7)),
    ((5, 3), (3,)),
    ((3,), (5, 3)),
    ((1, 5), (3, 1)),
    ((2, 3, 5), (3, 1)),
    ((7,), ()),
    ((), ()),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", BINARY_SHAPES, ids=str)
@pytest.mark.parametrize("op", BINARY)
def test_binary(op, shapes, dtype):
    rng = np.random.default_rng(0)
    a, b = (randn(rng, s, dtype) for s in shapes)
    if op == "maximum":
        b = np.where(rng.random(b.shape) < 0.3, 0, b).astype(dtype)  # ties with a broadcast 0
    check_op(op, [a, b])


@pytest.mark.parametrize("dtype", DTYPES)
def test_div_by_zero_gives_inf_and_nan_like_numpy(dtype):
    a = np.array([1.0, -1.0, 0.0, 2.0], dtype)
    b = np.array([0.0, 0.0, 0.0, 4.0], dtype)
    got, want = run_both("div", [a, b])
    np.testing.assert_array_equal(got, want)
    assert np.isposinf(got[0]) and np.isneginf(got[1]) and np.isnan(got[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_dtypes_promote_like_numpy(dtype):
    rng = np.random.default_rng(1)
    a = randn(rng, (3, 4), dtype)
    b = rng.integers(-5, 5, (4,)).astype(np.int32)
    check_op("mul", [a, b])


def test_integer_nodes_fall_back_to_the_reference():
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    got, want = run_both("add", [a, np.int32(3) * np.ones(3, np.int32)])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


UNARY_SHAPES = [(1, 1), (1, 7), (5, 3), (2, 3, 5), (13,), ()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", UNARY_SHAPES, ids=str)
@pytest.mark.parametrize("op", UNARY_UFUNCS + ACT)
def test_unary(op, shape, dtype):
    rng = np.random.default_rng(2)
    x = np.asarray(randn(rng, shape, dtype) * 3)
    if x.size:
        x.flat[0] = 0  # relu/leaky_relu/sign at exactly zero
    check_op(op, [x])


@pytest.mark.parametrize("dtype", DTYPES)
def test_leaky_relu_alpha(dtype):
    x = randn(np.random.default_rng(3), (4, 5), dtype)
    check_op("leaky_relu", [x], alpha=0.05)
    check_op("leaky_relu_grad", [randn(np.random.default_rng(4), (4, 5), dtype), x], alpha=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_propagates_nan_and_clamps_infinities(dtype):
    x = np.array([np.nan, -np.inf, np.inf, -1.0, -0.0, 0.0, 2.5], dtype)
    got, want = run_both("relu", [x])
    np.testing.assert_array_equal(got, np.maximum(x, 0))  # np.maximum semantics
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[0]) and got[1] == 0 and np.isposinf(got[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_is_stable_for_large_inputs(dtype):
    x = np.array([-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0], dtype)
    got, want = run_both("sigmoid", [x])
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 3), (2, 3, 5), (13,)], ids=str)
@pytest.mark.parametrize("op", ACT_GRADS)
def test_activation_grads(op, shape, dtype):
    rng = np.random.default_rng(5)
    dy = randn(rng, shape, dtype)
    if op in ("relu_grad", "leaky_relu_grad"):
        second = randn(rng, shape, dtype)  # y for relu (y > 0 test), x for leaky relu
        second.flat[0] = 0
    elif op == "sigmoid_grad":
        second = rng.random(shape).astype(dtype)
    else:
        second = np.tanh(randn(rng, shape, dtype))
    check_op(op, [dy, second])


# ---- matmul --------------------------------------------------------------------------------
MATMUL_CASES = [
    # (m, k, n)
    (1, 1, 1),
    (1, 5, 3),
    (7, 3, 1),
    (5, 4, 9),
    (13, 17, 11),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("mkn", MATMUL_CASES, ids=str)
def test_matmul(mkn, transpose_a, transpose_b, dtype):
    m, k, n = mkn
    rng = np.random.default_rng(6)
    a = randn(rng, (k, m) if transpose_a else (m, k), dtype)
    b = randn(rng, (n, k) if transpose_b else (k, n), dtype)
    check_op("matmul", [a, b], transpose_a=transpose_a, transpose_b=transpose_b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_matmul_falls_back_to_the_reference(dtype):
    rng = np.random.default_rng(7)
    check_op("matmul", [randn(rng, (2, 3, 4), dtype), randn(rng, (4, 5), dtype)])
    check_op("matmul", [randn(rng, (2, 3, 4), dtype), randn(rng, (2, 5, 4), dtype)], transpose_b=True)


# ---- reductions -------------------------------------------------------------------------------
SUM_TO_CASES = [
    ((5, 3), (3,)),  # the bias gradient: column_sum
    ((1, 3), (3,)),
    ((5, 1), (1,)),
    ((5, 3), (1, 3)),
    ((5, 3), (5, 1)),
    ((5, 3), (5, 3)),  # nothing to sum
    ((2, 3, 4), (3, 1)),  # general fallback: leading axis and a kept-1 axis
    ((2, 3, 4), (4,)),
    ((2, 3, 4), (2, 1, 4)),
    ((7,), ()),
    ((3, 4), ()),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SUM_TO_CASES, ids=str)
def test_sum_to(shapes, dtype):
    dy_shape, x_shape = shapes
    rng = np.random.default_rng(8)
    dy = randn(rng, dy_shape, dtype)
    x = np.zeros(x_shape, dtype)  # only its shape matters
    got, want = run_both("sum_to", [dy, x])
    assert got.shape == x_shape
    np.testing.assert_allclose(got, want.reshape(x_shape), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (13, 5)], ids=str)
def test_column_sum(shape, dtype):
    x = randn(np.random.default_rng(9), shape, dtype)
    out = np.full(shape[1], 123.0, dtype)  # stale contents must be overwritten
    cpu.column_sum(x, out)
    np.testing.assert_allclose(out, x.sum(axis=0), **tol(dtype))


REDUCE_CASES = [
    ((5, 3), None),
    ((5, 3), 0),
    ((5, 3), 1),
    ((5, 3), -1),
    ((1, 7), 0),
    ((2, 3, 5), (0, 2)),
    ((2, 3, 5), (1,)),
    ((13,), 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("case", REDUCE_CASES, ids=str)
@pytest.mark.parametrize("op", ["reduce_sum", "reduce_mean"])
def test_reductions(op, case, keepdims, dtype):
    shape, axis = case
    x = randn(np.random.default_rng(10), shape, dtype)
    check_op(op, [x], axis=axis, keepdims=keepdims)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("case", REDUCE_CASES, ids=str)
def test_unreduce(case, keepdims, mean, dtype):
    """A reduction's gradient broadcast back: the reference's bits exactly."""
    shape, axis = case
    rng = np.random.default_rng(11)
    x = np.zeros(shape, dtype)  # only its shape matters
    dy = np.asarray(get_op("reduce_sum").reference(RunContext(), randn(rng, shape, dtype), axis=axis, keepdims=keepdims))
    got, want = run_both("unreduce", [dy, x], axis=axis, keepdims=keepdims, mean=mean)
    assert got.shape == shape
    np.testing.assert_array_equal(got, want)


# ---- softmax and cross-entropy ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape_axis",
    [((1, 1), -1), ((1, 7), -1), ((5, 3), 1), ((13, 10), -1), ((5, 3), 0), ((2, 3, 4), -1)],
    ids=str,
)
def test_softmax(shape_axis, dtype):
    shape, axis = shape_axis
    x = np.asarray(randn(np.random.default_rng(11), shape, dtype) * 4)
    x.flat[0] = 50  # a large logit: the max must be subtracted
    check_op("softmax", [x], axis=axis)


CE_CASES = [
    # (logits shape, labels shape)
    ((1, 3), (1,)),
    ((7, 10), (7,)),
    ((5, 1), (5,)),
    ((4, 5), (4, 1)),
    ((2, 3, 4), (2, 3)),
]


def ce_inputs(logits_shape, labels_shape, dtype, label_dtype, seed=12):
    rng = np.random.default_rng(seed)
    logits = np.asarray(randn(rng, logits_shape, dtype) * 2)
    labels = rng.integers(0, logits_shape[-1], labels_shape).astype(label_dtype)
    return logits, labels


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", CE_CASES, ids=str)
def test_sparse_ce_from_logits(shapes, dtype, label_dtype):
    logits, labels = ce_inputs(*shapes, dtype, label_dtype)
    check_op("sparse_categorical_crossentropy", [logits, labels], from_logits=True)
    dloss = np.asarray(1.7, dtype)
    check_op("sparse_categorical_crossentropy_grad", [dloss, logits, labels], from_logits=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_ce_on_probabilities_uses_the_reference(dtype):
    logits, labels = ce_inputs((6, 4), (6,), dtype, np.int64)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    check_op("sparse_categorical_crossentropy", [probs.astype(dtype), labels])
    check_op("sparse_categorical_crossentropy_grad", [np.asarray(1.0, dtype), probs.astype(dtype), labels])


@pytest.mark.parametrize("bad", [-1, 4, 100])
@pytest.mark.parametrize("grad", [False, True])
def test_sparse_ce_label_out_of_range_raises(grad, bad):
    logits, labels = ce_inputs((3, 4), (3,), np.float32, np.int64)
    labels[1] = bad
    op = "sparse_categorical_crossentropy" + ("_grad" if grad else "")
    inputs = ([np.asarray(1.0, np.float32)] if grad else []) + [logits, labels]
    node = make_node(op, inputs, from_logits=True)
    out = np.empty(node.shape, node.dtype)
    with pytest.raises(ValueError, match="out of range"):
        BACKEND.kernel(node)(RunContext(), out, *inputs)
    with pytest.raises(ValueError, match="out of range"):  # the reference agrees
        get_op(op).reference(RunContext(), *inputs, **node.attrs)


# ---- fused dense ----------------------------------------------------------------------------------
def dense_reference(x, w, b, act):
    ctx = RunContext()
    y = get_op("add").reference(ctx, get_op("matmul").reference(ctx, x, w, False, False), b)
    return y if act == "linear" else get_op(act).reference(ctx, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("nkm", [(1, 1, 1), (1, 5, 3), (7, 3, 1), (13, 17, 9)], ids=str)
def test_fused_dense(nkm, act, dtype):
    n, k, m = nkm
    rng = np.random.default_rng(13)
    x, w, b = randn(rng, (n, k), dtype), randn(rng, (k, m), dtype), randn(rng, (m,), dtype)
    kernel = BACKEND.fused("dense", act=act)
    out = np.empty((n, m), dtype)
    kernel(RunContext(), out, x, w, b)
    np.testing.assert_allclose(out, dense_reference(x, w, b, act), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_dense_relu_propagates_nan_and_clamps_inf(dtype):
    x = np.ones((2, 2), dtype)
    w = np.ones((2, 3), dtype)
    b = np.array([np.nan, -np.inf, -1.0], dtype)
    out = np.empty((2, 3), dtype)
    BACKEND.fused("dense", act="relu")(RunContext(), out, x, w, b)
    np.testing.assert_array_equal(out, dense_reference(x, w, b, "relu"))
    assert np.isnan(out[:, 0]).all() and (out[:, 1] == 0).all() and (out[:, 2] == 1).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("shape", [(), (1,), (7,), (13, 5), (2, 3, 4)], ids=str)
def test_fused_axpy_has_the_bits_of_mul_then_add_or_sub(shape, negate, dtype):
    rng = np.random.default_rng(14)
    a, b = randn(rng, shape, dtype), randn(rng, shape, dtype)
    c = np.asarray(0.05, dtype)
    out = np.full(shape, 123.0, dtype)  # stale contents must be overwritten
    BACKEND.fused("axpy", negate=negate)(RunContext(), out, a, b, c)
    ctx = RunContext()
    scaled = get_op("mul").reference(ctx, b, c)
    want = get_op("sub" if negate else "add").reference(ctx, a, scaled)
    np.testing.assert_array_equal(out, want)
    strided = randn(rng, (5, 6), dtype)[:, ::2]  # a non-contiguous input
    out = np.empty((5, 3), dtype)
    BACKEND.fused("axpy", negate=negate)(RunContext(), out, strided, strided, c)
    np.testing.assert_array_equal(out, strided - strided * c if negate else strided + strided * c)


def test_fused_returns_none_for_unknown_patterns():
    assert BACKEND.fused("dense", act="softplus") is None
    assert BACKEND.fused("conv", act="relu") is None


# ---- dtypes the Numba kernels do not cover -----------------------------------------------------------
@pytest.mark.parametrize("op", ["relu", "sigmoid"])
def test_float16_nodes_run(op):
    check_op(op, [np.array([-1.0, 0.5, 2.0], np.float16)])


# ---- optimizer updates -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 4)], ids=str)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_update(momentum, shape, dtype):
    rng = np.random.default_rng(14)
    p_cpu = randn(rng, shape, dtype)
    p_ref = p_cpu.copy()
    vshape = shape if momentum else (0,)
    v_cpu, v_ref = np.zeros(vshape, dtype), np.zeros(vshape, dtype)
    for _ in range(4):
        g = randn(rng, shape, dtype)
        cpu.sgd_update(p_cpu, g, v_cpu, 0.05, momentum)
        reference.sgd_update(p_ref, g, v_ref, 0.05, momentum)
    assert p_cpu.dtype == dtype
    np.testing.assert_allclose(p_cpu, p_ref, **tol(dtype))
    np.testing.assert_allclose(v_cpu, v_ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 4)], ids=str)
def test_adam_update(shape, dtype):
    rng = np.random.default_rng(15)
    p_cpu = randn(rng, shape, dtype)
    p_ref = p_cpu.copy()
    state_cpu = [np.zeros(shape, dtype), np.zeros(shape, dtype)]
    state_ref = [np.zeros(shape, dtype), np.zeros(shape, dtype)]
    for t in range(1, 6):
        g = randn(rng, shape, dtype)
        cpu.adam_update(p_cpu, g, *state_cpu, 0.01, 0.9, 0.999, 1e-7, t)
        reference.adam_update(p_ref, g, *state_ref, 0.01, 0.9, 0.999, 1e-7, t)
    assert p_cpu.dtype == dtype
    np.testing.assert_allclose(p_cpu, p_ref, **tol(dtype))
    for a, b in zip(state_cpu, state_ref):
        np.testing.assert_allclose(a, b, **tol(dtype))


def test_backends_expose_their_optimizer_kernels():
    assert BACKEND.optimizer_kernels() == {"sgd": cpu.sgd_update, "adam": cpu.adam_update}
    ref = reference.ReferenceBackend().optimizer_kernels()
    assert ref == {"sgd": reference.sgd_update, "adam": reference.adam_update}
