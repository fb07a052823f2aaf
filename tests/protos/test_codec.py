"""Tests for protos.codec: tensors and graphs survive the wire exactly, decoded graphs
are validated, and the committed generated modules match the .proto sources."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

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
    all_ops,
    gradients,
)
from graph.interpret import evaluate
from protos import codec, graph_pb2

ROOT = Path(__file__).resolve().parents[2]

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"]
SHAPES = [(), (0,), (5,), (2, 3), (2, 0, 4), (1, 1, 1), (3, 4, 2)]


def _random(shape: tuple, dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.random(shape) > 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dt)


def _assert_same_tensor(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.dtype.isnative
    assert got.shape == want.shape
    # Byte equality: exact for floats (NaN payloads, -0.0) as well as ints.
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


# ---- tensors ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_round_trip(dtype: str, shape: tuple) -> None:
    a = _random(shape, dtype)
    msg = codec.tensor_to_proto(a)
    assert msg.dtype == codec.dtype_to_proto(dtype)
    assert tuple(msg.shape) == shape
    assert len(msg.content) == a.nbytes
    # Decode from a fresh parse, as a receiver would.
    _assert_same_tensor(codec.tensor_from_proto(graph_pb2.TensorProto.FromString(msg.SerializeToString())), a)


def test_tensor_special_floats_round_trip() -> None:
    a = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, np.finfo(np.float32).max], np.float32)
    _assert_same_tensor(codec.tensor_from_proto(codec.tensor_to_proto(a)), a)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[::2, ::-1],
        lambda a: a.T,
        lambda a: np.asfortranarray(a),
        lambda a: np.broadcast_to(a[:1], a.shape),
        lambda a: a[:, 1],
    ],
    ids=["strided", "transposed", "fortran", "broadcast", "column"],
)
def test_tensor_non_contiguous_round_trip(view) -> None:
    a = view(np.arange(24, dtype=np.float32).reshape(6, 4))
    _assert_same_tensor(codec.tensor_from_proto(codec.tensor_to_proto(a)), a)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int16", "int32", "int64"])
def test_tensor_big_endian_input_is_little_endian_on_the_wire(dtype: str) -> None:
    native = _random((3, 4), dtype, seed=1)
    big = native.astype(np.dtype(dtype).newbyteorder(">"))
    msg = codec.tensor_to_proto(big)
    assert msg.content == native.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    _assert_same_tensor(codec.tensor_from_proto(msg), native)


def test_tensor_from_proto_is_zero_copy_and_read_only() -> None:
    out = codec.tensor_from_proto(codec.tensor_to_proto(np.ones((4, 3), np.float32)))
    assert out.flags.owndata is False
    assert out.flags.writeable is False
    base = out
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, (bytes, memoryview))  # np.frombuffer over the message's bytes


@pytest.mark.parametrize("delta", [-1, 1, -4])
def test_tensor_corrupted_content_length_raises(delta: int) -> None:
    msg = codec.tensor_to_proto(np.zeros((2, 3), np.float32))
    msg.content = msg.content[:delta] if delta < 0 else msg.content + b"\0" * delta
    with pytest.raises(ValueError, match=r"is \d+ bytes but shape \(2, 3\) of float32 needs 24"):
        codec.tensor_from_proto(msg)


def test_tensor_invalid_proto_fields_raise() -> None:
    with pytest.raises(ValueError, match="invalid DataType DT_INVALID"):
        codec.tensor_from_proto(graph_pb2.TensorProto(shape=[1], content=b"\0"))
    with pytest.raises(ValueError, match="invalid DataType 42"):
        codec.tensor_from_proto(graph_pb2.TensorProto(dtype=42, shape=[1], content=b"\0"))
    with pytest.raises(ValueError, match="negative dimension"):
        codec.tensor_from_proto(graph_pb2.TensorProto(dtype=graph_pb2.DT_INT8, shape=[-1], content=b""))


@pytest.mark.parametrize("dtype", ["complex64", "uint16", "U3", "object", "datetime64[s]"])
def test_tensor_unsupported_dtype_raises(dtype: str) -> None:
    with pytest.raises(ValueError, match="has no wire type; supported: bool, int8"):
        codec.tensor_to_proto(np.zeros(2, dtype=dtype))


# ---- attrs -------------------------------------------------------------------------
def _canon(v: Any) -> Any:
    """Attr values up to list/tuple and ndarray identity, for equality checks."""
    if isinstance(v, (list, tuple)):
        return ("seq", tuple(_canon(x) for x in v))
    if isinstance(v, np.ndarray):
        return ("nd", v.dtype.str, v.shape, v.tobytes())
    return (type(v).__name__, v)


def _attr_round_trip(value: Any) -> Any:
    msg = graph_pb2.AttrValue()
    codec._write_attr(msg, value)
    return codec._read_attr(graph_pb2.AttrValue.FromString(msg.SerializeToString()))


@pytest.mark.parametrize(
    "value",
    [
        None, True, False, 0, -3, 2**62, 0.0, 1e-3, -2.5, "", "x", [], (), [0, 1], (-1,),
        [0.5, 1.5], ["a", "b"], [True, False], [None, 3], [1, 2.5, "s", None], [[1, 2], [3]],
        np.int64(7), np.float32(0.5), np.bool_(True), np.arange(6, dtype=np.int32).reshape(2, 3),
    ],
    ids=repr,
)
def test_attr_round_trip_keeps_value_and_type(value: Any) -> None:
    got = _attr_round_trip(value)
    if isinstance(value, np.generic):  # NumPy scalars come back as the Python scalar
        assert type(got) is type(value.item()) and got == value.item()
    else:
        assert _canon(got) == _canon(value)
    if isinstance(value, (list, tuple)):
        assert isinstance(got, tuple)


def test_every_registered_op_default_attrs_round_trip() -> None:
    for name, opdef in all_ops().items():
        for key, value in opdef.attrs.items():
            assert _canon(_attr_round_trip(value)) == _canon(value), f"{name}.{key}"


def test_unencodable_attr_names_node_and_attr() -> None:
    g = Graph()
    x = g.placeholder((None, 3), name="x")
    g.nodes[g.relu(x, name="act").name].attrs["bad"] = {"a": 1}
    with pytest.raises(GraphError, match=r"node 'act' \(op 'relu'\): attr 'bad': cannot encode a dict"):
        codec.graph_to_proto(g)


# ---- graphs --------------------------------------------------------------------------
def _model() -> tuple[Graph, list[str], dict[str, np.ndarray]]:
    """A small model touching every feature the wire format must carry."""
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.placeholder((None, 4), "float32", name="x")
    labels = g.placeholder((None, 3), "float32", name="labels")
    w = g.variable(rng.standard_normal((3, 4)).astype(np.float32), name="dense/kernel")
    b = g.variable(np.zeros(3, np.float32), name="dense/bias")
    scale = g.variable(np.float32(0.5), trainable=False, name="scale")
    steps = g.variable(np.int64(0), trainable=False, name="steps")
    shift = g.constant(np.array([1.0, -2.0, 0.25], np.float32), name="shift")
    h = g.matmul(x, w, transpose_b=True, name="logits") + b
    h = g.relu(h * scale + shift, name="act")
    flat = g.reshape(h, shape=[-1], name="flat")
    back = g.reshape(flat, shape=(-1, 3), name="unflat")
    per_example = g.reduce_sum(g.square(back - labels), axis=[1], name="sq_err")
    total = g.reduce_sum(per_example, name="total")
    cols = g.reduce_sum(back, axis=(0,), keepdims=True, name="cols")
    loss = g.reduce_mean(per_example, name="loss")
    dw, db = gradients(loss, [w, b])
    fetches = [loss.name, total.name, cols.name, flat.name, dw.name, db.name, steps.name]
    feeds = {
        "x": rng.standard_normal((5, 4)).astype(np.float32),
        "labels": rng.standard_normal((5, 3)).astype(np.float32),
    }
    return g, fetches, feeds


def test_graph_round_trip_keeps_nodes_attrs_and_initial_values() -> None:
    g, _, _ = _model()
    g2 = codec.graph_from_bytes(codec.graph_to_bytes(g))
    assert list(g2.nodes) == list(g.nodes)
    for name, node in g.nodes.items():
        got = g2.nodes[name]
        assert (got.op, got.inputs, got.dtype, got.shape) == (node.op, node.inputs, node.dtype, node.shape), name
        assert {k: _canon(v) for k, v in got.attrs.items()} == {k: _canon(v) for k, v in node.attrs.items()}, name
    assert g2.nodes["x"].shape == (None, 4)
    assert g2.nodes["logits"].attrs["transpose_b"] is True
    assert g2.nodes["total"].attrs["axis"] is None
    assert g2.nodes["sq_err"].attrs["axis"] == (1,)
    assert g2.nodes["flat"].attrs["shape"] == (-1,)
    assert [v.name for v in g2.variables(trainable_only=True)] == ["dense/kernel", "dense/bias"]
    assert g2.nodes["scale"].attrs["trainable"] is False
    assert set(g2.initial_values) == set(g.initial_values)
    for name, value in g.initial_values.items():
        _assert_same_tensor(g2.initial_values[name], value)


def test_graph_round_trip_evaluates_identically() -> None:
    g, fetches, feeds = _model()
    g2 = codec.graph_from_proto(graph_pb2.GraphDef.FromString(codec.graph_to_proto(g).SerializeToString()))
    before = evaluate(g, fetches, feeds=feeds)
    after = evaluate(g2, fetches, feeds=feeds)
    for want, got in zip(before, after):
        _assert_same_tensor(got, want)


def test_graph_to_bytes_is_deterministic() -> None:
    assert codec.graph_to_bytes(_model()[0]) == codec.graph_to_bytes(_model()[0])


def test_graph_def_fields() -> None:
    gd = codec.graph_to_proto(_model()[0])
    assert gd.version == codec.GRAPH_DEF_VERSION
    x = next(n for n in gd.nodes if n.name == "x")
    assert (x.op, x.dtype, list(x.shape.dims)) == ("placeholder", graph_pb2.DT_FLOAT32, [-1, 4])
    shift = next(n for n in gd.nodes if n.name == "shift")
    assert shift.attrs["value"].WhichOneof("value") == "tensor"
    assert gd.initial_values["steps"].dtype == graph_pb2.DT_INT64


# ---- malformed GraphDefs ---------------------------------------------------------------
def _small_def() -> graph_pb2.GraphDef:
    g = Graph()
    x = g.placeholder((None, 2), name="x")
    w = g.variable(np.ones((2, 2), np.float32), name="w")
    g.relu(g.matmul(x, w, name="mm"), name="out")
    return codec.graph_to_proto(g)


def _node(gd: graph_pb2.GraphDef, name: str) -> graph_pb2.NodeDef:
    return next(n for n in gd.nodes if n.name == name)


def _unknown_op(gd):
    _node(gd, "out").op = "frobnicate"


def _dangling(gd):
    _node(gd, "mm").inputs[1] = "nowhere"


def _cycle(gd):
    _node(gd, "mm").inputs[0] = "out"


def _dtype_clash(gd):
    _node(gd, "out").dtype = graph_pb2.DT_FLOAT64


def _shape_clash(gd):
    _node(gd, "mm").shape.dims[:] = [-1, 3]


def _no_dtype(gd):
    _node(gd, "out").dtype = graph_pb2.DT_INVALID


def _bad_dtype_enum(gd):
    _node(gd, "out").dtype = 99


def _bad_dim(gd):
    _node(gd, "x").shape.dims[0] = -2


def _unset_attr(gd):
    _node(gd, "mm").attrs["transpose_a"].Clear()


def _unknown_attr(gd):
    _node(gd, "out").attrs["alpha"].f = 0.1


def _missing_initial_value(gd):
    del gd.initial_values["w"]


def _corrupt_initial_value(gd):
    gd.initial_values["w"].content = b"\0" * 3


def _duplicate(gd):
    gd.nodes.add().CopyFrom(_node(gd, "out"))


@pytest.mark.parametrize(
    "corrupt, error, node, message",
    [
        (_unknown_op, UnknownOpError, "out", "unknown op 'frobnicate'"),
        (_dangling, DanglingInputError, "mm", "input 'nowhere' does not exist"),
        (_cycle, CycleError, ("mm", "out"), "cycle"),  # either node on the cycle
        (_dtype_clash, DTypeError, "out", "declared dtype float64"),
        (_shape_clash, ShapeError, "mm", r"declared shape \(None, 3\)"),
        (_no_dtype, DTypeError, "out", "invalid DataType DT_INVALID"),
        (_bad_dtype_enum, DTypeError, "out", "invalid DataType 99"),
        (_bad_dim, ShapeError, "x", "dimension -2; use -1 for unknown"),
        (_unset_attr, GraphError, "mm", "attr 'transpose_a': AttrValue has no value set"),
        (_unknown_attr, GraphError, "out", r"unknown attrs \['alpha'\]"),
        (_missing_initial_value, GraphError, "w", "variable has no initial value"),
        (_corrupt_initial_value, GraphError, "w", "initial value: TensorProto content is 3 bytes"),
        (_duplicate, GraphError, "out", "duplicate node name"),
    ],
    ids=lambda p: getattr(p, "__name__", None),
)
def test_malformed_graph_def_raises_naming_the_node(corrupt, error, node: str | tuple, message: str) -> None:
    gd = _small_def()
    corrupt(gd)
    with pytest.raises(error, match=message) as info:
        codec.graph_from_bytes(gd.SerializeToString())
    assert info.value.node in ((node,) if isinstance(node, str) else node)
    assert f"node '{info.value.node}'" in str(info.value)


def test_cycle_error_names_the_cycle() -> None:
    gd = _small_def()
    _cycle(gd)
    with pytest.raises(CycleError, match="mm -> out -> mm|out -> mm -> out"):
        codec.graph_from_proto(gd)


def test_node_without_name_is_named_by_position() -> None:
    gd = _small_def()
    gd.nodes[2].name = ""
    with pytest.raises(GraphError, match=r"node 'nodes\[2\]' \(op 'matmul'\): NodeDef has no name"):
        codec.graph_from_proto(gd)


def test_newer_graph_def_version_is_rejected() -> None:
    gd = _small_def()
    gd.version = codec.GRAPH_DEF_VERSION + 1
    with pytest.raises(GraphError, match="version 2 is not supported"):
        codec.graph_from_proto(gd)


def test_unset_version_reads_as_current() -> None:
    gd = _small_def()
    gd.ClearField("version")
    assert list(codec.graph_from_proto(gd).nodes) == ["x", "w", "mm", "out"]


def test_garbage_bytes_raise_graph_error() -> None:
    with pytest.raises(GraphError, match="not a valid GraphDef"):
        codec.graph_from_bytes(b"\xff\xff\xff\xff")


# ---- generated code --------------------------------------------------------------------
def test_generated_protos_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
