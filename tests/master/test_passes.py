"""Tests for master.passes: constant folding, pruning, CSE and the optimize pipeline.

Every pass is checked for the same contract: its output re-validates through
``graph.validate.load_nodes``, computes the same values for the fetched names as
its input (same feeds, parameters and RunContext), and its input is left untouched.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from client import nn
from graph import Graph, GraphError, RunContext, gradients, load_nodes
from graph.interpret import evaluate
from master.passes import (
    PassReport,
    eliminate_common_subexpressions,
    fold_constants,
    freeze,
    optimize,
    prune,
)

TRAIN = RunContext(training=True, step=3, seed=7)
INFER = RunContext(training=False, step=3, seed=7)


# ---- helpers -------------------------------------------------------------------------------
def records(g: Graph) -> list[dict]:
    """The node records ``load_nodes`` takes, as a decoded GraphDef would give them."""
    return [
        {"name": n.name, "op": n.op, "inputs": list(n.inputs), "attrs": dict(n.attrs), "dtype": str(n.dtype),
         "shape": list(n.shape)}
        for n in g.nodes.values()
    ]


def revalidate(g: Graph) -> Graph:
    """Rebuild ``g`` through the master's validator; it must agree on every spec."""
    rebuilt = load_nodes(records(g), g.initial_values)
    assert set(rebuilt.nodes) == set(g.nodes)
    for name, node in g.nodes.items():
        assert rebuilt.nodes[name].spec == node.spec, name
    assert set(rebuilt.initial_values) == {n for n, node in g.nodes.items() if node.op == "variable"}
    return rebuilt


def assert_topological(g: Graph) -> None:
    seen: set[str] = set()
    for node in g.nodes.values():
        assert set(node.inputs) <= seen, f"{node.name} comes before its inputs {node.inputs}"
        seen.add(node.name)


def snapshot(g: Graph):
    """Everything a pass could change in a graph, in comparable form."""

    def value(v):
        if isinstance(v, np.ndarray):
            return ("array", v.dtype.str, v.shape, v.tobytes())
        if isinstance(v, (list, tuple)):
            return tuple(value(x) for x in v)
        return repr(v)

    nodes = [
        (n.name, n.op, tuple(n.inputs), tuple((k, value(v)) for k, v in n.attrs.items()), str(n.dtype), n.shape)
        for n in g.nodes.values()
    ]
    return nodes, {k: value(v) for k, v in g.initial_values.items()}


def assert_same_values(before: Graph, after: Graph, fetches, feeds=None, params=None, ctxs=(TRAIN, INFER)) -> None:
    for ctx in ctxs:
        want = evaluate(before, fetches, feeds, params, ctx)
        got = evaluate(after, fetches, feeds, params, ctx)
        for name, w, v in zip(fetches, want, got):
            assert v.dtype == w.dtype, name
            np.testing.assert_array_equal(v, w, err_msg=f"{name} (training={ctx.training})")


def check_pass(run: Callable[[Graph], Graph], g: Graph, fetches, feeds=None, params=None) -> Graph:
    """Run a pass and check the contract every pass keeps."""
    before = snapshot(g)
    out = run(g)
    assert out is not g
    assert snapshot(g) == before, "the pass mutated its input graph"
    assert_topological(out)
    revalidate(out)
    assert_same_values(g, out, fetches, feeds, params)
    return out


def keras_model(seed: int = 1) -> nn.Sequential:
    model = nn.Sequential(
        [
            nn.Dense(8, activation="relu", input_dim=4),
            nn.BatchNormalization(),
            nn.Dropout(0.3),
            nn.Dense(6, activation="tanh", kernel_regularizer=nn.regularizers.L2(0.01)),
            nn.Dense(3, activation="softmax"),
        ],
        seed=seed,
        device="reference",
    )
    model.compile(nn.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def random_params(g: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {v: rng.standard_normal(val.shape).astype(val.dtype) for v, val in g.initial_values.items()}
    for v in params:
        if "variance" in v:  # batch-norm variances are positive
            params[v] = np.abs(params[v]) + np.float32(0.5)
    return params


# ---- constant folding ----------------------------------------------------------------------
def test_fold_product_of_constants_next_to_a_placeholder():
    g = Graph()
    x = g.placeholder((None, 2), name="x")
    c = g.mul(g.constant(2.0), g.constant(3.0), name="six")
    y = g.add(c, x, name="y")
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(3, 2)}

    out = check_pass(lambda g: fold_constants(g, set())[0], g, [y.name, c.name], feeds)
    _, folded = fold_constants(g, set())

    assert folded == ["six"]
    six = out.nodes["six"]
    assert (six.op, six.inputs, six.dtype, six.shape) == ("constant", [], np.float32, ())
    assert six.attrs["value"] == 6.0
    assert out.nodes["y"].op == "add" and out.nodes["y"].inputs == ["six", "x"]


def test_fold_a_chain_of_constants_completely():
    g = Graph()
    a = g.constant(np.array([1.0, 2.0, 3.0], np.float64), name="a")
    b = g.exp(g.neg(g.add(g.mul(a, 2.0), 1.0)))
    s = g.reduce_sum(g.reshape(b, shape=(3, 1)), axis=0, name="s")

    out = check_pass(lambda g: fold_constants(g, set())[0], g, [s.name])
    _, folded = fold_constants(g, set())

    assert set(folded) == {n for n, node in g.nodes.items() if node.op != "constant"}
    assert all(node.op == "constant" for node in out.nodes.values())
    assert (out.nodes["s"].dtype, out.nodes["s"].shape) == (np.float64, (1,))
    np.testing.assert_array_equal(out.nodes["s"].attrs["value"], [np.sum(np.exp(-(np.array([1.0, 2, 3]) * 2 + 1)))])


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "float16", "float64"])
def test_folded_constants_keep_dtype_and_shape(dtype):
    g = Graph()
    a = g.constant(np.arange(6).astype(dtype).reshape(2, 3), name="a")
    b = g.add(a, g.constant(np.ones((1, 3), dtype)), name="b")
    t = g.transpose(b, name="t")
    _eq = g.maximum(t, t, name="eq")

    out = check_pass(lambda g: fold_constants(g, set())[0], g, ["b", "t", "eq"])

    for name in ("b", "t", "eq"):
        node, orig = out.nodes[name], g.nodes[name]
        assert (node.op, node.dtype, node.shape) == ("constant", orig.dtype, orig.shape)
        assert node.attrs["value"].dtype == orig.dtype


def _dropout(g, c):
    return g.dropout(c, rate=0.5, seed=3)


def _dropout_grad(g, c):
    return g.dropout_grad(c, rate=0.5, seed=3)


def _bn_inputs(g, c):
    ones, zeros = g.constant(np.ones(3, np.float32)), g.constant(np.zeros(3, np.float32))
    return [c, ones, zeros, zeros, ones]


def _batch_norm(g, c):
    return g.batch_norm(*_bn_inputs(g, c))


def _batch_norm_grad(g, c):
    x, gamma, _, mm, mv = _bn_inputs(g, c)
    return g.batch_norm_grad(g.constant(np.ones((4, 3), np.float32)), x, gamma, mm, mv, wrt="x")


@pytest.mark.parametrize("build", [_dropout, _dropout_grad, _batch_norm, _batch_norm_grad])
def test_random_and_context_dependent_ops_are_never_folded(build):
    g = Graph()
    c = g.constant(np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0)
    r = build(g, c)
    y = g.relu(r, name="after")  # its input is not constant, so it stays too

    out = check_pass(lambda g: fold_constants(g, set())[0], g, [r.name, y.name])

    assert out.nodes[r.name].op == g.nodes[r.name].op
    assert out.nodes["after"].op == "relu"


def test_variables_and_placeholders_block_folding():
    g = Graph()
    w = g.variable(np.ones((2, 2), np.float32), name="w")
    x = g.placeholder((None, 2), name="x")
    a = g.mul(w, g.constant(2.0), name="a")
    b = g.matmul(x, a, name="b")

    _, folded = fold_constants(g, set())
    check_pass(lambda g: fold_constants(g, set())[0], g, [b.name], {"x": np.ones((3, 2), np.float32)})
    assert folded == []


def test_a_node_whose_value_raises_is_left_for_run_time():
    g = Graph()
    empty = g.constant(np.zeros((0,), np.float32))
    m = g.reduce_max(empty, name="m")
    _ok = g.add(g.constant(1.0), g.constant(2.0), name="ok")

    out, folded = fold_constants(g, set())

    assert folded == ["ok"]
    assert out.nodes["m"].op == "reduce_max"
    with pytest.raises(GraphError, match="'m'"):
        evaluate(out, [m])


def test_max_bytes_limits_the_size_of_folded_values():
    g = Graph()
    _big = g.add(g.constant(np.zeros((100, 1), np.float32)), g.constant(np.zeros((1, 100), np.float32)), name="big")
    _small = g.reduce_sum(g.constant(np.ones(4, np.float32)), name="small")

    _, folded = fold_constants(g, set(), max_bytes=1000)
    assert folded == ["small"]
    _, folded = fold_constants(g, set())
    assert folded == ["big", "small"]


# ---- pruning -----------------------------------------------------------------------------------
def test_prune_removes_dead_branches_and_their_variables():
    g = Graph()
    x = g.placeholder((None, 3), name="x")
    w = g.variable(np.ones((3, 2), np.float32), name="w")
    unused = g.variable(np.zeros(5, np.float32), name="unused")
    y = g.relu(g.matmul(x, w), name="y")
    g.exp(x, name="dead")
    g.reduce_sum(unused, name="dead_sum")
    feeds = {"x": np.ones((2, 3), np.float32)}

    out = check_pass(lambda g: prune(g, [y.name])[0], g, [y.name], feeds)
    _, removed = prune(g, [y.name])

    assert removed == ["unused", "dead", "dead_sum"]
    assert list(out.nodes) == [n for n in g.nodes if n not in removed]
    assert set(out.initial_values) == {"w"}


def test_prune_removes_gradient_rule_leftovers():
    # The matmul gradient rule builds d/dx too, which nothing needs when x is fed.
    g = Graph()
    x = g.placeholder((None, 3), name="x")
    w = g.variable(np.arange(6, dtype=np.float32).reshape(3, 2) / 5, name="w")
    loss = g.reduce_mean(g.square(g.matmul(x, w)), name="loss")
    (dw,) = gradients(loss, [w])
    feeds = {"x": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)}

    out = check_pass(lambda g: prune(g, [loss.name, dw.name])[0], g, [loss.name, dw.name], feeds)
    _, removed = prune(g, [loss.name, dw.name])

    assert removed, "the d/dx node should be pruned"
    assert all(g.nodes[n].op == "matmul" and g.nodes[n].shape == (None, 3) for n in removed)
    assert len(out.nodes) == len(g.nodes) - len(removed)


def test_prune_names_an_unknown_output():
    g = Graph()
    g.placeholder((None, 3), name="x")
    with pytest.raises(GraphError, match="'nope'"):
        prune(g, ["nope"])


# ---- common-subexpression elimination ---------------------------------------------------------
def _twin_matmuls():
    g = Graph()
    x = g.placeholder((None, 3), name="x")
    w = g.variable(np.arange(6, dtype=np.float32).reshape(3, 2), name="w")
    m1 = g.matmul(x, w, name="m1")
    m2 = g.matmul(x, w, name="m2")
    s = g.add(g.relu(m1, name="r1"), g.relu(m2, name="r2"), name="s")
    return g, s, {"x": np.linspace(-2, 2, 9, dtype=np.float32).reshape(3, 3)}


def test_cse_merges_identical_matmuls_and_what_follows():
    g, s, feeds = _twin_matmuls()

    out = check_pass(lambda g: eliminate_common_subexpressions(g, set())[0], g, ["s"], feeds)
    _, merged = eliminate_common_subexpressions(g, set())

    assert merged == {"m2": "m1", "r2": "r1"}
    assert "m2" not in out.nodes and "r2" not in out.nodes
    assert out.nodes["s"].inputs == ["r1", "r1"]


def test_cse_merges_equal_constants_only():
    g = Graph()
    a = g.constant(np.array([1.0, 2.0], np.float32), name="a")
    b = g.constant(np.array([1.0, 2.0], np.float32), name="b")  # equal: merged
    c = g.constant(np.array([1.0, 2.0], np.float64), name="c")  # other dtype
    d = g.constant(np.array([[1.0, 2.0]], np.float32), name="d")  # other shape
    z = g.constant(np.float32(0.0), name="z")
    nz = g.constant(np.float32(-0.0), name="nz")  # equal under ==, but 1/x tells them apart
    fetches = [g.add(a, b).name, g.add(c, c).name, g.add(d, a).name, g.div(1.0, z).name, g.div(1.0, nz).name]

    check_pass(lambda g: eliminate_common_subexpressions(g, set())[0], g, fetches)
    _, merged = eliminate_common_subexpressions(g, set())

    assert merged["b"] == "a"
    assert not {"a", "c", "d", "z", "nz"} & set(merged)


def test_cse_needs_equal_attrs():
    g = Graph()
    w = g.variable(np.arange(4, dtype=np.float32).reshape(2, 2), name="w")
    g.matmul(w, w, name="p")
    g.matmul(w, w, transpose_b=True, name="q")
    g.reduce_sum(w, axis=0, name="s0")
    g.reduce_sum(w, axis=(0,), name="s0_tuple")  # an int and a tuple axis are different attrs
    _, merged = eliminate_common_subexpressions(g, set())
    assert merged == {}


def test_cse_keeps_the_name_of_a_kept_node():
    g, s, feeds = _twin_matmuls()

    out = check_pass(lambda g: eliminate_common_subexpressions(g, {"r2"})[0], g, ["s", "r2"], feeds)
    _, merged = eliminate_common_subexpressions(g, {"r2"})

    assert merged == {"m2": "m1", "r1": "r2"}
    # The kept survivor moves up to its group's first slot, so the order stays topological.
    assert list(out.nodes) == ["x", "w", "m1", "r2", "s"]
    assert out.nodes["s"].inputs == ["r2", "r2"]


def test_cse_never_merges_two_kept_nodes():
    g, s, feeds = _twin_matmuls()

    out = check_pass(lambda g: eliminate_common_subexpressions(g, {"m1", "m2"})[0], g, ["s", "m1", "m2"], feeds)
    _, merged = eliminate_common_subexpressions(g, {"m1", "m2"})

    assert {"m1", "m2"} <= set(out.nodes)
    # Their consumers still merge: both kept nodes hold the same value.
    assert merged == {"r2": "r1"}


def test_cse_never_merges_random_stateful_or_source_nodes():
    g = Graph()
    x = g.placeholder((None, 3), name="x")
    g.placeholder((None, 3), name="x2")
    g.variable(np.ones(3, np.float32), name="v1")
    g.variable(np.ones(3, np.float32), name="v2")
    d1 = g.dropout(x, rate=0.5, seed=1, name="d1")
    d2 = g.dropout(x, rate=0.5, seed=1, name="d2")
    g1 = g.dropout_grad(x, rate=0.5, seed=1, name="g1")
    g2 = g.dropout_grad(x, rate=0.5, seed=1, name="g2")
    ones, zeros = g.constant(np.ones(3, np.float32)), g.constant(np.zeros(3, np.float32))
    b1 = g.batch_norm(x, ones, zeros, zeros, ones, name="b1")
    b2 = g.batch_norm(x, ones, zeros, zeros, ones, name="b2")
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "x2": np.zeros((2, 3), np.float32)}

    fetches = [t.name for t in (d1, d2, g1, g2, b1, b2)] + ["x2", "v1", "v2"]
    check_pass(lambda g: eliminate_common_subexpressions(g, set())[0], g, fetches, feeds)
    _, merged = eliminate_common_subexpressions(g, set())

    assert not {"x", "x2", "v1", "v2", "d1", "d2", "g1", "g2", "b1", "b2"} & set(merged)


def test_freeze_tells_apart_values_that_compare_equal():
    assert freeze(1) != freeze(1.0) != freeze(True)
    assert freeze((1, 2)) == freeze([1, 2]) != freeze(np.array([1, 2]))
    assert freeze(np.array([0.0])) != freeze(np.array([-0.0]))
    assert freeze(np.array([1, 2], np.int32)) != freeze(np.array([1, 2], np.int64))
    assert hash(freeze({"a": (np.array([1.5]), None)})) == hash(freeze({"a": (np.array([1.5]), None)}))


# ---- the pipeline ----------------------------------------------------------------------------
def _keras_case(seed: int = 1):
    model = keras_model(seed)
    plan = model._plan
    outputs = [plan.loss, plan.prediction, *plan.grads.values()]
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((5, 4)).astype(np.float32), "y": rng.integers(0, 3, 5)}
    return plan, outputs, feeds


def test_optimize_a_keras_model_keeps_every_fetched_value():
    plan, outputs, feeds = _keras_case()
    g = plan.graph
    assert any(n.op == "dropout" for n in g.nodes.values()) and any(n.op == "batch_norm" for n in g.nodes.values())

    out = check_pass(lambda g: optimize(g, outputs)[0], g, outputs, feeds, random_params(g))
    _, report = optimize(g, outputs)

    assert isinstance(report, PassReport)
    assert report.nodes_before == len(g.nodes)
    assert report.nodes_after == len(out.nodes) < len(g.nodes)
    assert report.folded and report.pruned
    assert set(outputs) <= set(out.nodes)
    assert not (set(report.merged) | set(report.pruned)) & set(outputs)
    assert set(report.merged.values()) <= set(out.nodes)
    assert "folded" in report.summary() and f"-> {len(out.nodes)}" in report.summary()


def test_optimize_reaches_a_fixed_point():
    plan, outputs, _ = _keras_case(seed=2)
    once, report = optimize(plan.graph, outputs)
    twice, again = optimize(once, outputs)
    assert report.rounds >= 2
    assert (again.folded, again.merged, again.pruned, again.rounds) == ([], {}, [], 1)
    assert snapshot(twice) == snapshot(once)


def test_optimize_keeps_kept_nodes_even_when_outputs_do_not_need_them():
    plan, _, feeds = _keras_case()
    out, _ = optimize(plan.graph, [plan.prediction], keep={plan.labels})
    assert plan.labels in out.nodes and plan.features in out.nodes
    assert not any(n.op == "sparse_categorical_crossentropy" for n in out.nodes.values())
    assert_same_values(plan.graph, out, [plan.prediction], feeds, random_params(plan.graph))


def test_optimize_combines_all_three_passes():
    g = Graph()
    x = g.placeholder((None, 2), name="x")
    w = g.variable(np.ones((2, 2), np.float32), name="w")
    k1 = g.mul(g.constant(2.0), g.constant(0.5), name="k1")  # folds to 1.0 ...
    k2 = g.constant(1.0, name="k2")  # ... then merges with this
    a = g.mul(g.matmul(x, w, name="m1"), k1, name="a")
    b = g.mul(g.matmul(x, w, name="m2"), k2, name="b")
    y = g.add(a, b, name="y")
    g.tanh(y, name="unused")
    feeds = {"x": np.array([[1.0, -2.0]], np.float32)}

    out = check_pass(lambda g: optimize(g, ["y"])[0], g, ["y"], feeds)
    _, report = optimize(g, ["y"])

    assert report.folded == ["k1"]
    assert report.merged == {"k2": "k1", "m2": "m1", "b": "a"}
    assert "unused" in report.pruned
    assert list(out.nodes) == ["x", "w", "k1", "m1", "a", "y"]


def test_optimize_names_unknown_outputs_and_kept_nodes():
    g, _, _ = _twin_matmuls()
    with pytest.raises(GraphError, match="output 'nope'"):
        optimize(g, ["nope"])
    with pytest.raises(GraphError, match="kept node 'gone'"):
        optimize(g, ["s"], keep={"gone"})


def test_folding_refuses_a_huge_value_before_computing_it():
    """(N,1) + (1,N) of submitted constants is N*N: judged from the declared shape, it is
    left unfolded (the master never allocates 40 GB); a small one still folds."""
    g = Graph()
    n = 100_000
    big = g.add(g.constant(np.zeros((n, 1), np.float32)), g.constant(np.zeros((1, n), np.float32)))
    small = g.add(g.constant(np.ones((3, 1), np.float32)), g.constant(np.ones((1, 3), np.float32)))
    out, folded = fold_constants(g, set())
    assert folded == [small.name]
    assert out.nodes[big.name].op == "add" and out.nodes[small.name].op == "constant"
