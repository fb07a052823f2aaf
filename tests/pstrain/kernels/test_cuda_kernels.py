"""The CUDA backend's kernels against each op's NumPy reference, and its optimizer
updates against the reference backend's.

CI runs these in Numba's CUDA simulator: unless ``PSTRAIN_REAL_GPU=1``, this module
(like ``tests/conftest.py``) sets ``NUMBA_ENABLE_CUDASIM=1`` before numba.cuda is
imported. On a machine with a GPU, run the same tests on the device with::

    PSTRAIN_REAL_GPU=1 pytest -m gpu tests/worker/test_cuda_kernels.py

With ``PSTRAIN_REAL_GPU=1`` every test here carries the ``gpu`` marker, which the
default ``-m 'not gpu'`` deselects, hence the ``-m gpu``. Without a usable
numba.cuda (no GPU, no simulator) the tests skip, saying why.

The simulator runs every GPU thread as a Python thread, so shapes stay small; they
still cross tile and block edges (e.g. (33, 17) @ (17, 9) with 16x16 tiles).
"""
import os
import sys

REAL_GPU = os.environ.get("PSTRAIN_REAL_GPU") == "1"
if not REAL_GPU and "numba.cuda" not in sys.modules:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    if "numba" in sys.modules:  # imported without the variable: make numba read it again
        import numba.core.config

        numba.core.config.reload_config()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from graph.core import Node  # noqa: E402
from graph.registry import RunContext, TensorSpec, get_op  # noqa: E402
from pstrain.kernels import get_backend  # noqa: E402
from pstrain.kernels.cuda import CudaBackend  # noqa: E402
from pstrain.kernels.reference import adam_update, sgd_update  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not cuda.is_available(),
        reason="numba.cuda has no usable GPU; run with NUMBA_ENABLE_CUDASIM=1 (the simulator), "
        "or on a GPU machine with PSTRAIN_REAL_GPU=1 pytest -m gpu",
    ),
    *([pytest.mark.gpu] if REAL_GPU else []),
]

BACKEND = CudaBackend()
DTYPES = [np.float32, np.float64]
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


# ---- helpers ----------------------------------------------------------------------------
def rand(shape, dtype, low=None, high=None, seed=0):
    """Standard normal values, or uniform in [low, high)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) if low is None else rng.uniform(low, high, shape)
    return np.asarray(x, dtype)


def nonzero(shape, dtype, seed=0):
    """Values of either sign with |x| in [0.5, 2): safe denominators."""
    rng = np.random.default_rng(seed)
    return np.asarray(rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape), dtype)


def assert_close(got, expected):
    """Agreement to the dtype's precision, relative to the result's scale."""
    expected = np.asarray(expected)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    rtol = RTOL[np.dtype(expected.dtype)]
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)


def run_op(op, *inputs, **attrs):
    """Build ``op``'s node as the graph builder would (attrs with defaults, shape and
    dtype inferred), run its CUDA kernel on device copies of ``inputs``, and return
    (kernel result, NumPy reference result)."""
    opdef = get_op(op)
    attrs = {**opdef.attrs, **attrs}
    spec = opdef.infer(op, [TensorSpec(x.shape, x.dtype) for x in inputs], attrs)
    node = Node(op, op, [f"in{i}" for i in range(len(inputs))], attrs, spec.dtype, spec.shape)
    k = BACKEND.kernel(node)
    assert k is not None, f"the CUDA backend has no kernel for {op} with attrs {attrs}"
    ctx = RunContext()
    out = BACKEND.empty(spec.shape, spec.dtype)
    k(ctx, out, *(BACKEND.asarray(x) for x in inputs))
    expected = np.asarray(opdef.reference(ctx, *inputs, **attrs)).astype(spec.dtype)
    return BACKEND.to_host(out), expected


def check_op(op, *inputs, **attrs):
    assert_close(*run_op(op, *inputs, **attrs))


# ---- elementwise --------------------------------------------------------------------------
UNARY = ["neg", "exp", "square", "abs", "sign", "step", "sigmoid", "tanh", "relu", "leaky_relu"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), ()])
@pytest.mark.parametrize("op", UNARY)
def test_unary(op, shape, dtype):
    x = rand(shape, dtype, seed=1)
    if x.ndim:
        x[0, :3] = [0.0, 30.0, -30.0]  # sign/step/relu at 0; sigmoid/tanh saturated
    check_op(op, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["log", "sqrt"])
def test_unary_of_positive_input(op, dtype):
    # The simulator runs Python's math, which raises where the GPU returns NaN.
    check_op(op, rand((5, 7), dtype, 0.01, 3.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_leaky_relu_alpha(dtype):
    check_op("leaky_relu", rand((4, 6), dtype), alpha=0.05)


@pytest.mark.parametrize("op", ["relu", "add"])
def test_elementwise_across_blocks(op):
    # 2 * 300 elements: three 256-thread blocks, the last one partly idle.
    x = rand((2, 300), np.float32)
    check_op(op, *([x] if op == "relu" else [x, rand((300,), np.float32, seed=2)]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "maximum"])
def test_binary(op, dtype):
    a = rand((5, 7), dtype)
    b = nonzero((7,), dtype, seed=2)
    b[0] = a[0, 0]  # a tie for maximum
    check_op(op, a, b)


BROADCASTS = [
    ((5, 7), (5, 7)),
    ((5, 7), (7,)),
    ((5, 7), (5, 1)),
    ((), (5, 7)),
    ((5, 7), ()),
    ((3, 1, 4), (2, 1)),
    ((2, 1, 3, 4), (5, 1, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape,b_shape", BROADCASTS, ids=[f"{a}-{b}" for a, b in BROADCASTS])
def test_broadcasting(a_shape, b_shape, dtype):
    # sub and div are not commutative: a swapped operand or misplaced index shows.
    a, b = rand(a_shape, dtype), nonzero(b_shape, dtype, seed=2)
    check_op("sub", a, b)
    check_op("div", a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["relu_grad", "sigmoid_grad", "tanh_grad", "leaky_relu_grad"])
def test_gradient_helpers(op, dtype):
    dy, x = rand((5, 7), dtype, seed=3), rand((5, 7), dtype, seed=4)
    forward = op.removesuffix("_grad")
    second = x if op == "leaky_relu_grad" else get_op(forward).reference(RunContext(), x, **get_op(forward).attrs)
    check_op(op, dy, second.astype(dtype))


# ---- matmul and the fused dense layer --------------------------------------------------------
MATMULS = [
    # (m, k, n), transpose_a, transpose_b
    ((5, 7, 3), False, False),
    ((5, 7, 3), True, False),
    ((5, 7, 3), False, True),
    ((5, 7, 3), True, True),
    ((33, 17, 9), False, False),
    ((33, 17, 9), True, True),
    ((1, 1, 1), False, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn,ta,tb", MATMULS, ids=[f"{mkn}-ta{ta:d}-tb{tb:d}" for mkn, ta, tb in MATMULS])
def test_matmul(mkn, ta, tb, dtype):
    m, k, n = mkn
    a = rand((k, m) if ta else (m, k), dtype, seed=5)
    b = rand((n, k) if tb else (k, n), dtype, seed=6)
    check_op("matmul", a, b, transpose_a=ta, transpose_b=tb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["linear", "relu", "sigmoid", "tanh"])
def test_fused_dense(act, dtype):
    x, w, b = rand((6, 18), dtype, seed=7), rand((18, 5), dtype, seed=8), rand((5,), dtype, seed=9)
    k = BACKEND.fused("dense", act=act)
    assert k is not None
    out = BACKEND.empty((6, 5), dtype)
    k(RunContext(), out, *(BACKEND.asarray(t) for t in (x, w, b)))

    ctx = RunContext()
    z = get_op("add").reference(ctx, get_op("matmul").reference(ctx, x, w, False, False), b)
    expected = z if act == "linear" else get_op(act).reference(ctx, z)
    assert_close(BACKEND.to_host(out), expected)


# ---- reductions -------------------------------------------------------------------------------
REDUCTIONS = [
    # shape, axis, keepdims: which path of the kernel they take
    ((33, 17), 0, False),  # column sums (the bias gradient): a thread per column
    ((33, 17), -1, False),  # row sums
    ((33, 17), 0, True),
    ((2, 3, 4), [1, 2], False),  # trailing axes, merged into one
    ((5, 1), 1, False),  # a size-1 axis: a copy
    ((20, 30), None, False),  # a total: a shared-memory tree in one block
    ((3, 1500), None, False),  # a long total: split over blocks, then the parts summed
    ((2, 3, 4), [0, 2], False),  # not one run of axes: computed on the host
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["reduce_sum", "reduce_mean"])
@pytest.mark.parametrize("shape,axis,keepdims", REDUCTIONS, ids=[f"{s}-axis{a}-keep{k:d}" for s, a, k in REDUCTIONS])
def test_reduce(op, shape, axis, keepdims, dtype):
    check_op(op, rand(shape, dtype, seed=10), axis=axis, keepdims=keepdims)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_scalar(dtype):
    check_op("reduce_sum", np.asarray(2.5, dtype))


SUM_TOS = [((33, 17), (17,)), ((33, 17), (1, 17)), ((33, 17), (33, 1)), ((5, 7), (5, 7)), ((5, 7), ())]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dy_shape,x_shape", SUM_TOS, ids=[f"{a}-to-{b}" for a, b in SUM_TOS])
def test_sum_to(dy_shape, x_shape, dtype):
    check_op("sum_to", rand(dy_shape, dtype), rand(x_shape, dtype, seed=2))


# ---- softmax and the fused softmax cross-entropy ----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 17), (4, 1), (2, 3, 5)])
def test_softmax(shape, dtype):
    x = rand(shape, dtype, seed=11) * 10
    check_op("softmax", x)


XENT_CASES = [((33, 17), (33,), np.int64), ((8, 3), (8, 1), np.int32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits_shape,labels_shape,label_dtype", XENT_CASES, ids=["int64", "int32-column"])
def test_sparse_crossentropy_from_logits(logits_shape, labels_shape, label_dtype, dtype):
    logits = rand(logits_shape, dtype, seed=12) * 5
    labels = np.random.default_rng(13).integers(0, logits_shape[-1], labels_shape).astype(label_dtype)
    check_op("sparse_categorical_crossentropy", logits, labels, from_logits=True)
    dloss = np.asarray(0.7, dtype)
    check_op("sparse_categorical_crossentropy_grad", dloss, logits, labels, from_logits=True)


# ---- optimizers: a hand-computed step, then trajectories against the reference backend ---------------
def test_sgd_momentum_step_by_hand():
    p, g, v = (BACKEND.asarray(np.asarray(a, np.float32)) for a in ([1.0, 2.0], [0.5, -1.0], [0.2, 0.0]))
    BACKEND.optimizer_kernels()["sgd"](p, g, v, 0.1, 0.9)
    # v = 0.9 * v + g = [0.68, -1.0]; p -= 0.1 * v
    np.testing.assert_allclose(BACKEND.to_host(v), [0.68, -1.0], rtol=1e-6)
    np.testing.assert_allclose(BACKEND.to_host(p), [0.932, 2.1], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("shape", [(5, 7), ()])
def test_sgd_matches_reference(shape, momentum, dtype):
    p, v = rand(shape, dtype, seed=14), np.zeros(shape, dtype)
    dp, dv = BACKEND.asarray(p), BACKEND.asarray(v)
    sgd = BACKEND.optimizer_kernels()["sgd"]
    for step in range(3):
        g = rand(shape, dtype, seed=20 + step)
        sgd_update(p, g, v, 0.1, momentum)
        sgd(dp, BACKEND.asarray(g), dv, 0.1, momentum)
    assert_close(BACKEND.to_host(dp), p)
    assert_close(BACKEND.to_host(dv), v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), ()])
def test_adam_matches_reference(shape, dtype):
    p, m, v = rand(shape, dtype, seed=15), np.zeros(shape, dtype), np.zeros(shape, dtype)
    dp, dm, dv = BACKEND.asarray(p), BACKEND.asarray(m), BACKEND.asarray(v)
    adam = BACKEND.optimizer_kernels()["adam"]
    for t in range(1, 4):
        g = rand(shape, dtype, seed=30 + t)
        adam_update(p, g, m, v, 0.01, 0.9, 0.999, 1e-7, t)
        adam(dp, BACKEND.asarray(g), dm, dv, 0.01, 0.9, 0.999, 1e-7, t)
    for got, want in ((dp, p), (dm, m), (dv, v)):
        assert_close(BACKEND.to_host(got), want)


# ---- the backend around the kernels ---------------------------------------------------------------------
def node(op, shape, dtype=np.float32, **attrs):
    return Node(op, op, ["x"], {**get_op(op).attrs, **attrs}, np.dtype(dtype), shape)


@pytest.mark.parametrize(
    "n",
    [
        node("dropout", (4, 3)),
        node("batch_norm", (4, 3)),
        node("matmul", (2, 4, 3)),  # batched
        node("softmax", (4, 3), axis=0),
        node("sparse_categorical_crossentropy", ()),  # from probabilities
        node("reduce_max", ()),
    ],
    ids=lambda n: f"{n.op}{n.shape}",
)
def test_no_kernel_means_none(n):
    assert BACKEND.kernel(n) is None


def test_fused_only_knows_dense_with_known_activations():
    assert BACKEND.fused("conv") is None
    assert BACKEND.fused("dense", act="softmax") is None
    assert BACKEND.fused("dense") is not None


def test_memory_round_trip():
    x = rand((3, 4), np.float32)
    dev = BACKEND.asarray(x)
    assert BACKEND.asarray(dev) is dev  # device arrays pass through
    np.testing.assert_array_equal(BACKEND.to_host(dev), x)
    assert BACKEND.empty((), np.float64).shape == ()
    np.testing.assert_array_equal(BACKEND.to_host(BACKEND.asarray(x.T)), x.T)  # made contiguous


def test_get_backend_picks_cuda():
    assert get_backend("cuda").name == "cuda"
