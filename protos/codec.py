"""Convert between the wire messages of ``protos/graph.proto`` and NumPy / graph objects.

This is the one module, besides the gRPC service modules, that imports ``*_pb2``.

Tensors travel as dtype + shape + raw little-endian C-order bytes. Decoding adds no
copy of its own: ``tensor_from_proto`` wraps the bytes protobuf hands out with
``np.frombuffer`` (the upb runtime copies once when the field is read), so the result
is a **read-only** view (``flags.writeable`` is False); copy it
(``np.array(a)``) before updating it in place. Decoded graphs share this: constant
values and initial values are read-only too.

A decoded ``GraphDef`` is untrusted: ``graph_from_proto`` hands its nodes to
``graph.validate.load_nodes``, which rejects unknown ops, dangling inputs, cycles and
declared shapes or dtypes that disagree with inference. Every error is a
``graph.errors.GraphError`` naming the node.

Attr values map as: ``None``, bool, int, float, str, ``np.ndarray``, and lists or
tuples of those. Lists and tuples both decode as tuples (hashable; every op reads
them alike), and NumPy scalars as the Python scalar.

Usage::

    from protos import codec
    data = codec.graph_to_bytes(g)            # g: graph.Graph
    g2 = codec.graph_from_bytes(data)         # validated graph.Graph
    msg = codec.tensor_to_proto(np.ones((2, 3), np.float32))
    arr = codec.tensor_from_proto(msg)        # read-only view of msg's bytes
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from google.protobuf.message import DecodeError

from graph.core import Graph, Node
from graph.errors import DTypeError, GraphError, ShapeError
from graph.validate import load_nodes
from protos import graph_pb2

GRAPH_DEF_VERSION = 1  # written into every GraphDef; readers reject newer versions

_DTYPE_TO_ENUM: dict[str, int] = {
    "bool": graph_pb2.DT_BOOL,
    "int8": graph_pb2.DT_INT8,
    "int16": graph_pb2.DT_INT16,
    "int32": graph_pb2.DT_INT32,
    "int64": graph_pb2.DT_INT64,
    "uint8": graph_pb2.DT_UINT8,
    "float16": graph_pb2.DT_FLOAT16,
    "float32": graph_pb2.DT_FLOAT32,
    "float64": graph_pb2.DT_FLOAT64,
}
# Little-endian on the wire, whatever the host's byte order. Built from the '<f4'
# style string so that on little-endian hosts it is the plain native dtype.
_ENUM_TO_DTYPE: dict[int, np.dtype] = {
    e: np.dtype(np.dtype(n).str.replace(">", "<")) for n, e in _DTYPE_TO_ENUM.items()
}


# ---- dtypes ----------------------------------------------------------------------
def dtype_to_proto(dtype: Any) -> int:
    """The ``DataType`` enum value for a NumPy dtype; ValueError if it has none."""
    dt = np.dtype(dtype)
    try:
        return _DTYPE_TO_ENUM[dt.name]  # .name ignores byte order: '>f4' is float32
    except KeyError:
        raise ValueError(
            f"dtype {dt} has no wire type; supported: {', '.join(_DTYPE_TO_ENUM)}"
        ) from None


def dtype_from_proto(enum: int) -> np.dtype:
    """The (little-endian) NumPy dtype for a ``DataType`` value; ValueError if invalid."""
    try:
        return _ENUM_TO_DTYPE[enum]
    except KeyError:
        name = graph_pb2.DataType.Name(enum) if enum in graph_pb2.DataType.values() else str(enum)
        raise ValueError(
            f"invalid DataType {name}; expected one of "
            f"{', '.join(graph_pb2.DataType.Name(e) for e in _ENUM_TO_DTYPE)}"
        ) from None


# ---- tensors ---------------------------------------------------------------------
def tensor_to_proto(a: np.ndarray) -> graph_pb2.TensorProto:
    """Encode an array (any strides or byte order) as a ``TensorProto``."""
    msg = graph_pb2.TensorProto()
    _write_tensor(msg, a)
    return msg


def _write_tensor(msg: graph_pb2.TensorProto, a: np.ndarray) -> None:
    # Fills msg in place, so map entries and attrs need no second copy of the bytes.
    arr = np.asarray(a)
    msg.dtype = dtype_to_proto(arr.dtype)
    msg.shape[:] = arr.shape
    # tobytes() writes C order from any strides; astype swaps bytes only when needed.
    msg.content = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C")


def tensor_from_proto(msg: graph_pb2.TensorProto) -> np.ndarray:
    """Decode a ``TensorProto`` with no copy beyond protobuf's: a read-only view of its bytes.

    Raises ValueError if the dtype is invalid, a dimension is negative, or the content
    length does not equal ``prod(shape) * itemsize``.
    """
    dtype = dtype_from_proto(msg.dtype)
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"TensorProto shape {shape} has a negative dimension")
    content = msg.content  # protobuf hands out a bytes object; no further copies below
    expected = math.prod(shape) * dtype.itemsize
    if len(content) != expected:
        raise ValueError(
            f"TensorProto content is {len(content)} bytes but shape {shape} of {dtype.name} "
            f"needs {expected} ({math.prod(shape)} elements x {dtype.itemsize} bytes); "
            "the message is truncated or its shape/dtype is wrong"
        )
    return np.frombuffer(content, dtype=dtype).reshape(shape)


# ---- attrs -----------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _write_attr(msg: graph_pb2.AttrValue, value: Any) -> None:
    if value is None:
        msg.is_none = True
    elif isinstance(value, (bool, np.bool_)):
        msg.b = bool(value)
    elif _is_int(value):
        msg.i = int(value)
    elif isinstance(value, (float, np.floating)):
        msg.f = float(value)
    elif isinstance(value, str):
        msg.s = value
    elif isinstance(value, np.ndarray):
        msg.tensor.SetInParent()
        _write_tensor(msg.tensor, value)
    elif isinstance(value, (list, tuple)):
        # SetInParent marks the oneof even for an empty sequence.
        if all(_is_int(v) for v in value):
            msg.ints.SetInParent()
            msg.ints.values.extend(int(v) for v in value)
        elif all(isinstance(v, (float, np.floating)) for v in value):
            msg.floats.SetInParent()
            msg.floats.values.extend(float(v) for v in value)
        elif all(isinstance(v, str) for v in value):
            msg.strings.SetInParent()
            msg.strings.values.extend(value)
        else:  # bools, None or mixed types: one AttrValue per element keeps each type
            msg.list.SetInParent()
            for v in value:
                _write_attr(msg.list.values.add(), v)
    else:
        raise TypeError(
            f"cannot encode a {type(value).__name__} attr value; use None, bool, int, float, "
            "str, np.ndarray or a list/tuple of those"
        )


def _read_attr(msg: graph_pb2.AttrValue) -> Any:
    kind = msg.WhichOneof("value")
    if kind is None:
        raise ValueError("AttrValue has no value set")
    if kind == "is_none":
        return None
    if kind == "tensor":
        return tensor_from_proto(msg.tensor)
    if kind in ("ints", "floats", "strings"):
        return tuple(getattr(msg, kind).values)
    if kind == "list":
        return tuple(_read_attr(v) for v in msg.list.values)
    return getattr(msg, kind)  # i, f, b, s


# ---- graphs ----------------------------------------------------------------------
def graph_to_proto(g: Graph) -> graph_pb2.GraphDef:
    """Encode a graph: its nodes in order, every attr, and the variables' initial values."""
    gd = graph_pb2.GraphDef(version=GRAPH_DEF_VERSION)
    for node in g.nodes.values():
        _write_node(gd.nodes.add(), node)
    for name, value in g.initial_values.items():
        try:
            _write_tensor(gd.initial_values[name], value)
        except ValueError as exc:
            raise DTypeError(f"initial value: {exc}", name, "variable") from exc
    return gd


def _write_node(msg: graph_pb2.NodeDef, node: Node) -> None:
    msg.name = node.name
    msg.op = node.op
    msg.inputs.extend(node.inputs)
    try:
        msg.dtype = dtype_to_proto(node.dtype)
    except ValueError as exc:
        raise DTypeError(str(exc), node.name, node.op) from exc
    msg.shape.SetInParent()
    msg.shape.dims.extend(-1 if d is None else int(d) for d in node.shape)
    for key, value in node.attrs.items():
        try:
            _write_attr(msg.attrs[key], value)
        except (TypeError, ValueError) as exc:  # ValueError: e.g. an int beyond int64
            raise GraphError(f"attr '{key}': {exc}", node.name, node.op) from exc


def graph_from_proto(gd: graph_pb2.GraphDef) -> Graph:
    """Decode and validate a ``GraphDef``; raises a ``GraphError`` naming the bad node."""
    if not 0 <= gd.version <= GRAPH_DEF_VERSION:  # 0: unset, read as version 1
        raise GraphError(
            f"GraphDef version {gd.version} is not supported (this pstrain reads up to "
            f"{GRAPH_DEF_VERSION}); upgrade pstrain on the receiving side"
        )
    records = [_node_record(i, nd) for i, nd in enumerate(gd.nodes)]
    initial_values: dict[str, np.ndarray] = {}
    for name, msg in gd.initial_values.items():
        try:
            initial_values[name] = tensor_from_proto(msg)
        except ValueError as exc:
            raise GraphError(f"initial value: {exc}", name, "variable") from exc
    return load_nodes(records, initial_values)


def _node_record(index: int, msg: graph_pb2.NodeDef) -> Mapping[str, Any]:
    """A ``load_nodes`` record for one NodeDef; checks what the proto cannot."""
    op = msg.op or None
    if not msg.name:
        raise GraphError("NodeDef has no name; every node needs a unique name", f"nodes[{index}]", op)
    name = msg.name
    try:
        dtype = dtype_from_proto(msg.dtype)
    except ValueError as exc:
        raise DTypeError(str(exc), name, op) from exc
    shape = []
    for d in msg.shape.dims:
        if d < -1:
            raise ShapeError(f"shape {tuple(msg.shape.dims)} has dimension {d}; use -1 for unknown", name, op)
        shape.append(None if d == -1 else d)
    attrs = {}
    for key, value in msg.attrs.items():
        try:
            attrs[key] = _read_attr(value)
        except ValueError as exc:
            raise GraphError(f"attr '{key}': {exc}", name, op) from exc
    return {
        "name": name,
        "op": msg.op,
        "inputs": list(msg.inputs),
        "attrs": attrs,
        "dtype": dtype.name,
        "shape": tuple(shape),
    }


def graph_to_bytes(g: Graph) -> bytes:
    """Serialize a graph; deterministic, so equal graphs give equal bytes."""
    return graph_to_proto(g).SerializeToString(deterministic=True)


def graph_from_bytes(data: bytes) -> Graph:
    """Parse and validate a serialized ``GraphDef``."""
    try:
        gd = graph_pb2.GraphDef.FromString(data)
    except DecodeError as exc:
        raise GraphError(f"not a valid GraphDef: {exc}") from exc
    return graph_from_proto(gd)


# ---- named tensors (the parameter-server payloads) ----------------------------------
def write_named(field, arrays: Mapping[str, np.ndarray]) -> int:
    """Append ``{name: array}`` to a repeated ``NamedTensor`` field; returns the bytes written."""
    total = 0
    for name, a in arrays.items():
        item = field.add()
        item.name = name
        _write_tensor(item.tensor, a)
        total += len(item.tensor.content)
    return total


def read_named(field) -> dict[str, np.ndarray]:
    """Decode a repeated ``NamedTensor`` field into ``{name: read-only array}``; a
    malformed tensor raises ValueError naming it."""
    out: dict[str, np.ndarray] = {}
    for item in field:
        if item.name in out:
            raise ValueError(f"tensor '{item.name}' appears twice in one message")
        try:
            out[item.name] = tensor_from_proto(item.tensor)
        except ValueError as exc:
            raise ValueError(f"tensor '{item.name}': {exc}") from None
    return out
