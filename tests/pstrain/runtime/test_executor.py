"""The executor against the NumPy interpreter (``graph.interpret.evaluate``).

Each graph runs through ``Executor`` on the "cpu" (Numba, with dense fusion) and
"reference" backends and must fetch what the interpreter computes: forward values,
gradients and batch-norm state updates. Also: one compiled program per input
signature, no buffer allocation between runs, and feed errors that name the
placeholder.
"""
from __future__ import annotations

import numpy as np
import pytest

from graph import DTypeError, Graph, GraphError, RunContext, ShapeError, gradients
from graph.interpret import evaluate, needed_nodes
from pstrain.runtime.executor import Executor

BACKENDS = ["cpu", "reference"]
DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6), np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12)}


def assert_close(got, want, dtype):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"fetch {i}: shape {a.shape} != {b.shape}"
        assert a.dtype == b.dtype, f"fetch {i}: dtype {a.dtype} != {b.dtype}"
        np.testing.assert_allclose(a, b, err_msg=f"fetch {i}", **TOL[np.dtype(dtype)])


def compute_nodes(ex: Executor) -> list[str]:
    """Names of the non-source nodes the executor's fetches need."""
    g = ex.graph
    return [n for n in needed_nodes(g, ex.fetches) if g.nodes[n].op not in ("placeholder", "variable", "constant")]


def only_program(ex: Executor):
    assert len(ex._programs) == 1
    return next(iter(ex._programs.values()))


# ---- models --------------------------------------------------------------------------------
class Model:
    def __init__(self, g, fetches, feeds, variables, **names):
        self.g, self.fetches, self.feeds, self.variables = g, fetches, feeds, variables
        self.__dict__.update(names)


def mlp(dtype, batch=6, seed=0) -> Model:
    """3-layer relu MLP with sparse cross-entropy from logits; fetches loss and all grads."""
    rng = np.random.default_rng(seed)
    g = Graph()
    x = g.placeholder((None, 5), dtype, name="x")
    y = g.placeholder((None,), "int64", name="y")
    h, variables, matmuls, dense_outs = x, [], [], []
    for i, (k, m) in enumerate([(5, 8), (8, 6), (6, 3)]):
        w = g.variable((rng.standard_normal((k, m)) * 0.7).astype(dtype), name=f"w{i}")
        b = g.variable((rng.standard_normal(m) * 0.1).astype(dtype), name=f"b{i}")
        mm = h @ w
        h = mm + b
        if i < 2:
            h = g.relu(h)
        matmuls.append(mm.name)
        dense_outs.append(h.name)
        variables += [w, b]
    loss = g.sparse_categorical_crossentropy(h, y, from_logits=True)
    grads = gradients(loss, variables)
    feeds = {"x": rng.standard_normal((batch, 5)).astype(dtype), "y": rng.integers(0, 3, batch)}
    return Model(g, [loss] + grads, feeds, variables, matmuls=matmuls, dense_outs=dense_outs, loss=loss, logits=h)


def mlp_feeds(dtype, batch, seed):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 5)).astype(dtype), "y": rng.integers(0, 3, batch)}


def run_and_compare(model: Model, backend: str, dtype, ctx=None, params=None, **ex_kw):
    ex = Executor(model.g, model.fetches, backend, **ex_kw)
    got = ex.run(model.feeds, params or {}, ctx or RunContext()).values
    want = evaluate(model.g, model.fetches, model.feeds, params or {}, ctx or RunContext())
    assert_close(got, want, dtype)
    return ex


# ---- (a) MLP: forward loss and every gradient --------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_loss_and_gradients_match_the_interpreter(backend, dtype):
    run_and_compare(mlp(dtype), backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_params_override_initial_values(dtype):
    model = mlp(dtype)
    rng = np.random.default_rng(5)
    params = {v.name: (model.g.initial_values[v.name] + rng.standard_normal(v.shape)).astype(dtype) for v in model.variables}
    run_and_compare(model, "cpu", dtype, params=params)


def test_cpu_backend_fuses_the_dense_layers():
    model = mlp(np.float32)
    ex = run_and_compare(model, "cpu", np.float32)
    prog = only_program(ex)
    step_nodes = {s.node for s in prog.steps}
    n_compute = len(compute_nodes(ex))
    # relu(matmul + b) twice and the logits' matmul + b: 2 + 2 + 1 nodes folded away.
    assert len(prog.steps) == n_compute - 5
    assert not step_nodes & set(model.matmuls), "forward matmuls should run inside fused dense steps"
    assert set(model.dense_outs) <= step_nodes


def test_fetching_an_intermediate_of_a_dense_chain_keeps_it_computed():
    model = mlp(np.float64)
    pre_activation = model.g.nodes[model.dense_outs[0]].inputs[0]  # the add under the first relu
    fetches = [pre_activation, model.dense_outs[0], model.matmuls[1]] + model.fetches
    ex = Executor(model.g, fetches, "cpu")
    got = ex.run(model.feeds, {}).values
    assert_close(got, evaluate(model.g, fetches, model.feeds), np.float64)
    step_nodes = {s.node for s in only_program(ex).steps}
    assert {pre_activation, model.matmuls[1]} <= step_nodes


@pytest.mark.parametrize("ex_kw", [dict(backend="reference"), dict(backend="cpu", fuse=False)], ids=["reference", "cpu-nofuse"])
def test_no_fusion_runs_one_step_per_node(ex_kw):
    model = mlp(np.float64)
    ex = run_and_compare(model, ex_kw.pop("backend"), np.float64, **ex_kw)
    prog = only_program(ex)
    assert [s.node for s in prog.steps] == compute_nodes(ex)


def test_dense_fusion_with_a_broadcast_scalar_bias():
    g = Graph()
    x = g.placeholder((None, 4), "float64", name="x")
    w = g.variable(np.random.default_rng(0).standard_normal((4, 3)), name="w")
    b = g.variable(np.array([0.5]), name="b")
    out = g.relu(x @ w + b)
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 4))}
    backing = np.array([0.5, 100.0, 100.0])  # what an out-of-bounds read of b would see
    params = {"b": backing[:1]}
    got = Executor(g, [out], "cpu").run(feeds, params).values[0]
    np.testing.assert_allclose(got, evaluate(g, [out], feeds, params)[0], rtol=1e-12)


# ---- (b) sigmoid and tanh heads ---------------------------------------------------------------------
def sigmoid_tanh_model(dtype, loss_kind) -> Model:
    rng = np.random.default_rng(1)
    g = Graph()
    x = g.placeholder((None, 4), dtype, name="x")
    t = g.placeholder((None, 2), dtype, name="t")
    w0 = g.variable((rng.standard_normal((4, 7)) * 0.5).astype(dtype), name="w0")
    b0 = g.variable((rng.standard_normal(7) * 0.1).astype(dtype), name="b0")
    w1 = g.variable((rng.standard_normal((7, 2)) * 0.5).astype(dtype), name="w1")
    b1 = g.variable((rng.standard_normal(2) * 0.1).astype(dtype), name="b1")
    h = g.tanh(x @ w0 + b0)
    if loss_kind == "bce":
        pred = g.sigmoid(h @ w1 + b1)
        loss = g.binary_crossentropy(pred, t)
        target = rng.integers(0, 2, (5, 2)).astype(dtype)
    else:
        pred = g.tanh(h @ w1 + b1)
        loss = g.mse(pred, t)
        target = rng.uniform(-1, 1, (5, 2)).astype(dtype)
    variables = [w0, b0, w1, b1]
    feeds = {"x": rng.standard_normal((5, 4)).astype(dtype), "t": target}
    return Model(g, [loss, pred] + gradients(loss, variables), feeds, variables)


@pytest.mark.parametrize("loss_kind", ["bce", "mse"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_and_tanh_heads(backend, dtype, loss_kind):
    ex = run_and_compare(sigmoid_tanh_model(dtype, loss_kind), backend, dtype)
    if backend == "cpu":
        assert len(only_program(ex).steps) < len(compute_nodes(ex))


# ---- (c) dropout and batch norm ----------------------------------------------------------------------
def dropout_model(dtype) -> Model:
    rng = np.random.default_rng(2)
    g = Graph()
    x = g.placeholder((None, 6), dtype, name="x")
    w = g.variable(rng.standard_normal((6, 8)).astype(dtype), name="w")
    b = g.variable(np.zeros(8, dtype), name="b")
    v = g.variable(rng.standard_normal((8, 1)).astype(dtype), name="v")
    t = g.placeholder((None, 1), dtype, name="t")
    h = g.relu(x @ w + b)
    d = g.dropout(h, rate=0.5, seed=3)
    loss = g.mse(d @ v, t)
    feeds = {"x": rng.standard_normal((9, 6)).astype(dtype), "t": rng.standard_normal((9, 1)).astype(dtype)}
    return Model(g, [loss, h, d] + gradients(loss, [w, b, v]), feeds, [w, b, v])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_training_masks_depend_on_the_step(backend, dtype):
    model = dropout_model(dtype)
    ex = Executor(model.g, model.fetches, backend)
    seen = []
    for step in (1, 2, 1):
        ctx = RunContext(training=True, step=step)
        got = [np.copy(a) for a in ex.run(model.feeds, {}, ctx).values]
        assert_close(got, evaluate(model.g, model.fetches, model.feeds, {}, ctx), dtype)
        _, h, d = got[:3]
        kept = d != 0
        np.testing.assert_allclose(d[kept], 2 * h[kept], **TOL[np.dtype(dtype)])  # inverted dropout, rate 0.5
        seen.append(d)
    assert not np.array_equal(seen[0], seen[1]), "different steps should draw different masks"
    np.testing.assert_array_equal(seen[0], seen[2])  # a retried step draws the same mask
    # The run seed is mixed in too (per worker).
    other = ex.run(model.feeds, {}, RunContext(training=True, step=1, seed=7)).values[2]
    assert not np.array_equal(other, seen[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_the_identity_at_inference(backend):
    model = dropout_model(np.float64)
    fetches = model.fetches[:3]  # no gradients at inference
    ex = Executor(model.g, fetches, backend)
    ctx = RunContext(training=False, step=4)
    loss, h, d = ex.run(model.feeds, {}, ctx).values
    np.testing.assert_array_equal(d, h)
    assert_close([loss, h, d], evaluate(model.g, fetches, model.feeds, {}, ctx), np.float64)


def bn_model(dtype, trainable_affine: bool) -> Model:
    rng = np.random.default_rng(3)
    g = Graph()
    x = g.placeholder((None, 3), dtype, name="x")
    gamma0, beta0 = np.array([1.5, 0.5, 2.0], dtype), np.array([0.1, -0.2, 0.3], dtype)
    if trainable_affine:  # as client.nn.BatchNormalization builds it
        gamma, beta = g.variable(gamma0, name="bn/gamma"), g.variable(beta0, name="bn/beta")
    else:
        gamma, beta = g.constant(gamma0, name="bn/gamma"), g.constant(beta0, name="bn/beta")
    mm = g.variable(np.array([0.2, -0.1, 1.0], dtype), trainable=False, name="bn/moving_mean")
    mv = g.variable(np.array([1.0, 2.0, 0.5], dtype), trainable=False, name="bn/moving_variance")
    w = g.variable(rng.standard_normal((3, 1)).astype(dtype), name="w")
    t = g.placeholder((None, 1), dtype, name="t")
    y = g.batch_norm(x, gamma, beta, mm, mv, momentum=0.9, epsilon=1e-3, name="bn")
    loss = g.mse(y @ w, t)
    variables = [w] + ([gamma, beta] if trainable_affine else [])
    feeds = {"x": (rng.standard_normal((8, 3)) * 2 + 1).astype(dtype), "t": rng.standard_normal((8, 1)).astype(dtype)}
    return Model(g, [loss, y] + gradients(loss, variables), feeds, variables)


def keras_moving_stats(x, mm, mv, momentum):
    return momentum * mm + (1 - momentum) * x.mean(axis=0), momentum * mv + (1 - momentum) * x.var(axis=0)


def check_bn_training(model: Model, backend: str, dtype):
    ex = Executor(model.g, model.fetches, backend)
    ctx = RunContext(training=True, step=1)
    res = ex.run(model.feeds, {}, ctx)
    assert_close(res.values, evaluate(model.g, model.fetches, model.feeds, {}, ctx), dtype)
    init = model.g.initial_values
    want_mm, want_mv = keras_moving_stats(
        model.feeds["x"].astype(np.float64), init["bn/moving_mean"], init["bn/moving_variance"], 0.9
    )
    assert set(res.updates) == {"bn/moving_mean", "bn/moving_variance"}
    np.testing.assert_allclose(res.updates["bn/moving_mean"], want_mm, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(res.updates["bn/moving_variance"], want_mv, **TOL[np.dtype(dtype)])
    assert res.updates["bn/moving_mean"].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_training_returns_keras_moving_averages(backend, dtype):
    check_bn_training(bn_model(dtype, trainable_affine=False), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_with_trainable_gamma_and_beta(backend):
    # Regression: gamma and beta are variable inputs of batch_norm too, but only the
    # moving statistics are state updates (this once raised KeyError 1).
    check_bn_training(bn_model(np.float64, trainable_affine=True), backend, np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_inference_uses_moving_statistics_and_updates_nothing(backend):
    model = bn_model(np.float64, trainable_affine=False)
    ex = Executor(model.g, model.fetches[:2], backend)
    ctx = RunContext(training=False)
    params = {"bn/moving_mean": np.array([0.0, 1.0, -1.0]), "bn/moving_variance": np.array([4.0, 1.0, 0.25])}
    res = ex.run(model.feeds, params, ctx)
    assert res.updates == {}
    x = model.feeds["x"]
    want = (x - params["bn/moving_mean"]) / np.sqrt(params["bn/moving_variance"] + 1e-3) * [1.5, 0.5, 2.0] + [0.1, -0.2, 0.3]
    np.testing.assert_allclose(res.values[1], want, rtol=1e-12)
    assert_close(res.values, evaluate(model.g, model.fetches[:2], model.feeds, params, ctx), np.float64)


# ---- (d) compiled programs and buffers ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_batch_size_compiles_once_and_reuses_its_buffers(backend):
    model = mlp(np.float64)
    ex = Executor(model.g, model.fetches, backend)
    results = {}
    for batch, seed in ((4, 10), (7, 11), (4, 12), (7, 13)):
        feeds = mlp_feeds(np.float64, batch, seed)
        values = ex.run(feeds, {}).values
        assert_close(values, evaluate(model.g, model.fetches, feeds), np.float64)
        results.setdefault(batch, []).append(values)
    assert len(ex._programs) == 2
    for batch, (first, second) in results.items():
        # The executor's own buffers: the same objects, overwritten by the later run.
        assert all(a is b for a, b in zip(first, second)), f"batch {batch}: fetch buffers were reallocated"
    assert results[4][0][0] is not results[7][0][0]
    # Inference compiles a program of its own.
    ex.run(mlp_feeds(np.float64, 4, 14), {}, RunContext(training=False))
    assert len(ex._programs) == 3


def test_hot_loop_allocates_no_intermediate_buffers():
    model = mlp(np.float32)
    ex = Executor(model.g, model.fetches, "cpu")
    ex.run(model.feeds, {})
    prog = only_program(ex)
    bound = set(prog.feed_slots.values()) | set(prog.param_slots.values())
    before = {i: s for i, s in enumerate(prog.slots) if i not in bound}
    ex.run(mlp_feeds(np.float32, 6, 20), {})
    assert only_program(ex) is prog
    assert all(prog.slots[i] is s for i, s in before.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_own_fetches_are_new_arrays_every_run(backend):
    model = mlp(np.float64)
    ex = Executor(model.g, model.fetches + ["x"], backend, own_fetches=True)
    first = ex.run(model.feeds, {}).values
    kept = [np.array(v, copy=True) for v in first]
    second = ex.run(mlp_feeds(np.float64, 6, 21), {}).values
    assert not any(a is b or np.shares_memory(a, b) for a, b in zip(first, second))
    for a, b in zip(first, kept):  # the next run wrote elsewhere
        np.testing.assert_array_equal(a, b)
    assert not np.shares_memory(first[-1], model.feeds["x"])  # a fed value fetched: a copy
    assert_close(second[:-1], evaluate(model.g, model.fetches, mlp_feeds(np.float64, 6, 21)), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_sgd_update_runs_as_one_axpy_step_with_the_same_bits(dtype):
    """v - lr * g and v + lr * g, g a gradient: one fused step on the cpu backend, the
    bits of the unfused mul and sub; a broadcast or shared product is left alone."""
    model = mlp(dtype)
    g_ = model.g
    ws, grads = model.variables[:3], model.fetches[1:4]
    new = [ws[0] - 0.05 * grads[0], ws[1] + grads[1] * 0.5, ws[2] - g_.constant(np.array([0.1], dtype)) * grads[2]]
    shared = 0.3 * grads[0]
    fetches = [t.name for t in new] + [(ws[0] - shared).name, (ws[0] + shared).name]
    fused = Executor(g_, fetches, "cpu")
    got = fused.run(model.feeds, {}).values
    want = Executor(g_, fetches, "cpu", fuse=False).run(model.feeds, {}).values
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    ops = {s.node: s.op for s in only_program(fused).steps}
    assert [ops.get(n) for n in fetches] == ["sub", "add", "sub", "sub", "add"]
    muls = [n for n, op in ops.items() if op == "mul"]
    assert len(muls) == 2  # the (1,)-shaped factor's product and the shared one: not fused
    assert_close(got, evaluate(g_, fetches, model.feeds), dtype)


# ---- scalar constants ------------------------------------------------------------------------------------
# Regression: 0-d constants once became shape (1,) (np.ascontiguousarray), which broke
# scalar arithmetic on the cpu backend and the gradient of a full reduce_mean.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["scalar-mul", "grad-of-reduce_mean"])
def test_scalar_constants(backend, what):
    g = Graph()
    x = g.placeholder((None, 3), "float64", name="x")
    w = g.variable(np.array([1.0, -2.0, 0.5]), name="w")
    loss = g.reduce_mean(g.square(g.mul(x, w)))
    fetches = [g.mul(loss, 2.0)] if what == "scalar-mul" else gradients(loss, [w])
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 3))}
    got = Executor(g, fetches, backend).run(feeds, {}).values
    assert_close(got, evaluate(g, fetches, feeds), np.float64)


# ---- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_placeholder_is_named(backend):
    model = mlp(np.float32)
    ex = Executor(model.g, model.fetches, backend)
    with pytest.raises(GraphError, match="'y'.*not fed") as info:
        ex.run({"x": model.feeds["x"]}, {})
    assert info.value.node == "y"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_x", [np.zeros((6, 4), np.float32), np.zeros((6, 5, 1), np.float32), np.zeros(5, np.float32)], ids=["cols", "rank3", "rank1"])
def test_wrong_feed_shape_is_named(backend, bad_x):
    model = mlp(np.float32)
    ex = Executor(model.g, model.fetches, backend)
    with pytest.raises(ShapeError, match="'x'") as info:
        ex.run({**model.feeds, "x": bad_x}, {})
    assert info.value.node == "x"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,value",
    [("x", np.full((6, 5), "a")), ("y", np.zeros(6, np.float64))],
    ids=["string-features", "float-labels"],
)
def test_wrong_feed_dtype_is_named(backend, name, value):
    model = mlp(np.float32)
    ex = Executor(model.g, model.fetches, backend)
    with pytest.raises(DTypeError, match=f"'{name}'") as info:
        ex.run({**model.feeds, name: value}, {})
    assert info.value.node == name


def test_float64_features_are_cast_to_a_float32_placeholder():
    model = mlp(np.float32)
    ex = Executor(model.g, model.fetches, "cpu")
    feeds64 = {**model.feeds, "x": model.feeds["x"].astype(np.float64)}
    got = ex.run(feeds64, {}).values
    assert_close(got, evaluate(model.g, model.fetches, model.feeds), np.float32)


def test_fetch_not_in_the_graph_raises():
    model = mlp(np.float32)
    with pytest.raises(GraphError, match="no_such_node"):
        Executor(model.g, model.fetches + ["no_such_node"], "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_errors_name_the_node(backend):
    model = mlp(np.float32)
    ex = Executor(model.g, model.fetches, backend)
    feeds = {**model.feeds, "y": np.array([0, 1, 2, 3, 0, 1])}  # 3 classes: label 3 is out of range
    with pytest.raises(GraphError, match="out of range") as info:
        ex.run(feeds, {})
    assert info.value.node == model.loss.name
