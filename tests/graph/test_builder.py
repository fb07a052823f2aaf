"""Building and loading graphs: a bad input raises one clear error naming the node;
dtypes promote like NumPy; shapes are inferred as nodes are added."""
from __future__ import annotations

import numpy as np
import pytest

from graph import (
    CycleError,
    DanglingInputError,
    DTypeError,
    Graph,
    GraphError,
    ShapeError,
    UnknownOpError,
    load_nodes,
)
from graph.interpret import evaluate


def _raises(cls, node, fn):
    """``fn()`` raises exactly ``cls`` (or a subclass), and the message names ``node``."""
    with pytest.raises(cls) as info:
        fn()
    assert f"'{node}'" in str(info.value), str(info.value)
    assert info.value.node == node
    return info.value


def _rec(name, op, inputs=(), dtype="float32", shape=(None, 3), **attrs):
    return {"name": name, "op": op, "inputs": list(inputs), "attrs": attrs, "dtype": dtype, "shape": list(shape)}


# ---- shapes ---------------------------------------------------------------------------------
def test_broadcast_mismatch_names_the_node():
    g = Graph()
    a, b = g.placeholder((3, 4)), g.placeholder((5,))
    err = _raises(ShapeError, "bad_add", lambda: g.add(a, b, name="bad_add"))
    assert "(3, 4)" in str(err) and "(5,)" in str(err)


@pytest.mark.parametrize(
    "sa, sb, attrs",
    [((3, 4), (5, 2), {}), ((3, 4), (3, 2), {"transpose_b": True}), ((4, 3), (4, 2), {}), ((2, 3, 4), (2, 5, 6), {})],
    ids=str,
)
def test_matmul_inner_dims_mismatch_names_the_node(sa, sb, attrs):
    g = Graph()
    a, b = g.placeholder(sa), g.placeholder(sb)
    err = _raises(ShapeError, "dense/mm", lambda: g.matmul(a, b, name="dense/mm", **attrs))
    assert "inner dimensions" in str(err)


def test_matmul_batch_dims_must_broadcast():
    g = Graph()
    a, b = g.placeholder((2, 3, 4)), g.placeholder((3, 4, 5))
    _raises(ShapeError, "mm", lambda: g.matmul(a, b, name="mm"))


def test_matmul_of_a_vector_is_a_shape_error():
    g = Graph()
    _raises(ShapeError, "mm", lambda: g.matmul(g.placeholder((3,)), g.placeholder((3, 2)), name="mm"))


@pytest.mark.parametrize("shape, target", [((2, 6), (5, -1)), ((2, 6), (5, 2)), ((2, 6), (-1, -1)), ((2, 6), (0, -1)),
                                           ((None, 6), (-1, -1)), ((2, 6), (-3, -4))], ids=str)
def test_reshape_element_count_mismatch(shape, target):
    g = Graph()
    x = g.placeholder(shape)
    _raises(ShapeError, "flat", lambda: g.reshape(x, shape=target, name="flat"))


@pytest.mark.parametrize(
    "shape, target, want",
    [((2, 6), (-1,), (12,)), ((2, 6), (3, -1), (3, 4)), ((None, 6), (-1, 4), (None, 4)),
     ((None, 6), (4, -1), (4, None)), ((None, 2, 3), (None, 6), (None, 6)), ((None, 3), (-1,), (None,)),
     ((2, 3), (6,), (6,))],
    ids=str,
)
def test_reshape_infers_the_unknown_dim(shape, target, want):
    g = Graph()
    assert g.reshape(g.placeholder(shape), shape=target).shape == want


def test_reshape_of_an_unknown_batch_runs():
    g = Graph()
    x = g.placeholder((None, 6), "float64", name="x")
    y = g.reshape(x, shape=(-1, 4))
    for n in (2, 4):
        assert evaluate(g, [y], feeds={"x": np.zeros((n, 6))})[0].shape == (n * 6 // 4, 4)


@pytest.mark.parametrize(
    "build",
    [
        lambda g, x: g.transpose(x, perm=(0, 0), name="bad"),
        lambda g, x: g.expand_dims(x, axis=4, name="bad"),
        lambda g, x: g.reduce_sum(x, axis=2, name="bad"),
        lambda g, x: g.batch_norm(x, *(g.placeholder((4,)) for _ in range(4)), name="bad"),
        lambda g, x: g.mse(x, g.placeholder((2, 4)), name="bad"),
        lambda g, x: g.sparse_categorical_crossentropy(x, g.placeholder((3,), "int32"), name="bad"),
    ],
    ids=["perm", "expand_dims_axis", "reduce_axis", "batch_norm_gamma", "loss_shapes", "sparse_labels"],
)
def test_other_shape_errors_name_the_node(build):
    g = Graph()
    _raises(ShapeError, "bad", lambda: build(g, g.placeholder((2, 3))))


# ---- unknown ops ---------------------------------------------------------------------------------
def test_unknown_op_via_builder():
    g = Graph()
    x = g.placeholder((2,))
    err = _raises(UnknownOpError, "mine", lambda: g.op("nope", [x], name="mine"))
    assert "nope" in str(err)


def test_unknown_op_via_load_nodes():
    records = [_rec("x", "placeholder"), _rec("layer1", "nope", ["x"])]
    err = _raises(UnknownOpError, "layer1", lambda: load_nodes(records))
    assert "'nope'" in str(err)


def test_unknown_graph_method_is_an_attribute_error():
    with pytest.raises(AttributeError, match="nope"):
        Graph().nope


# ---- load_nodes: structure -----------------------------------------------------------------------------
def test_cycle_via_load_nodes():
    records = [_rec("x", "placeholder"), _rec("a", "add", ["x", "b"]), _rec("b", "relu", ["a"])]
    err = _raises(CycleError, "b", lambda: load_nodes(records))
    assert "a -> b -> a" in str(err) or "b -> a -> b" in str(err)


def test_self_loop_via_load_nodes():
    _raises(CycleError, "a", lambda: load_nodes([_rec("a", "relu", ["a"])]))


def test_dangling_input_via_load_nodes():
    records = [_rec("x", "placeholder"), _rec("h", "add", ["x", "ghost"])]
    err = _raises(DanglingInputError, "h", lambda: load_nodes(records))
    assert "'ghost'" in str(err)


def test_declared_dtype_mismatch_via_load_nodes():
    records = [_rec("x", "placeholder"), _rec("h", "relu", ["x"], dtype="float64")]
    err = _raises(DTypeError, "h", lambda: load_nodes(records))
    assert "float64" in str(err) and "float32" in str(err)


def test_declared_shape_mismatch_via_load_nodes():
    records = [_rec("x", "placeholder"), _rec("h", "relu", ["x"], shape=(None, 4))]
    _raises(ShapeError, "h", lambda: load_nodes(records))


def test_shape_error_inside_load_nodes_names_the_node():
    records = [_rec("x", "placeholder"), _rec("y", "placeholder", shape=(None, 4)), _rec("s", "add", ["x", "y"])]
    _raises(ShapeError, "s", lambda: load_nodes(records))


def test_load_nodes_round_trip_evaluates_the_same():
    g = Graph()
    x = g.placeholder((None, 3), "float64", name="x")
    w = g.variable(np.arange(6.0).reshape(3, 2), name="w")
    y = g.reduce_mean(g.relu(x @ w - 2.0), axis=0, name="y")
    records = [_rec(n.name, n.op, n.inputs, str(n.dtype), n.shape, **n.attrs) for n in g.nodes.values()]
    h = load_nodes(records, g.initial_values)
    feeds = {"x": np.arange(12.0).reshape(4, 3)}
    np.testing.assert_array_equal(evaluate(h, ["y"], feeds=feeds)[0], evaluate(g, [y], feeds=feeds)[0])


# ---- dtypes -----------------------------------------------------------------------------------------------------
def test_float32_matmul_float64_is_a_dtype_error():
    g = Graph()
    a, b = g.placeholder((2, 3), "float32"), g.placeholder((3, 4), "float64")
    err = _raises(DTypeError, "dense", lambda: g.matmul(a, b, name="dense"))
    assert "float32" in str(err) and "float64" in str(err)


@pytest.mark.parametrize(
    "build",
    [
        lambda g: g.add(g.placeholder((2,)), "a", name="bad"),
        lambda g: g.mul("a", g.placeholder((2,)), name="bad"),
        lambda g: g.add(g.placeholder((2,)), [1.0, 2.0], name="bad"),
        lambda g: g.constant("abc", name="bad"),
        lambda g: g.constant(np.array(["a", "b"]), name="bad"),
        lambda g: g.variable(np.array(["a"]), name="bad"),
        lambda g: g.placeholder((2,), "str", name="bad"),
        lambda g: g.placeholder((2,), "complex64", name="bad"),
        lambda g: g.placeholder((2,), "not-a-dtype", name="bad"),
    ],
    ids=["add_str", "rmul_str", "list", "const_str", "const_str_array", "variable_str", "placeholder_str",
         "complex", "garbage_dtype"],
)
def test_unsupported_inputs_raise_dtype_error(build):
    _raises(DTypeError, "bad", lambda: build(Graph()))


@pytest.mark.parametrize(
    "build",
    [
        lambda g: g.relu(g.placeholder((2,), "int32"), name="bad"),
        lambda g: g.reduce_mean(g.placeholder((2,), "int64"), name="bad"),
        lambda g: g.neg(g.placeholder((2,), "bool"), name="bad"),
        lambda g: g.sign(g.placeholder((2,), "bool"), name="bad"),
        lambda g: g.square(g.placeholder((2,), "bool"), name="bad"),
        lambda g: g.sub(g.placeholder((2,), "bool"), g.placeholder((2,), "bool"), name="bad"),
        lambda g: g.mse(g.placeholder((2,)), g.placeholder((2,), "float64"), name="bad"),
        lambda g: g.sparse_categorical_crossentropy(g.placeholder((2, 3)), g.placeholder((2,)), name="bad"),
        lambda g: g.add(g.placeholder((2,), "uint8"), 300, name="bad"),
    ],
    ids=["relu_int", "mean_int", "neg_bool", "sign_bool", "square_bool", "sub_bool", "loss_dtypes", "float_labels",
         "int_overflow"],
)
def test_op_dtype_errors_name_the_node(build):
    _raises(DTypeError, "bad", lambda: build(Graph()))


def test_int_scalar_overflow_is_a_dtype_error():
    with pytest.raises(DTypeError, match="300 does not fit the uint8"):
        Graph().placeholder((2,), "uint8") + 300


def test_division_by_zero_gives_inf_like_numpy():
    g = Graph()
    x = g.placeholder((3,), "float32", name="x")
    xv = np.array([1.0, -2.0, 0.0], np.float32)
    with np.errstate(all="ignore"):
        want = xv / np.float32(0.0)
    (got,) = evaluate(g, [x / 0.0], feeds={"x": xv})
    np.testing.assert_array_equal(got, want)  # inf, -inf, nan
    assert got.dtype == np.float32


def test_integer_division_is_true_division_like_numpy():
    g = Graph()
    a, b = g.placeholder((3,), "int32", name="a"), g.placeholder((3,), "int32", name="b")
    av, bv = np.array([1, 7, 0], np.int32), np.array([2, 0, 0], np.int32)
    with np.errstate(all="ignore"):
        want = av / bv
    (got,) = evaluate(g, [a / b], feeds={"a": av, "b": bv})
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype == np.float64


def _ph(g, dtype):
    return g.placeholder((2,), dtype)


@pytest.mark.parametrize(
    "a, b",
    [("int32", "int64"), ("float32", "float64"), ("int8", "int16"), ("uint8", "int8"), ("int32", "float32"),
     ("int64", "float32"), ("bool", "int32"), ("float16", "float32"), ("uint8", "float16"), ("bool", "bool")],
)
@pytest.mark.parametrize("op", ["add", "mul", "maximum", "div"])
def test_tensor_tensor_promotion_follows_numpy(op, a, b):
    if op == "div" and a == b == "bool":
        pytest.skip("div of bools is an error")
    g = Graph()
    want = getattr(np, {"add": "add", "mul": "multiply", "maximum": "maximum", "div": "true_divide"}[op])(
        np.ones(2, a), np.ones(2, b)
    ).dtype
    assert g.op(op, [_ph(g, a), _ph(g, b)]).dtype == want


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"])
@pytest.mark.parametrize("scalar", [0.5, 3, True])
def test_python_scalars_are_weak_like_numpy(dtype, scalar):
    g = Graph()
    want = (np.ones(2, dtype) + scalar).dtype
    assert (_ph(g, dtype) + scalar).dtype == want
    assert (scalar * _ph(g, dtype)).dtype == (scalar * np.ones(2, dtype)).dtype


def test_promotion_examples():
    g = Graph()
    assert (_ph(g, "int32") + _ph(g, "int64")).dtype == np.int64
    assert (_ph(g, "float32") + _ph(g, "float64")).dtype == np.float64
    assert (_ph(g, "float32") + 0.5).dtype == np.float32
    assert (_ph(g, "float64") + 0.5).dtype == np.float64
    assert g.constant(0.5).dtype == np.float32  # a bare Python float: float32, not NumPy's float64
    assert g.constant(2).dtype == np.int64
    assert g.variable(1.5).dtype == np.float32
    assert g.variable([1.0, 2.0]).dtype == np.float32
    assert g.variable(np.array([1.0, 2.0])).dtype == np.float64  # an array keeps its dtype


def test_evaluated_values_have_the_inferred_dtype():
    g = Graph()
    x = g.placeholder((3,), "int32", name="x")
    b = g.placeholder((3,), "bool", name="b")
    xv, bv = np.array([1, 2, 3], np.int32), np.array([True, True, False])
    outs = [x + 0.5, x * 2, g.reduce_sum(x), g.reduce_sum(b), g.abs(b), g.step(x), x / 2]
    for t, v in zip(outs, evaluate(g, outs, feeds={"x": xv, "b": bv})):
        assert v.dtype == t.dtype, t
    assert evaluate(g, [g.reduce_sum(b)], feeds={"b": bv})[0] == 2  # not True


# ---- attrs and other clear errors -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, cls",
    [
        (lambda g, x: g.relu(x, foo=1, name="bad"), GraphError),
        (lambda g, x: g.dropout(x, rate=1.0, name="bad"), GraphError),
        (lambda g, x: g.l2_penalty(x, l=-1.0, name="bad"), GraphError),
        (lambda g, x: g.softmax(x, axis=[0, 1], name="bad"), GraphError),
        (lambda g, x: g.softmax(x, axis=2, name="bad"), ShapeError),
        (lambda g, x: g.batch_norm(x, *(g.placeholder((3,)) for _ in range(4)), axis=[1], name="bad"), GraphError),
        (lambda g, x: g.reduce_sum(x, axis=[1, -1], name="bad"), GraphError),
        (lambda g, x: g.op("add", [x], name="bad"), GraphError),
    ],
    ids=["unknown_attr", "dropout_rate", "penalty", "softmax_axis_list", "softmax_axis_range", "batch_norm_axis_list",
         "repeated_axis", "arity"],
)
def test_bad_attrs_name_the_node(build, cls):
    g = Graph()
    _raises(cls, "bad", lambda: build(g, g.placeholder((2, 3))))


def test_run_time_errors_name_the_node():
    g = Graph()
    p = g.placeholder((2, 3), "float64", name="p")
    labels = g.placeholder((2,), "int64", name="labels")
    loss = g.sparse_categorical_crossentropy(p, labels, name="xent")
    with pytest.raises(GraphError, match="'xent'.*label 3 is out of range"):
        evaluate(g, [loss], feeds={"p": np.full((2, 3), 1 / 3), "labels": np.array([0, 3])})
    with pytest.raises(GraphError, match="'p'.*not fed"):
        evaluate(g, [loss], feeds={"labels": np.array([0, 1])})
