"""The eager API (``import pstrain as pt``, pstrain/eager.py): tensors and variables,
dtype inference, every op against NumPy and PyTorch, GradientTape against PyTorch
autograd and central differences, and pt.function against eager."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import pstrain as pt
from graph import DTypeError, GraphError, ShapeError


def _np(t):
    return t.numpy() if isinstance(t, pt.Tensor) else np.asarray(t)


# ---- the front door --------------------------------------------------------------------------------------
def test_importing_pstrain_loads_nothing_until_the_eager_api_is_used():
    code = ("import sys, pstrain; "
            "assert 'pstrain.eager' not in sys.modules and 'graph' not in sys.modules, sorted(sys.modules); "
            "import pstrain as pt; pt.constant(1.0); assert 'pstrain.eager' in sys.modules; "
            "assert not any(m.split('.')[0] in ('client', 'master', 'worker', 'psserver', 'grpc', 'numba') "
            "for m in sys.modules), sorted(m for m in sys.modules if m.split('.')[0] in ('client', 'grpc', 'numba'))")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="module 'pstrain' has no attribute 'nope'"):
        pt.nope  # noqa: B018


# ---- tensors, variables, dtypes -------------------------------------------------------------------------
@pytest.mark.parametrize("value, dtype", [
    (1, pt.int32), (2.5, pt.float32), ([1, 2.5], pt.float32), ([[1, 2], [3, 4]], pt.int32), (True, pt.bool_),
    (np.arange(3, dtype=np.float64), pt.float64), (np.int64(7), pt.int64), (2**40, pt.int64),
])
def test_constant_infers_dtypes_as_tensorflow_does(value, dtype):
    t = pt.constant(value)
    assert t.dtype == dtype and t.shape == np.shape(value)
    np.testing.assert_array_equal(t.numpy(), np.asarray(value).astype(dtype))


def test_constant_with_a_dtype_and_string_dtypes():
    assert pt.constant([1, 2], dtype="float64").dtype == pt.float64
    assert pt.constant(3, dtype=pt.float32).numpy() == np.float32(3)
    assert pt.constant(1.0).shape == () and pt.constant([[1.0]]).shape == (1, 1)


@pytest.mark.parametrize("value", ["3", ["1", 2], [[1, "x"]], b"7"])
def test_strings_are_not_tensors(value):
    with pytest.raises(TypeError, match="strings are not numbers"):
        pt.constant(value)


def test_tensors_are_immutable_and_numpy_gives_a_copy():
    t = pt.constant([1.0, 2.0])
    a = t.numpy()
    a[0] = 9
    assert t.numpy()[0] == 1.0
    assert not hasattr(t, "assign")


def test_variable_assign_add_sub_and_a_wrong_shape_leaves_it_unchanged():
    v = pt.Variable([1.0, 2.0], name="v")
    assert v.trainable and v.name == "v" and v.dtype == pt.float32
    v.assign([3.0, 4.0])
    v.assign_add([1.0, 1.0])
    v.assign_sub(pt.constant([0.5, 0.5]))
    np.testing.assert_array_equal(v.numpy(), [3.5, 4.5])
    with pytest.raises(ValueError, match=r"assign: variable 'v' has shape \(2,\); the value has shape \(3,\)"):
        v.assign([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(v.numpy(), [3.5, 4.5])
    i = pt.Variable([1, 2])
    with pytest.raises(DTypeError, match="cannot assign a float32 value"):
        i.assign([0.5, 1.5])
    np.testing.assert_array_equal(i.numpy(), [1, 2])


# ---- ops -------------------------------------------------------------------------------------------------
A = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.5]], np.float32)
B = np.array([[2.0, 1.0, -1.0], [3.0, 0.25, 2.0]], np.float32)
POS = np.abs(A) + 0.5

UNARY = [
    ("exp", np.exp, A), ("log", np.log, POS), ("sqrt", np.sqrt, POS), ("square", np.square, A), ("abs", np.abs, A),
    ("sin", np.sin, A), ("cos", np.cos, A), ("tanh", np.tanh, A), ("relu", lambda x: np.maximum(x, 0), A),
    ("sigmoid", lambda x: 1 / (1 + np.exp(-x)), A),
]


@pytest.mark.parametrize("name, ref, x", UNARY, ids=[u[0] for u in UNARY])
def test_unary_ops_match_numpy(name, ref, x):
    out = getattr(pt, name)(pt.constant(x))
    assert out.dtype == pt.float32
    np.testing.assert_allclose(out.numpy(), ref(x), rtol=1e-6)


def test_operators_broadcast_like_numpy_and_take_python_scalars_weakly():
    a, b = pt.constant(A), pt.constant(B)
    for got, want in [(a + b, A + B), (a - b, A - B), (a * b, A * B), (a / b, A / B), (-a, -A),
                      (a + 1, A + 1), (2.0 * a, 2 * A), (1 - a, 1 - A), (a / 2, A / 2), (a ** 2, A ** 2),
                      (2.0 ** a, 2.0 ** A), (a + pt.constant([1.0, 2.0, 3.0]), A + [1, 2, 3]),
                      (a @ pt.transpose(b), A @ B.T), (pt.add(a, b), A + B), (pt.subtract(a, b), A - B),
                      (pt.multiply(a, b), A * B), (pt.divide(a, b), A / B)]:
        assert got.dtype == pt.float32, got
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert (pt.constant([1, 2]) + 1).dtype == pt.int32
    assert (pt.constant([1, 2]) / 2).dtype == pt.float64  # true division of integers, as NumPy and TF


def test_division_by_zero_gives_inf():
    np.testing.assert_array_equal((pt.constant([1.0, -1.0]) / 0.0).numpy(), [np.inf, -np.inf])


def test_array_ops():
    x = pt.constant(np.arange(6, dtype=np.float32))
    assert pt.reshape(x, (2, 3)).shape == (2, 3) and pt.reshape(x, [-1, 2]).shape == (3, 2)
    assert pt.expand_dims(x, 0).shape == (1, 6)
    np.testing.assert_array_equal(pt.transpose(pt.reshape(x, (2, 3))).numpy(), np.arange(6).reshape(2, 3).T)
    np.testing.assert_array_equal(pt.transpose(pt.reshape(x, (1, 2, 3)), perm=[2, 0, 1]).shape, (3, 1, 2))
    m = pt.constant(A)
    np.testing.assert_allclose(pt.reduce_sum(m).numpy(), A.sum(), rtol=1e-6)
    np.testing.assert_allclose(pt.reduce_mean(m, axis=0).numpy(), A.mean(0), rtol=1e-6)
    np.testing.assert_array_equal(pt.reduce_max(m, axis=1, keepdims=True).numpy(), A.max(1, keepdims=True))
    np.testing.assert_allclose(pt.softmax(m).numpy(), torch.softmax(torch.tensor(A), -1).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(pt.cast(m, pt.int32).numpy(), A.astype(np.int32))
    assert pt.cast(m, "float64").dtype == pt.float64
    np.testing.assert_array_equal(pt.concat([m, pt.constant(B)], axis=0).numpy(), np.concatenate([A, B]))
    np.testing.assert_array_equal(pt.concat([m, pt.constant(B)], axis=1).numpy(), np.concatenate([A, B], 1))


def test_linalg():
    m = np.array([[4.0, 1.0], [2.0, 3.0]], np.float32)
    np.testing.assert_allclose(pt.linalg.inv(pt.constant(m)).numpy(), np.linalg.inv(m), rtol=1e-6)
    np.testing.assert_allclose(pt.linalg.det(pt.constant(m)).numpy(), 10.0, rtol=1e-6)
    np.testing.assert_allclose(pt.linalg.matmul(pt.constant(m), pt.constant(m)).numpy(), m @ m)
    with pytest.raises(GraphError, match="the 2x2 matrix is singular: it has no inverse"):
        pt.linalg.inv(pt.constant([[1.0, 2.0], [2.0, 4.0]]))


def test_errors_name_what_was_wrong_as_the_graph_builder_does():
    with pytest.raises(ShapeError, match="6 elements into 4"):
        pt.reshape(pt.constant(np.zeros(6, np.float32)), (2, 2))
    with pytest.raises(ShapeError, match="inner dimensions differ"):
        pt.constant(A) @ pt.constant(A)
    with pytest.raises(ShapeError):
        pt.constant([1.0, 2.0]) + pt.constant([1.0, 2.0, 3.0])
    with pytest.raises(DTypeError, match="must be a float tensor"):
        pt.exp(pt.constant([1, 2]))


# ---- GradientTape ----------------------------------------------------------------------------------------
COMPOSITES = {  # name: (with pt, with torch), each of (x, w, b)
    "mlp": (lambda x, w, b: pt.reduce_mean(pt.square(pt.tanh(x @ w + b) - 0.5)),
            lambda x, w, b: torch.mean(torch.square(torch.tanh(x @ w + b) - 0.5))),
    "trig": (lambda x, w, b: pt.reduce_sum(pt.sin(x) @ pt.cos(w) * b),
             lambda x, w, b: torch.sum(torch.sin(x) @ torch.cos(w) * b)),
    "div_pow_exp": (lambda x, w, b: pt.reduce_sum((pt.exp(x / 3.0) ** 2.0) @ w / (pt.abs(b) + 1.0)),
                    lambda x, w, b: torch.sum((torch.exp(x / 3.0) ** 2.0) @ w / (torch.abs(b) + 1.0))),
    "softmax_log": (lambda x, w, b: -pt.reduce_sum(pt.log(pt.softmax(x @ w + b)) * pt.relu(x @ w)),
                    lambda x, w, b: -torch.sum(torch.log(torch.softmax(x @ w + b, -1)) * torch.relu(x @ w))),
    "concat_transpose": (lambda x, w, b: pt.reduce_max(pt.concat([x @ w, pt.expand_dims(b, 0)], axis=0) ** 3.0, axis=0),
                         lambda x, w, b: torch.amax(torch.cat([x @ w, b[None]], 0) ** 3.0, 0)),
}


@pytest.mark.parametrize("name", COMPOSITES)
def test_tape_gradients_match_torch_autograd(name):
    with_pt, with_torch = COMPOSITES[name]
    rng = np.random.default_rng(len(name))
    values = [rng.normal(size=(4, 3)), rng.normal(size=(3, 2)), rng.normal(size=(2,))]
    variables = [pt.Variable(v, dtype="float64") for v in values]
    with pt.GradientTape() as tape:
        y = with_pt(*variables)
    got = tape.gradient(y, variables)
    ts = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    out = with_torch(*ts)
    np.testing.assert_allclose(y.numpy(), out.detach().numpy(), rtol=1e-10)
    out.sum().backward()
    for g_, t in zip(got, ts):
        np.testing.assert_allclose(g_.numpy(), t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_tape_gradient_matches_central_differences_through_a_chain():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 3)) + 3 * np.eye(3)

    def f(m):
        return pt.reduce_sum(pt.sqrt(pt.square(pt.linalg.inv(m)) + 1.0)) + pt.linalg.det(m)

    w = pt.Variable(w0, dtype="float64")
    with pt.GradientTape() as tape:
        y = f(w)
    got = tape.gradient(y, w).numpy()
    eps, fd = 1e-6, np.zeros_like(w0)
    for idx in np.ndindex(*w0.shape):
        hi, lo = w0.copy(), w0.copy()
        hi[idx] += eps
        lo[idx] -= eps
        fd[idx] = (float(f(pt.constant(hi))) - float(f(pt.constant(lo)))) / (2 * eps)
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8)


def test_what_gets_a_gradient_and_what_gets_none():
    v = pt.Variable(2.0)
    frozen = pt.Variable(3.0, trainable=False)
    c = pt.constant(4.0)
    unused = pt.Variable(5.0)
    with pt.GradientTape(persistent=True) as tape:
        y = v * frozen * c
    dv, dfrozen, dc, dunused = tape.gradient(y, [v, frozen, c, unused])
    assert float(dv) == 12.0 and dfrozen is None and dc is None and dunused is None
    with pt.GradientTape() as tape:
        tape.watch([c, frozen])
        y = v * frozen * c
    assert [float(g) for g in tape.gradient(y, (c, frozen))] == [6.0, 8.0]


def test_gradients_with_respect_to_an_intermediate_and_structure_kept():
    x = pt.Variable([1.0, 2.0])
    with pt.GradientTape() as tape:
        h = x * 3.0
        y = pt.reduce_sum(pt.square(h))
    dh, dx = tape.gradient(y, (h, x))
    np.testing.assert_allclose(dh.numpy(), [6.0, 12.0])
    np.testing.assert_allclose(dx.numpy(), [18.0, 36.0])


def test_a_non_persistent_tape_gives_one_set_of_gradients():
    x = pt.Variable(3.0)
    with pt.GradientTape() as tape:
        y = x * x
    assert float(tape.gradient(y, x)) == 6.0
    with pytest.raises(RuntimeError, match="non-persistent GradientTape gives one set of gradients"):
        tape.gradient(y, x)
    with pt.GradientTape(persistent=True) as tape:
        y = x * x
        z = y * x
    assert float(tape.gradient(y, x)) == 6.0 and float(tape.gradient(z, x)) == 27.0


def test_ops_outside_the_tape_are_not_recorded_and_values_read_stay_as_read():
    x = pt.Variable(2.0)
    y0 = x * x  # before the tape
    with pt.GradientTape() as tape:
        y = x * x
    x.assign(10.0)  # after the read: the gradient is of what was computed
    assert float(tape.gradient(y, x)) == 4.0
    with pt.GradientTape() as tape:
        z = y0 * 1.0
    assert tape.gradient(z, x) is None


def test_integer_targets_and_sources_get_none():
    i = pt.Variable([1, 2])
    with pt.GradientTape() as tape:
        tape.watch(i)
        y = i * 2
    assert tape.gradient(y, i) is None


# ---- pt.function -----------------------------------------------------------------------------------------
def test_function_traces_once_per_signature_and_returns_what_eager_does():
    w = pt.Variable(np.ones((3, 2), np.float32), name="w")
    calls = []

    @pt.function
    def predict(x):
        calls.append(1)
        return pt.softmax(x @ w + 1.0)

    x4, x7 = pt.constant(np.ones((4, 3), np.float32)), pt.constant(np.full((7, 3), 0.5, np.float32))
    np.testing.assert_allclose(predict(x4).numpy(), pt.softmax(x4 @ w + 1.0).numpy(), rtol=1e-6)
    predict(x7)  # another batch size: the same trace
    assert len(calls) == 1
    predict(pt.constant(np.ones((2, 4, 3), np.float32)))  # another rank: a new trace
    assert len(calls) == 2
    g = predict.graph_for(x4)
    assert [p.shape for p in g.placeholders()] == [(None, 3)]
    assert [v.name for v in g.variables()] == ["w"] and predict.variables_for(x4) == [w]
    w.assign(np.zeros((3, 2), np.float32))  # the graph reads the variable's value at each call
    np.testing.assert_allclose(predict(x4).numpy(), np.full((4, 2), 0.5), rtol=1e-6)


def test_a_function_is_differentiable_under_a_tape():
    w = pt.Variable([[1.0], [2.0]])

    @pt.function
    def loss(x, y):
        return pt.reduce_mean(pt.square(x @ w - y))

    x, y = pt.constant([[1.0, 1.0], [2.0, 0.0]]), pt.constant([[1.0], [0.0]])
    with pt.GradientTape() as tape:
        value = loss(x, y)
    np.testing.assert_allclose(float(value), float(loss(x, y)))
    np.testing.assert_allclose(tape.gradient(value, w).numpy(), [[6.0], [2.0]])


# ---- every eager op and its tape gradient: PyTorch (float64) and central differences -------------------
def _check_eager(fn, torch_fn, inputs, eps=1e-6):
    """fn(*pt variables) against torch_fn(*torch tensors): the value, and the tape's
    gradient of sum(fn) against autograd and against central differences."""
    inputs = [np.asarray(a, np.float64) for a in inputs]
    variables = [pt.Variable(a, dtype="float64") for a in inputs]
    with pt.GradientTape() as tape:
        out = fn(*variables)
    grads = tape.gradient(out, variables)
    ts = [torch.tensor(a, requires_grad=True) for a in inputs]
    want = torch_fn(*ts)
    np.testing.assert_allclose(out.numpy(), want.detach().numpy(), rtol=1e-10, atol=1e-12)
    want.sum().backward()
    for i, (g_, t) in enumerate(zip(grads, ts)):
        np.testing.assert_allclose(g_.numpy(), t.grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=f"input {i} vs torch")
        fd = np.zeros_like(inputs[i])
        for idx in np.ndindex(*inputs[i].shape):
            hi = [a.copy() for a in inputs]
            lo = [a.copy() for a in inputs]
            hi[i][idx] += eps
            lo[i][idx] -= eps
            fd[idx] = (float(np.sum(fn(*map(pt.constant, hi)).numpy())) - float(np.sum(fn(*map(pt.constant, lo)).numpy()))) / (2 * eps)
        np.testing.assert_allclose(g_.numpy(), fd, rtol=1e-5, atol=1e-6, err_msg=f"input {i} vs central differences")


_R = np.random.default_rng(42)
_M = _R.normal(size=(3, 4))
_N = _R.normal(size=(4, 2))
_P = np.abs(_R.normal(size=(3, 4))) + 0.5
_SQ = _R.normal(size=(3, 3)) + 3 * np.eye(3)
EAGER_OPS = {
    "add": (pt.add, torch.add, [_M, _R.normal(size=(4,))]),
    "subtract": (pt.subtract, torch.sub, [_M, _R.normal(size=(3, 1))]),
    "multiply": (pt.multiply, torch.mul, [_M, _P]),
    "divide": (pt.divide, torch.div, [_M, _P]),
    "pow": (pt.pow, torch.pow, [_P, _R.uniform(-1, 2, size=(4,))]),
    "matmul": (pt.matmul, torch.matmul, [_M, _N]),
    "negative": (pt.negative, torch.neg, [_M]),
    "reshape": (lambda x: pt.reshape(x, (6, 2)), lambda x: x.reshape(6, 2), [_M]),
    "expand_dims": (lambda x: pt.expand_dims(x, 1), lambda x: x.unsqueeze(1), [_M]),
    "transpose": (pt.transpose, lambda x: x.T, [_M]),
    "reduce_sum": (lambda x: pt.reduce_sum(x, axis=1), lambda x: x.sum(1), [_M]),
    "reduce_mean": (lambda x: pt.reduce_mean(x, axis=0, keepdims=True), lambda x: x.mean(0, keepdim=True), [_M]),
    "reduce_max": (pt.reduce_max, torch.amax, [_M]),
    "exp": (pt.exp, torch.exp, [_M]),
    "log": (pt.log, torch.log, [_P]),
    "sqrt": (pt.sqrt, torch.sqrt, [_P]),
    "square": (pt.square, torch.square, [_M]),
    "abs": (pt.abs, torch.abs, [_M]),
    "sin": (pt.sin, torch.sin, [_M]),
    "cos": (pt.cos, torch.cos, [_M]),
    "sigmoid": (pt.sigmoid, torch.sigmoid, [_M]),
    "tanh": (pt.tanh, torch.tanh, [_M]),
    "relu": (pt.relu, torch.relu, [_M]),
    "softmax": (pt.softmax, lambda x: torch.softmax(x, -1), [_M]),
    "cast": (lambda x: pt.cast(x, pt.float64), lambda x: x.double(), [_M]),
    "concat": (lambda a, b: pt.concat([a, b], axis=0), lambda a, b: torch.cat([a, b], 0), [_M, _P]),
    "linalg.inv": (pt.linalg.inv, torch.linalg.inv, [_SQ]),
    "linalg.det": (pt.linalg.det, torch.linalg.det, [_SQ]),
}


@pytest.mark.parametrize("name", EAGER_OPS)
def test_every_eager_op_and_its_tape_gradient(name):
    fn, torch_fn, inputs = EAGER_OPS[name]
    _check_eager(fn, torch_fn, inputs)


# ---- the course's TensorFlow examples --------------------------------------------------------------------
def test_course_tensor_declarations_and_dtypes():
    assert pt.constant(42).dtype == pt.int32 and pt.constant(42.0).dtype == pt.float32
    assert pt.constant([[1, 2, 3], [4, 5, 6]]).shape == (2, 3)
    assert pt.constant([1.5, 2], dtype=pt.float64).dtype == pt.float64
    assert pt.Variable(np.zeros((3, 3))).dtype == pt.float64 and pt.cast(pt.constant([1.7]), pt.int64).numpy()[0] == 1


def test_course_reshape_examples_and_the_4x4_error():
    t = pt.constant(np.arange(12.0).reshape(3, 4))
    for shape in ((4, 3), (6, 2), (12, 1)):
        assert pt.reshape(t, shape).shape == shape
        np.testing.assert_array_equal(pt.reshape(t, shape).numpy(), np.arange(12.0).reshape(shape))
    with pytest.raises(ShapeError, match="12 elements into 16"):
        pt.reshape(t, (4, 4))


def test_course_broadcasting_expand_dims_and_matmul_errors():
    np.testing.assert_array_equal((pt.constant(np.ones((3, 3))) + pt.constant([5.0])).numpy(), np.full((3, 3), 6.0))
    assert pt.expand_dims(pt.constant([1.0, 2.0, 3.0]), 0).shape == (1, 3)
    assert pt.expand_dims(pt.constant([1.0, 2.0, 3.0]), 1).shape == (3, 1)
    with pytest.raises(ShapeError, match=r"inner dimensions differ: \(2, 3\) @ \(2, 3\)"):
        pt.matmul(pt.constant(np.ones((2, 3))), pt.constant(np.ones((2, 3))))


def test_course_chain_rule_persistence_and_non_trainable():
    x = pt.Variable(3.0)
    with pt.GradientTape(persistent=True) as tape:
        y = x * x          # dy/dx = 2x = 6
        z = y * y          # dz/dx = 4x^3 = 108 (chain rule through y)
    assert float(tape.gradient(z, x)) == 108.0 and float(tape.gradient(y, x)) == 6.0
    assert float(tape.gradient(z, y)) == 18.0  # dz/dy = 2y
    frozen = pt.Variable(2.0, trainable=False)
    with pt.GradientTape() as tape:
        y = frozen * 3.0
    assert tape.gradient(y, frozen) is None


# ---- values are snapshots ----------------------------------------------------------------------------------
def test_a_tensor_or_variable_of_an_array_is_a_snapshot_and_the_array_stays_writable():
    a = np.zeros(3, np.float32)
    t, v = pt.constant(a), pt.Variable(a)
    a[0] = 5.0  # the caller's array is still theirs
    assert t.numpy()[0] == 0.0 and v.numpy()[0] == 0.0
    v.assign(a)
    a[1] = 7.0
    np.testing.assert_array_equal(v.numpy(), [5.0, 0.0, 0.0])
    view = np.arange(6.0)[::2]  # a strided view: a contiguous copy
    assert pt.constant(view).numpy().tolist() == [0.0, 2.0, 4.0]


# ---- pt.function: a whole training step (tape and assign inside) -------------------------------------------
def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(6, 8), (8,), (8, 3), (3,)]
    ws = [pt.Variable(rng.normal(0, 0.5, s).astype(np.float32), name=f"w{i}") for i, s in enumerate(shapes)]

    def loss_fn(x, y):
        h = pt.tanh(x @ ws[0] + ws[1])
        p = pt.softmax(h @ ws[2] + ws[3])
        return -pt.reduce_mean(pt.reduce_sum(y * pt.log(p), axis=1))

    def step(x, y):
        with pt.GradientTape() as tape:
            loss = loss_fn(x, y)
        for v, g in zip(ws, tape.gradient(loss, ws)):
            v.assign_sub(0.1 * g)
        return loss

    return ws, step


def test_a_training_step_as_a_function_matches_the_eager_step():
    rng = np.random.default_rng(5)
    batches = [(rng.normal(size=(n, 6)).astype(np.float32), np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)])
               for n in (16, 16, 9, 16)]
    eager_ws, eager_step = _mlp()
    fn_ws, fn_step = _mlp()
    traced = pt.function(fn_step)
    for x, y in batches:
        want = eager_step(pt.constant(x), pt.constant(y))
        got = traced(pt.constant(x), pt.constant(y))
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(fn_ws, eager_ws):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert len(traced._cache) == 1  # batch 9 and 16: one trace
    g = traced.graph_for(pt.constant(batches[0][0]), pt.constant(batches[0][1]))
    assert sorted(v.name for v in g.variables()) == ["w0", "w1", "w2", "w3"]


def test_assignments_in_a_function_take_effect_and_later_reads_see_them():
    v = pt.Variable([1.0, 2.0], name="v")
    counter = pt.Variable(0, name="counter", trainable=False)

    @pt.function
    def bump():
        v.assign_add([1.0, 1.0])
        counter.assign_add(1)
        return v * 2.0  # reads the new value

    np.testing.assert_array_equal(bump().numpy(), [4.0, 6.0])
    np.testing.assert_array_equal(bump().numpy(), [6.0, 8.0])
    np.testing.assert_array_equal(v.numpy(), [3.0, 4.0])
    assert int(counter) == 2 and counter.dtype == pt.int32

    @pt.function
    def set_from(x):
        v.assign(x)

    assert set_from(pt.constant([5.0, 6.0], dtype="float64")) is None  # float64 into float32: cast
    np.testing.assert_array_equal(v.numpy(), [5.0, 6.0])
    assert v.dtype == pt.float32


def test_assignment_errors_in_a_function_name_the_variable_and_change_nothing():
    v = pt.Variable([1.0, 2.0, 3.0], name="v")
    other = pt.Variable([0.0], name="other")

    @pt.function
    def wrong_static():
        v.assign([1.0, 2.0])

    with pytest.raises(ValueError, match=r"assign: variable 'v' has shape \(3,\); the value has shape \(2,\)"):
        wrong_static()

    @pt.function
    def from_batch(x):  # x is (?,): only the call can tell
        other.assign_add([1.0])
        v.assign(x)

    from_batch(pt.constant([7.0, 8.0, 9.0]))
    np.testing.assert_array_equal(v.numpy(), [7.0, 8.0, 9.0])
    with pytest.raises(ValueError, match=r"assign: variable 'v' has shape \(3,\); the value has shape \(4,\)"):
        from_batch(pt.constant([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(v.numpy(), [7.0, 8.0, 9.0])
    np.testing.assert_array_equal(other.numpy(), [1.0])  # all or nothing: other's update was not stored either
    i = pt.Variable([1, 2], name="i")

    @pt.function
    def float_into_int():
        i.assign(pt.constant([0.5, 1.5]))

    with pytest.raises(DTypeError, match="variable 'i' is int32; cannot assign a float32 value"):
        float_into_int()


def test_a_tape_inside_a_function_follows_the_eager_rules():
    w, frozen = pt.Variable(3.0, name="w"), pt.Variable(2.0, trainable=False, name="frozen")
    seen = {}

    @pt.function
    def grads(x):
        with pt.GradientTape() as tape:
            y = x * w * frozen
        seen["unwatched"] = tape.gradient(y, [x, w, frozen])
        with pytest.raises(RuntimeError, match="non-persistent GradientTape"):
            tape.gradient(y, w)
        with pt.GradientTape(persistent=True) as tape:
            tape.watch([x, frozen])
            y = x * w * frozen
        return tape.gradient(y, w), tape.gradient(y, x), tape.gradient(y, frozen)

    gw, gx, gf = grads(pt.constant([1.0, 2.0]))
    gx_none, gw_first, gf_none = seen["unwatched"]
    assert gx_none is None and gf_none is None and gw_first is not None
    assert float(gw) == 6.0 and float(gf) == 9.0  # d sum(x*w*f)/dw = f*sum(x); /df = w*sum(x)
    np.testing.assert_array_equal(gx.numpy(), [6.0, 6.0])


def test_a_step_function_under_an_outer_tape_runs_as_eager_code_and_is_recorded():
    ws, step = _mlp(1)
    traced = pt.function(step)
    x = pt.constant(np.ones((4, 6), np.float32))
    y = pt.constant(np.eye(3, dtype=np.float32)[[0, 1, 2, 0]])
    before = ws[0].numpy()
    with pt.GradientTape() as outer:
        loss = traced(x, y)
    assert not np.array_equal(ws[0].numpy(), before)  # the step's assign_sub ran
    assert outer.gradient(loss, ws[3]) is not None


def test_a_function_under_a_tape_differentiates_only_what_a_tape_watches():
    w = pt.Variable(np.ones((3, 1), np.float32), name="w")
    loss = pt.function(lambda x: pt.reduce_sum(pt.square(x @ w)))
    x = pt.constant(np.ones((2, 3), np.float32))
    with pt.GradientTape() as tape:
        value = loss(x)
    np.testing.assert_allclose(tape.gradient(value, w).numpy(), np.full((3, 1), 12.0))
    with pt.GradientTape() as tape:
        tape.watch(x)
        value = loss(x)
    np.testing.assert_allclose(tape.gradient(value, x).numpy(), np.full((2, 3), 6.0))
    assert sorted(wrt for *_, wrt in loss._compiled) == [(0, 1), (1,)]  # x's gradient only when watched


# ---- the tape's compiled backward pass ---------------------------------------------------------------------
def test_the_backward_pass_is_compiled_once_per_tape_shape_and_matches_the_interpreter(monkeypatch):
    from pstrain import eager

    eager._backward_cache().clear()
    ws, _ = _mlp(2)
    rng = np.random.default_rng(3)

    def loss_of(n):
        x = pt.constant(rng.normal(size=(n, 6)).astype(np.float32))
        h = pt.tanh(x @ ws[0] + ws[1])
        return pt.reduce_mean(pt.square(h @ ws[2] + ws[3]))

    for n in (8, 8, 5, 8):
        with pt.GradientTape(persistent=True) as tape:
            loss = loss_of(n)
        got = tape.gradient(loss, ws)
        want = tape._inlined_gradients(loss, ws)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    assert len(eager._backward_cache()) == 2  # batch 8 and batch 5
    monkeypatch.setattr(eager, "_BACKWARD_CACHE_SIZE", 2)
    for n in (3, 4):
        with pt.GradientTape() as tape:
            loss = loss_of(n)
        tape.gradient(loss, ws)
    assert len(eager._backward_cache()) == 2  # least recently used dropped
