"""Every differentiable op of the graph IR: forward and gradients against PyTorch
(float64, autograd) and gradients against central differences.

Ops with ``differentiable=False`` are the gradient helpers (``relu_grad``, ``sum_to``,
...); they run inside their parent op's gradient here.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graph import Graph, GraphError, RunContext, all_ops, get_op, gradients
from graph.interpret import evaluate
from graph.ops.nn import dropout_mask
from tests.graph.helpers import check_op, rand, random_shapes

COVERED: set[str] = set()  # ops with cases below, registered at import; see the coverage test


def covers(*ops):
    COVERED.update(ops)
    return ops


# ---- binary, broadcasting -------------------------------------------------------------
BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "maximum": torch.maximum}
covers(*BINARY)
BROADCAST = [((3, 4), (4,)), ((3, 1), (1, 4)), ((2, 3, 4), (3, 1)), ((), (3, 4)), ((3, 4), ()), ((2, 3), (2, 3))]


def _random_broadcast_pairs(seed, n):
    rng = np.random.default_rng(seed)
    pairs = []
    for shape in random_shapes(seed, n, max_rank=4):
        other = [1 if rng.random() < 0.3 else d for d in shape]
        other = tuple(other[int(rng.integers(0, len(other) + 1)):])  # drop some leading dims
        pairs.append((shape, other) if rng.random() < 0.5 else (other, shape))
    return pairs


def _binary_inputs(op, sa, sb, seed):
    rng = np.random.default_rng(seed)
    a = rand(rng, sa)
    # div: keep the divisor away from 0, where 1/b blows up
    b = rand(rng, sb, 0.5, 2.0) * rng.choice([-1.0, 1.0], sb) if op == "div" else rand(rng, sb)
    return a, b


@pytest.mark.parametrize("feed", [False, True], ids=["variables", "placeholders"])
@pytest.mark.parametrize("shapes", BROADCAST + _random_broadcast_pairs(7, 6), ids=str)
@pytest.mark.parametrize("op", BINARY)
def test_binary(op, shapes, feed):
    a, b = _binary_inputs(op, *shapes, seed=len(op))
    check_op(lambda g, x, y: g.op(op, [x, y]), BINARY[op], [a, b], feed=feed)


@pytest.mark.parametrize(
    "expr, texpr",
    [
        (lambda x: x * 3.0, lambda x: x * 3.0),
        (lambda x: 2.0 - x, lambda x: 2.0 - x),
        (lambda x: 1.5 / x, lambda x: 1.5 / x),
        (lambda x: x / 4.0 + 1.0, lambda x: x / 4.0 + 1.0),
        (lambda x: -x, lambda x: -x),
        (lambda x: x * x - x, lambda x: x * x - x),  # one input used twice
    ],
    ids=["mul_scalar", "rsub_scalar", "rdiv_scalar", "div_add_scalar", "neg", "reuse"],
)
def test_python_operators(expr, texpr):
    x = rand(np.random.default_rng(1), (3, 4), 0.5, 2.0)
    check_op(lambda g, t: expr(t), texpr, [x])


def test_maximum_ties_split_the_gradient_like_torch():
    a = np.array([[1.0, 2.0, 3.0], [0.5, 2.0, -1.0]])
    b = np.array([1.0, 0.0, 3.0])
    check_op(lambda g, x, y: g.maximum(x, y), torch.maximum, [a, b], fd=False)


# ---- unary ---------------------------------------------------------------------------------
def _away0(rng, s):
    return rand(rng, s, away_from=0.0, gap=0.05)


UNARY = {
    "neg": (lambda g, x: g.neg(x), torch.neg, rand),
    "exp": (lambda g, x: g.exp(x), torch.exp, rand),
    "log": (lambda g, x: g.log(x), torch.log, lambda rng, s: rand(rng, s, 0.1, 3.0)),
    "sqrt": (lambda g, x: g.sqrt(x), torch.sqrt, lambda rng, s: rand(rng, s, 0.1, 3.0)),
    "square": (lambda g, x: g.square(x), torch.square, rand),
    "abs": (lambda g, x: g.abs(x), torch.abs, _away0),
    "sigmoid": (lambda g, x: g.sigmoid(x), torch.sigmoid, lambda rng, s: 4 * rand(rng, s)),
    "tanh": (lambda g, x: g.tanh(x), torch.tanh, rand),
    "relu": (lambda g, x: g.relu(x), torch.relu, _away0),
    "leaky_relu": (lambda g, x: g.leaky_relu(x), lambda x: F.leaky_relu(x, 0.2), _away0),
    "sign": (lambda g, x: g.sign(x), torch.sign, _away0),
    "sin": (lambda g, x: g.sin(x), torch.sin, lambda rng, s: 3 * rand(rng, s)),
    "cos": (lambda g, x: g.cos(x), torch.cos, lambda rng, s: 3 * rand(rng, s)),
}
covers(*UNARY)
UNARY_SHAPES = [(), (5,), (3, 4)] + random_shapes(11, 4)


@pytest.mark.parametrize("shape", UNARY_SHAPES, ids=str)
@pytest.mark.parametrize("op", UNARY)
def test_unary(op, shape):
    build, torch_fn, gen = UNARY[op]
    x = gen(np.random.default_rng(len(op) + len(shape)), shape)
    check_op(build, torch_fn, [x])


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3])
def test_leaky_relu_alpha(alpha):
    x = rand(np.random.default_rng(2), (4, 5), away_from=0.0, gap=0.05)
    check_op(lambda g, t: g.leaky_relu(t, alpha=alpha), lambda t: F.leaky_relu(t, alpha), [x])


covers("step")


@pytest.mark.parametrize("shape", UNARY_SHAPES, ids=str)
def test_step(shape):
    x = rand(np.random.default_rng(3), shape, away_from=0.0, gap=0.05)
    heaviside = lambda t: torch.heaviside(t, torch.zeros((), dtype=t.dtype))  # noqa: E731
    res = check_op(lambda g, t: g.step(t), heaviside, [x], torch_grad=False)
    np.testing.assert_array_equal(res.grads[0], np.zeros_like(x))


def test_step_and_sign_at_zero():
    x = np.array([-1.0, 0.0, 2.0])
    res = check_op(lambda g, t: g.step(t), lambda t: torch.heaviside(t, torch.tensor(0.0, dtype=t.dtype)), [x],
                   torch_grad=False, fd=False)
    np.testing.assert_array_equal(res.out, [0.0, 0.0, 1.0])
    check_op(lambda g, t: g.sign(t), torch.sign, [x], fd=False)


def test_sigmoid_is_stable_for_large_inputs():
    x = np.array([-800.0, -40.0, 0.0, 40.0, 800.0])
    check_op(lambda g, t: g.sigmoid(t), torch.sigmoid, [x], fd=False)


# ---- matmul --------------------------------------------------------------------------------
def _t(x, flag):
    return x.transpose(-1, -2) if flag else x


covers("matmul")


@pytest.mark.parametrize("ta, tb", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize(
    "sa, sb",
    [((3, 4), (4, 2)), ((2, 3, 4), (2, 4, 5)), ((2, 3, 4), (4, 5)), ((3, 4), (2, 4, 5)), ((2, 1, 3, 4), (3, 4, 2))],
    ids=str,
)
def test_matmul(sa, sb, ta, tb):
    rng = np.random.default_rng(4)
    # Shapes are given untransposed; store the transposed array when the flag says so.
    a = rand(rng, sa)
    b = rand(rng, sb)
    a = np.swapaxes(a, -1, -2).copy() if ta else a
    b = np.swapaxes(b, -1, -2).copy() if tb else b
    check_op(
        lambda g, x, y: g.matmul(x, y, transpose_a=ta, transpose_b=tb),
        lambda x, y: torch.matmul(_t(x, ta), _t(y, tb)),
        [a, b],
    )


# ---- reshape family -------------------------------------------------------------------------


covers("reshape")


@pytest.mark.parametrize(
    "shape, target",
    [((2, 3, 4), (6, 4)), ((2, 3, 4), (-1,)), ((2, 3, 4), (4, -1)), ((2, 3, 4), (2, -1, 2)), ((), (1, 1)),
     ((1,), ()), ((6,), (3, 2))],
    ids=str,
)
def test_reshape(shape, target):
    x = rand(np.random.default_rng(5), shape)
    check_op(lambda g, t: g.reshape(t, shape=target), lambda t: torch.reshape(t, target), [x])


covers("expand_dims")


@pytest.mark.parametrize("shape, axis", [((3,), 0), ((3,), 1), ((3,), -1), ((2, 3), 1), ((2, 3), -2), ((), 0)], ids=str)
def test_expand_dims(shape, axis):
    x = rand(np.random.default_rng(6), shape)
    check_op(lambda g, t: g.expand_dims(t, axis=axis), lambda t: torch.unsqueeze(t, axis), [x])


covers("transpose")


@pytest.mark.parametrize(
    "shape, perm",
    [((3, 4), None), ((2, 3, 4), None), ((2, 3, 4), (1, 0, 2)), ((2, 3, 4), (2, 0, 1)), ((2, 3, 4), (-1, 0, 1)),
     ((2, 3, 4, 5), (3, 1, 0, 2)), ((5,), None)],
    ids=str,
)
def test_transpose(shape, perm):
    x = rand(np.random.default_rng(7), shape)
    tperm = tuple(reversed(range(len(shape)))) if perm is None else perm
    attrs = {} if perm is None else {"perm": perm}
    check_op(lambda g, t: g.transpose(t, **attrs), lambda t: t.permute(*tperm), [x])


# ---- reductions ---------------------------------------------------------------------------------
REDUCE = dict(zip(covers("reduce_sum", "reduce_mean", "reduce_max"), (torch.sum, torch.mean, torch.amax)))


def _torch_reduce(fn, axis, keepdims, ndim):
    dims = tuple(range(ndim)) if axis is None else (axis,) if isinstance(axis, int) else tuple(axis)
    if not dims:  # rank 0: nothing to reduce
        return lambda t: t
    return lambda t: fn(t, dim=dims, keepdim=keepdims)


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize(
    "shape, axis",
    [((2, 3, 4), None), ((2, 3, 4), 0), ((2, 3, 4), 1), ((2, 3, 4), -1), ((2, 3, 4), [0, 2]), ((2, 3, 4), (-1, 0)),
     ((2, 3, 4), [0, 1, 2]), ((5,), 0), ((), None)] + [(s, None) for s in random_shapes(13, 3)],
    ids=str,
)
@pytest.mark.parametrize("op", REDUCE)
def test_reduce(op, shape, axis, keepdims):
    x = rand(np.random.default_rng(8), shape)
    check_op(
        lambda g, t: g.op(op, [t], axis=axis, keepdims=keepdims),
        _torch_reduce(REDUCE[op], axis, keepdims, len(shape)),
        [x],
    )


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_reduce_max_ties_share_the_gradient_like_amax(axis):
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, -1.0]])
    check_op(lambda g, t: g.reduce_max(t, axis=axis), _torch_reduce(torch.amax, axis, False, 2), [x], fd=False)


# ---- softmax ------------------------------------------------------------------------------------------

covers("softmax", "log_softmax")


@pytest.mark.parametrize(
    "shape, axis", [((3, 4), -1), ((3, 4), 0), ((2, 3, 4), 1), ((2, 3, 4), -1), ((2, 3, 4), 0), ((5,), 0)], ids=str
)
@pytest.mark.parametrize("op, torch_fn", [("softmax", torch.softmax), ("log_softmax", torch.log_softmax)])
def test_softmax(op, torch_fn, shape, axis):
    x = 3 * rand(np.random.default_rng(9), shape)
    check_op(lambda g, t: g.op(op, [t], axis=axis), lambda t: torch_fn(t, axis), [x])


@pytest.mark.parametrize("op, torch_fn", [("softmax", torch.softmax), ("log_softmax", torch.log_softmax)])
def test_softmax_is_stable_for_large_logits(op, torch_fn):
    x = np.array([[1000.0, 0.0, -1000.0], [-500.0, -501.0, -502.0]])
    check_op(lambda g, t: g.op(op, [t]), lambda t: torch_fn(t, -1), [x], fd=False)


# ---- dropout -------------------------------------------------------------------------------------------


covers("dropout")


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("step", [0, 3])
def test_dropout_training_matches_torch_with_the_same_mask(rate, step):
    x = rand(np.random.default_rng(10), (4, 6))
    mask = dropout_mask(x.shape, x.dtype, rate, seed=5, step=step)
    res = check_op(
        lambda g, t: g.dropout(t, rate=rate, seed=5),
        lambda t: t * torch.tensor(mask),
        [x],
        ctx=RunContext(training=True, step=step),
    )
    # the backward pass uses the forward's mask: d out / d x = mask
    np.testing.assert_allclose(res.grads[0], mask * res.cotangent)
    assert set(np.unique(mask)) <= {0.0, 1.0 / (1.0 - rate)}


def test_dropout_inference_is_identity():
    x = rand(np.random.default_rng(11), (3, 5))
    res = check_op(lambda g, t: g.dropout(t, rate=0.5), lambda t: t, [x], ctx=RunContext(training=False, step=4))
    np.testing.assert_array_equal(res.out, x)


def test_dropout_mask_depends_on_step_and_seeds():
    m = lambda **kw: dropout_mask((50, 40), np.float64, 0.5, **{"seed": 1, "step": 0, **kw})  # noqa: E731
    assert not np.array_equal(m(), m(step=1))
    assert not np.array_equal(m(), m(seed=2))
    assert not np.array_equal(m(), m(run_seed=3))
    np.testing.assert_array_equal(m(step=7), m(step=7))


def test_dropout_run_seed_is_mixed_in():
    g = Graph()
    x = g.variable(np.ones((20, 30)), name="x")
    y = g.dropout(x, rate=0.5, seed=1)
    a = evaluate(g, [y], ctx=RunContext(training=True, step=2, seed=0))[0]
    b = evaluate(g, [y], ctx=RunContext(training=True, step=2, seed=9))[0]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(b, dropout_mask((20, 30), np.float64, 0.5, 1, 2, run_seed=9))


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.9])
def test_dropout_is_inverted(rate):
    mask = dropout_mask((200, 500), np.float32, rate, seed=0, step=0)
    assert mask.dtype == np.float32
    assert abs(float(mask.mean()) - 1.0) < 0.05 * (1 + rate / (1 - rate)) ** 0.5
    assert abs(float((mask == 0).mean()) - rate) < 0.01


# ---- batch_norm ---------------------------------------------------------------------------------------------
def _bn_inputs(shape, axis, seed=12):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = 2.0 * rand(rng, shape) + 0.5
    return [x, rand(rng, (c,), 0.5, 1.5), rand(rng, (c,)), rand(rng, (c,)), rand(rng, (c,), 0.5, 2.0)]


def _torch_bn(axis, training, eps):
    def bn(x, gamma, beta, mm, mv):
        xc = torch.movedim(x, axis, 1)
        y = F.batch_norm(xc, mm, mv, gamma, beta, training=training, momentum=0.0, eps=eps)
        return torch.movedim(y, 1, axis)

    return bn


BN_CASES = [((6, 3), -1), ((6, 3), 1), ((2, 3, 4, 4), 1), ((2, 4, 4, 3), -1), ((3, 2, 5), 1), ((2, 3, 2, 2), 3)]


covers("batch_norm")


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("shape, axis", BN_CASES, ids=str)
def test_batch_norm(shape, axis, training):
    inputs = _bn_inputs(shape, axis)
    eps = 1e-3
    check_op(
        lambda g, *t: g.batch_norm(*t, axis=axis, epsilon=eps),
        _torch_bn(axis, training, eps),
        [a.copy() for a in inputs],
        grad_inputs=[0, 1, 2],  # the moving statistics get no gradient
        ctx=RunContext(training=training),
        fd_rtol=1e-4,
    )


def test_batch_norm_inference_uses_moving_stats():
    x, gamma, beta, mm, mv = _bn_inputs((5, 3), -1)
    g = Graph()
    y = g.batch_norm(*(g.variable(a) for a in (x, gamma, beta, mm, mv)), epsilon=1e-3)
    (out,) = evaluate(g, [y], ctx=RunContext(training=False))
    np.testing.assert_allclose(out, (x - mm) / np.sqrt(mv + 1e-3) * gamma + beta, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_state_update_is_keras_moving_average(dtype):
    x = np.array([[1.0, 10.0], [2.0, 20.0], [6.0, 0.0]], dtype)
    gamma, beta = np.ones(2, dtype), np.zeros(2, dtype)
    mm, mv = np.array([0.5, -1.0], dtype), np.array([2.0, 4.0], dtype)
    new = get_op("batch_norm").state_update(RunContext(training=True), x, gamma, beta, mm, mv,
                                            axis=-1, epsilon=1e-3, momentum=0.9)
    assert set(new) == {3, 4}
    # batch mean (3, 10); biased batch variance ((4 + 1 + 9)/3, (0 + 100 + 100)/3)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12}
    np.testing.assert_allclose(new[3], [0.9 * 0.5 + 0.1 * 3.0, 0.9 * -1.0 + 0.1 * 10.0], **tol)
    np.testing.assert_allclose(new[4], [0.9 * 2.0 + 0.1 * 14 / 3, 0.9 * 4.0 + 0.1 * 200 / 3], **tol)
    assert new[3].dtype == dtype and new[4].dtype == dtype


# ---- losses ---------------------------------------------------------------------------------------------------
def _probs(rng, shape):
    e = np.exp(rng.standard_normal(shape))
    return e / e.sum(-1, keepdims=True)


def _keras_cce(p, t):
    q = torch.clamp(p / p.sum(-1, keepdim=True), 1e-7, 1 - 1e-7)
    return -(t * torch.log(q)).sum(-1).mean()


def _soft_ce_logits(z, t):
    return -(t * torch.log_softmax(z, -1)).sum(-1).mean()


def _loss_cases():
    rng = np.random.default_rng(14)
    cases = []
    for shape in [(4, 3), (2, 3, 5), (6,)]:
        p, t = rand(rng, shape), rand(rng, shape)
        cases.append(("mse", {}, [p, t], lambda a, b: F.mse_loss(a, b)))
        d = rand(rng, shape, away_from=0.0, gap=0.05)
        cases.append(("mae", {}, [t + d, t], lambda a, b: F.l1_loss(a, b)))
        pb, tb = rand(rng, shape, 0.05, 0.95), rand(rng, shape, 0.0, 1.0)
        cases.append(("binary_crossentropy", {}, [pb, tb], lambda a, b: F.binary_cross_entropy(a, b)))
        cases.append(("binary_crossentropy", {"from_logits": True}, [3 * p, tb],
                      lambda a, b: F.binary_cross_entropy_with_logits(a, b)))
    for shape in [(4, 3), (2, 3, 5)]:
        onehot = np.eye(shape[-1])[rng.integers(0, shape[-1], shape[:-1])]
        soft = _probs(rng, shape)
        unnormalised = rand(rng, shape, 0.1, 2.0)  # Keras normalises p / sum(p) first
        for t in (onehot, soft):
            cases.append(("categorical_crossentropy", {}, [_probs(rng, shape), t], _keras_cce))
            cases.append(("categorical_crossentropy", {}, [unnormalised, t], _keras_cce))
            logits = 2 * rand(rng, shape)
            cases.append(("categorical_crossentropy", {"from_logits": True}, [logits, t], _soft_ce_logits))
    for n, c in [(5, 3), (4, 6)]:
        labels = rng.integers(0, c, n).astype(np.int64)
        for lab in (labels, labels.reshape(n, 1), labels.astype(np.int32)):
            cases.append(("sparse_categorical_crossentropy", {}, [_probs(rng, (n, c)), lab],
                          lambda p, y: F.nll_loss(torch.log(p / p.sum(-1, keepdim=True)), y.reshape(-1).long())))
            cases.append(("sparse_categorical_crossentropy", {"from_logits": True}, [2 * rand(rng, (n, c)), lab],
                          lambda z, y: F.cross_entropy(z, y.reshape(-1).long())))
    return cases


LOSS_CASES = _loss_cases()
covers(*(c[0] for c in LOSS_CASES))


@pytest.mark.parametrize(
    "op, attrs, inputs, torch_fn",
    LOSS_CASES,
    ids=[f"{c[0]}-{'logits' if c[1] else 'probs'}-{c[2][0].shape}-{c[2][1].shape}-{c[2][1].dtype}-{i}"
         for i, c in enumerate(LOSS_CASES)],
)
def test_loss(op, attrs, inputs, torch_fn):
    check_op(lambda g, p, t: g.op(op, [p, t], **attrs), torch_fn, inputs, grad_inputs=[0])  # targets: no gradient


def test_probability_losses_clip_like_keras():
    # p at 0 and 1: Keras clips to [1e-7, 1 - 1e-7]; the clipped entries get no gradient
    p = np.array([[0.0, 1.0], [0.3, 0.7]])
    t = np.array([[1.0, 0.0], [0.0, 1.0]])
    clip = lambda a: torch.clamp(a, 1e-7, 1 - 1e-7)  # noqa: E731
    res = check_op(
        lambda g, a, b: g.binary_crossentropy(a, b),
        lambda a, b: -(b * torch.log(clip(a)) + (1 - b) * torch.log(1 - clip(a))).mean(),
        [p, t], grad_inputs=[0], fd=False,
    )
    assert np.isfinite(res.out) and res.out > 5  # two of four entries cost -log(1e-7) ~ 16
    check_op(lambda g, a, b: g.categorical_crossentropy(a, b), _keras_cce, [p, t], grad_inputs=[0], fd=False)


covers("l1_penalty", "l2_penalty")


@pytest.mark.parametrize("l", [0.01, 0.5])
def test_penalties(l):
    w = rand(np.random.default_rng(15), (3, 4), away_from=0.0, gap=0.05)
    check_op(lambda g, t: g.l1_penalty(t, l=l), lambda t: l * t.abs().sum(), [w])
    check_op(lambda g, t: g.l2_penalty(t, l=l), lambda t: l * (t * t).sum(), [w])


# ---- float32 ------------------------------------------------------------------------------------------------------
def _float32_cases():
    rng = np.random.default_rng(16)
    a, b = rand(rng, (3, 4)), rand(rng, (4,), 0.5, 2.0)
    cases = {f"{op}": (lambda g, x, y, op=op: g.op(op, [x, y]), BINARY[op], [a, b]) for op in BINARY}
    for op, (build, torch_fn, gen) in UNARY.items():
        cases[op] = (build, torch_fn, [gen(rng, (3, 4))])
    cases["matmul_tb"] = (lambda g, x, y: g.matmul(x, y, transpose_b=True), lambda x, y: x @ y.T,
                          [a, rand(rng, (2, 4))])
    cases["reduce_mean"] = (lambda g, x: g.reduce_mean(x, axis=0), lambda x: x.mean(0), [a])
    cases["reduce_max"] = (lambda g, x: g.reduce_max(x, axis=-1, keepdims=True), lambda x: x.amax(-1, keepdim=True),
                           [a])
    cases["log_softmax"] = (lambda g, x: g.log_softmax(x), lambda x: torch.log_softmax(x, -1), [a])
    cases["softmax"] = (lambda g, x: g.softmax(x, axis=0), lambda x: torch.softmax(x, 0), [a])
    cases["reshape"] = (lambda g, x: g.reshape(x, shape=(-1,)), lambda x: x.reshape(-1), [a])
    cases["transpose"] = (lambda g, x: g.transpose(x), lambda x: x.T, [a])
    cases["batch_norm"] = (lambda g, *t: g.batch_norm(*t), _torch_bn(-1, True, 1e-3), _bn_inputs((6, 3), -1))
    losses = LOSS_CASES[:8] + [c for c in LOSS_CASES if c[0].startswith(("cat", "sparse"))][:4]
    for op, attrs, inputs, torch_fn in losses:
        build = lambda g, p, t, op=op, attrs=attrs: g.op(op, [p, t], **attrs)  # noqa: E731
        cases[f"{op}-{attrs}-{len(cases)}"] = (build, torch_fn, inputs)
    cases["l2_penalty"] = (lambda g, x: g.l2_penalty(x), lambda x: 0.01 * (x * x).sum(), [a])
    return cases


FLOAT32_CASES = _float32_cases()


@pytest.mark.parametrize("case", FLOAT32_CASES)
def test_float32_graph_keeps_float32(case):
    build, torch_fn, inputs = FLOAT32_CASES[case]
    n_float = sum(1 for x in inputs if np.asarray(x).dtype.kind == "f")
    grad_inputs = [0] if case.startswith(("mse", "mae", "binary", "cat", "sparse")) else list(range(min(n_float, 3)))
    res = check_op(build, torch_fn, inputs, dtype=np.float32, grad_inputs=grad_inputs, fd=False, rtol=2e-4, atol=2e-5)
    assert res.out.dtype == np.float32


# ---- coverage ------------------------------------------------------------------------------------------------------
# ---- cast, concat, linear algebra -------------------------------------------------------
covers("cast", "concat", "matrix_inverse", "matrix_determinant", "pow")


@pytest.mark.parametrize("shapes", [((3, 4), ()), ((3, 4), (4,)), ((2, 3), (2, 3))], ids=str)
def test_pow(shapes):
    rng = np.random.default_rng(5)
    a, b = rand(rng, shapes[0], 0.5, 2.0), rand(rng, shapes[1], -2.0, 2.0)
    check_op(lambda g, x, y: g.pow(x, y), torch.pow, [a, b])


def test_pow_of_a_negative_base_to_an_integer_power_and_its_gradient():
    a = np.array([-2.0, -0.5, 3.0])
    check_op(lambda g, x: g.pow(x, 3.0), lambda t: torch.pow(t, 3.0), [a])


@pytest.mark.parametrize("to, torch_dtype", [("float32", torch.float32), ("float64", torch.float64)])
def test_cast_between_floats_passes_the_gradient_back(to, torch_dtype):
    x = rand(np.random.default_rng(3), (3, 4))
    check_op(lambda g, t: g.cast(t, dtype=to), lambda t: t.to(torch_dtype).to(torch.float64), [x],
             rtol=1e-6 if to == "float32" else 1e-9, atol=1e-7 if to == "float32" else 1e-11, fd=to == "float64")


def test_cast_to_an_integer_truncates_and_has_no_gradient():
    g = Graph()
    x = g.variable(np.array([[-1.7, 0.2, 2.9]]), name="x")
    y = g.cast(x, dtype="int32")
    assert y.dtype == np.int32
    np.testing.assert_array_equal(evaluate(g, [y])[0], [[-1, 0, 2]])
    z = g.reduce_sum(g.cast(g.cast(x, dtype="int64"), dtype="float64"))
    assert gradients(z, [x]) == [None]


@pytest.mark.parametrize("shapes, axis", [([(2, 3), (4, 3)], 0), ([(2, 3), (2, 1), (2, 2)], 1), ([(2, 2, 3)] * 2, -1),
                                          ([(5,), (1,)], 0)], ids=str)
def test_concat(shapes, axis):
    rng = np.random.default_rng(len(shapes))
    xs = [rand(rng, s) for s in shapes]
    check_op(lambda g, *ts: g.concat(*ts, axis=axis), lambda *ts: torch.cat(ts, dim=axis), xs)


def test_concat_names_the_input_and_axis_that_disagree():
    g = Graph()
    a, b = g.placeholder((2, 3), name="a"), g.placeholder((2, 4), name="b")
    with pytest.raises(GraphError, match=r"concat input 1 \(2, 4\) differs from input 0 \(2, 3\) in axis 1; only axis 0"):
        g.concat(a, b, axis=0)
    with pytest.raises(GraphError, match="rank"):
        g.concat(a, g.placeholder((2,), name="c"))


def _well_conditioned(rng, n):
    return rand(rng, (n, n)) + n * np.eye(n)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_matrix_inverse(n):
    check_op(lambda g, x: g.matrix_inverse(x), torch.linalg.inv, [_well_conditioned(np.random.default_rng(n), n)])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_matrix_determinant(n):
    check_op(lambda g, x: g.matrix_determinant(x), torch.linalg.det, [_well_conditioned(np.random.default_rng(n), n)])


def test_a_singular_matrix_has_no_inverse_and_says_so():
    g = Graph()
    x = g.constant(np.array([[1.0, 2.0], [2.0, 4.0]]), name="x")
    with pytest.raises(GraphError, match="the 2x2 matrix is singular: it has no inverse"):
        evaluate(g, [g.matrix_inverse(x)])
    with pytest.raises(GraphError, match=r"needs a square matrix \(n, n\), got shape \(2, 3\)"):
        g.matrix_determinant(g.placeholder((2, 3), name="r"))


def test_every_differentiable_op_is_covered():
    differentiable = {n for n, op in all_ops().items() if op.differentiable}
    assert differentiable - COVERED == set(), "add test cases for these ops"
    for name, op in all_ops().items():
        if not op.differentiable:
            assert op.grad is None, f"{name} is a gradient helper but has a gradient rule"


def test_gradient_helpers_are_not_differentiated():
    # an op with differentiable=False between the loss and a variable is an error, not a silent zero
    g = Graph()
    w = g.variable(np.ones(3))
    y = g.reduce_sum(g.relu_grad(w, w))
    with pytest.raises(GraphError, match="relu_grad"):
        gradients(y, [w])
