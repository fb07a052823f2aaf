"""graph.gradients: paths, what gets None, dtypes, seeds, and a whole MLP against torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graph import Graph, GraphError, RunContext, gradients
from graph.interpret import evaluate
from tests.graph.helpers import central_difference, check_op


def test_chain_rule_sums_every_path():
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    # w reaches the output through mul, sigmoid and a reduction: three paths
    check_op(
        lambda g, a, b: g.add(g.mul(a, b), g.sigmoid(a)) * g.reduce_sum(a, axis=0),
        lambda a, b: (a * b + torch.sigmoid(a)) * a.sum(0),
        [w, x],
    )


def test_same_tensor_twice_as_one_op_input():
    x = np.random.default_rng(1).standard_normal((2, 3))
    check_op(lambda g, a: g.mul(a, a), lambda a: a * a, [x])
    check_op(lambda g, a: g.matmul(a, a, transpose_b=True), lambda a: a @ a.T, [x])


def test_non_trainable_variable_gets_none_but_still_passes_gradient_through():
    g = Graph()
    frozen = g.variable(np.full((2,), 3.0), trainable=False, name="frozen")
    w = g.variable(np.array([1.0, 2.0]), name="w")
    y = g.reduce_sum(frozen * w)
    d_frozen, dw = gradients(y, [frozen, w])
    assert d_frozen is None
    np.testing.assert_allclose(evaluate(g, [dw])[0], [3.0, 3.0])


def test_unconnected_x_gets_none():
    g = Graph()
    a, b = g.variable(np.ones(2), name="a"), g.variable(np.ones(2), name="b")
    y = g.reduce_sum(g.square(a))
    da, db = gradients(y, [a, b])
    assert da is not None and db is None


def test_integer_tensors_get_none():
    g = Graph()
    i = g.placeholder((3,), "int32", name="i")
    w = g.variable(np.array([1.0, 2.0, 3.0]), name="w")
    y = g.reduce_sum(g.mul(w, i))
    assert y.dtype == np.float64
    di, dw = gradients(y, [i, w])
    assert di is None
    np.testing.assert_allclose(evaluate(g, [dw], feeds={"i": np.array([4, 5, 6], np.int32)})[0], [4.0, 5.0, 6.0])


def test_sparse_labels_get_none():
    g = Graph()
    logits = g.variable(np.zeros((2, 3)), name="logits")
    labels = g.placeholder((2,), "int64", name="labels")
    loss = g.sparse_categorical_crossentropy(logits, labels, from_logits=True)
    assert gradients(loss, [logits, labels])[1] is None


def test_cannot_differentiate_an_integer_output():
    g = Graph()
    i = g.placeholder((3,), "int32", name="i")
    with pytest.raises(GraphError, match="'count'"):
        gradients(g.reduce_sum(i, name="count"), [i])


def test_gradient_of_y_itself_is_the_seed():
    g = Graph()
    w = g.variable(np.ones((2, 2)), name="w")
    (dw,) = gradients(w, [w])
    np.testing.assert_array_equal(evaluate(g, [dw])[0], np.ones((2, 2)))


def test_gradient_with_respect_to_an_intermediate_tensor():
    g = Graph()
    w = g.variable(np.array([1.0, -2.0]), name="w")
    h = g.square(w, name="h")
    y = g.reduce_sum(g.mul(h, 3.0))
    dh, dw = gradients(y, [h, w])
    dh_v, dw_v = evaluate(g, [dh, dw])
    np.testing.assert_allclose(dh_v, [3.0, 3.0])
    np.testing.assert_allclose(dw_v, [6.0, -12.0])


def test_non_scalar_y_means_sum_of_y():
    rng = np.random.default_rng(2)
    g = Graph()
    w = g.variable(rng.standard_normal((3, 4)), name="w")
    y = g.tanh(w) * 2.0
    (d_vec,) = gradients(y, [w])
    (d_sum,) = gradients(g.reduce_sum(y), [w])
    a, b = evaluate(g, [d_vec, d_sum])
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_explicit_seed_dy():
    g = Graph()
    w = g.variable(np.array([1.0, 2.0, 3.0]), name="w")
    y = g.square(w)
    seed = g.constant(np.array([1.0, 0.0, -1.0]))
    (dw,) = gradients(y, [w], dy=seed)
    np.testing.assert_allclose(evaluate(g, [dw])[0], [2.0, 0.0, -6.0])


def _mlp(g, dtype, x_val, rng):
    x = g.placeholder((None, 4), dtype, name="x")
    w1 = g.variable(rng.standard_normal((4, 5)).astype(dtype), name="w1")
    b1 = g.variable(rng.standard_normal((5,)).astype(dtype), name="b1")
    w2 = g.variable(rng.standard_normal((5, 3)).astype(dtype), name="w2")
    b2 = g.variable(rng.standard_normal((3,)).astype(dtype), name="b2")
    gamma = g.variable(np.ones(5, dtype), name="gamma")
    beta = g.variable(np.zeros(5, dtype), name="beta")
    mm = g.variable(np.zeros(5, dtype), trainable=False, name="mm")
    mv = g.variable(np.ones(5, dtype), trainable=False, name="mv")
    labels = g.placeholder((None,), "int64", name="labels")
    h = g.batch_norm(g.relu(x @ w1 + b1), gamma, beta, mm, mv)
    h = g.dropout(h, rate=0.25, seed=3)
    logits = h @ w2 + b2
    loss = g.sparse_categorical_crossentropy(logits, labels, from_logits=True)
    loss = loss + g.l2_penalty(w1, l=0.01) + g.reduce_mean(g.sqrt(g.square(logits) + 1.0)) / 4.0
    return loss, [w1, b1, w2, b2, gamma, beta, mm, mv]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_graph_dtype_is_kept_by_every_gradient(dtype):
    rng = np.random.default_rng(3)
    x_val = rng.standard_normal((6, 4)).astype(dtype)
    labels = rng.integers(0, 3, 6)
    results = {}
    for dt in (dtype, np.float64):
        g = Graph()
        loss, params = _mlp(g, dt, x_val, np.random.default_rng(4))
        grads = gradients(loss, params)
        assert grads[-2:] == [None, None]  # moving statistics are not trainable
        assert all(t.dtype == dt for t in grads[:-2])
        feeds = {"x": x_val.astype(dt), "labels": labels}
        results[dt] = evaluate(g, [loss, *grads[:-2]], feeds=feeds, ctx=RunContext(training=True, step=1))
        assert all(v.dtype == dt for v in results[dt])
    # float32 agrees with float64 to float32 precision
    for a, b in zip(results[dtype], results[np.float64]):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_two_layer_mlp_matches_torch():
    rng = np.random.default_rng(5)
    x_val, y_val = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    init = {"w1": rng.standard_normal((4, 16)), "b1": rng.standard_normal(16) * 0.1,
            "w2": rng.standard_normal((16, 3)), "b2": rng.standard_normal(3) * 0.1}
    g = Graph()
    x = g.placeholder((None, 4), "float64", name="x")
    labels = g.placeholder((None,), "int64", name="y")
    p = {k: g.variable(v, name=k) for k, v in init.items()}
    logits = g.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    loss = g.sparse_categorical_crossentropy(logits, labels, from_logits=True) + g.l2_penalty(p["w2"], l=1e-3)
    grads = gradients(loss, list(p.values()))
    got = evaluate(g, [loss, *grads], feeds={"x": x_val, "y": y_val})

    t = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    tlogits = torch.relu(torch.tensor(x_val) @ t["w1"] + t["b1"]) @ t["w2"] + t["b2"]
    tloss = F.cross_entropy(tlogits, torch.tensor(y_val)) + 1e-3 * (t["w2"] ** 2).sum()
    tloss.backward()
    np.testing.assert_allclose(got[0], tloss.item(), rtol=1e-12)
    for name, mine in zip(init, got[1:]):
        np.testing.assert_allclose(mine, t[name].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def test_mlp_gradient_matches_central_differences():
    rng = np.random.default_rng(6)
    x_val, labels = rng.standard_normal((5, 4)), rng.integers(0, 3, 5)
    g = Graph()
    loss, params = _mlp(g, np.float64, x_val, rng)
    grads = gradients(loss, params[:6])
    feeds = {"x": x_val, "labels": labels}
    ctx = RunContext(training=True, step=2)
    values = evaluate(g, [*params[:6], *grads], feeds=feeds, ctx=ctx)
    names = [t.name for t in params[:6]]
    for i, name in enumerate(names):
        def f(vals):
            return evaluate(g, [loss], feeds=feeds, params=dict(zip(names, vals)), ctx=ctx)[0]

        fd = central_difference(f, values[:6], i)
        np.testing.assert_allclose(values[6 + i], fd, rtol=1e-5, atol=1e-7, err_msg=name)


def test_batch_dimension_unknown_broadcasting():
    # (None, 3) + (3,): the bias gradient sums over the batch, whatever its size
    g = Graph()
    x = g.placeholder((None, 3), "float64", name="x")
    b = g.variable(np.zeros(3), name="b")
    (db,) = gradients(g.reduce_sum(x + b), [b])
    for n in (1, 4):
        np.testing.assert_allclose(evaluate(g, [db], feeds={"x": np.ones((n, 3))})[0], np.full(3, float(n)))
