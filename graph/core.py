"""The graph builder: nodes, symbolic tensors and ``Graph``.

Usage::

    import numpy as np
    from graph import Graph, gradients
    g = Graph()
    x = g.placeholder((None, 3), "float32", name="x")
    w = g.variable(np.ones((3, 2), np.float32), name="w")
    loss = g.reduce_mean(g.square(x @ w))
    (dw,) = gradients(loss, [w])

Every op in the registry is a method of ``Graph`` (``g.relu(x)``, ``g.matmul(a, b,
transpose_b=True)``); Python operators on tensors build add/sub/mul/div/neg/matmul.
Shapes and dtypes are inferred as each node is added, so a mistake raises at once,
naming the node.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from graph import dtypes
from graph.errors import GraphError, ShapeError
from graph.registry import TensorSpec, get_op


@dataclass
class Node:
    """One op instance. ``inputs`` are names of other nodes (every op has one output)."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any]
    dtype: np.dtype
    shape: tuple

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.shape, self.dtype)


class Tensor:
    """A symbolic handle on a node's output."""

    __array_priority__ = 1000  # so ndarray + Tensor calls Tensor.__radd__

    def __init__(self, graph: "Graph", name: str):
        self.graph = graph
        self.name = name

    @property
    def node(self) -> Node:
        return self.graph.nodes[self.name]

    @property
    def shape(self) -> tuple:
        return self.node.shape

    @property
    def dtype(self) -> np.dtype:
        return self.node.dtype

    @property
    def op(self) -> str:
        return self.node.op

    def __repr__(self) -> str:
        return f"<Tensor '{self.name}' op={self.op} shape={self.shape} dtype={self.dtype}>"

    def __add__(self, o):
        return self.graph.add(self, o)

    def __radd__(self, o):
        return self.graph.add(o, self)

    def __sub__(self, o):
        return self.graph.sub(self, o)

    def __rsub__(self, o):
        return self.graph.sub(o, self)

    def __mul__(self, o):
        return self.graph.mul(self, o)

    def __rmul__(self, o):
        return self.graph.mul(o, self)

    def __truediv__(self, o):
        return self.graph.div(self, o)

    def __rtruediv__(self, o):
        return self.graph.div(o, self)

    def __neg__(self):
        return self.graph.neg(self)

    def __matmul__(self, o):
        return self.graph.matmul(self, o)

    def __rmatmul__(self, o):
        return self.graph.matmul(o, self)

    __hash__ = object.__hash__


_NAME_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_./:-]*$")


@dataclass
class Graph:
    """A dataflow graph under construction; nodes are kept in topological order."""

    nodes: dict[str, Node] = field(default_factory=dict)
    # initial values of variables, by node name
    initial_values: dict[str, np.ndarray] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict, repr=False)

    # ---- sources -------------------------------------------------------------
    def placeholder(self, shape: Sequence[int | None], dtype="float32", name: str | None = None) -> Tensor:
        """An input fed at run time; ``None`` in ``shape`` is unknown (the batch)."""
        shape = tuple(None if d is None or d == -1 else int(d) for d in shape)
        return self._add_node("placeholder", [], {}, TensorSpec(shape, dtypes.as_dtype(dtype, name)), name)

    def variable(self, initial_value, trainable: bool = True, name: str | None = None, dtype=None) -> Tensor:
        """A variable with the given initial value (an array or a Python number)."""
        value = np.array(initial_value, dtype=dtype if dtype is not None else None)
        if dtype is None and value.dtype == np.float64 and not isinstance(initial_value, np.ndarray):
            value = value.astype(np.float32)
        spec = TensorSpec(tuple(value.shape), dtypes.as_dtype(value.dtype, name))
        t = self._add_node("variable", [], {"trainable": bool(trainable)}, spec, name)
        self.initial_values[t.name] = value
        return t

    def constant(self, value, dtype=None, name: str | None = None) -> Tensor:
        """A constant; Python floats become float32 unless ``dtype`` says otherwise."""
        if isinstance(value, Tensor):
            return value
        if dtype is None and isinstance(value, (bool, int, float)):
            dtype = dtypes.weak_scalar_dtype(value, None)
        arr = np.array(value, dtype=dtype)
        if dtype is None and arr.dtype == np.float64 and not isinstance(value, np.ndarray):
            arr = arr.astype(np.float32)
        if arr.dtype.kind in "USOVM":
            raise dtypes.DTypeError(f"a constant of dtype {arr.dtype} is not supported", name)
        spec = TensorSpec(tuple(arr.shape), dtypes.as_dtype(arr.dtype, name))
        return self._add_node("constant", [], {"value": arr}, spec, name)

    # ---- ops -----------------------------------------------------------------
    def op(self, op_type: str, inputs: Iterable, name: str | None = None, **attrs) -> Tensor:
        """Add a node of any registered op type; returns its output tensor."""
        opdef = get_op(op_type, name)
        inputs = list(inputs)
        if opdef.num_inputs is not None and len(inputs) != opdef.num_inputs:
            raise GraphError(
                f"takes {opdef.num_inputs} inputs, got {len(inputs)}", name or op_type, op_type
            )
        unknown = set(attrs) - set(opdef.attrs)
        if unknown:
            raise GraphError(
                f"unknown attrs {sorted(unknown)}; allowed: {sorted(opdef.attrs)}", name or op_type, op_type
            )
        # Sequences become tuples so attrs hash (CSE) and compare equal after decoding.
        full_attrs = {**opdef.attrs, **{k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}}
        tensors = self._as_tensors(inputs, name or op_type)
        specs = [t.node.spec for t in tensors]
        node_name = self._unique(name or op_type)
        spec = opdef.infer(node_name, specs, full_attrs)
        return self._add_node(op_type, [t.name for t in tensors], full_attrs, spec, node_name, reserved=True)

    def __getattr__(self, item: str):
        # g.relu(x), g.matmul(a, b, transpose_b=True), ...: every registered op.
        if item.startswith("_"):
            raise AttributeError(item)
        from graph.registry import all_ops

        if item not in all_ops():
            raise AttributeError(f"Graph has no op or attribute '{item}'")

        def build(*inputs, name: str | None = None, **attrs):
            return self.op(item, inputs, name=name, **attrs)

        return build

    # ---- queries -------------------------------------------------------------
    def tensor(self, name: str) -> Tensor:
        if name not in self.nodes:
            raise GraphError("no such node in the graph", name)
        return Tensor(self, name)

    def variables(self, trainable_only: bool = False) -> list[Tensor]:
        return [
            Tensor(self, n.name)
            for n in self.nodes.values()
            if n.op == "variable" and (n.attrs["trainable"] or not trainable_only)
        ]

    def placeholders(self) -> list[Tensor]:
        return [Tensor(self, n.name) for n in self.nodes.values() if n.op == "placeholder"]

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in self.nodes}
        for n in self.nodes.values():
            for i in n.inputs:
                out[i].append(n.name)
        return out

    # ---- internals -----------------------------------------------------------
    def _as_tensors(self, inputs: list, where: str) -> list[Tensor]:
        """Turn Python scalars and arrays into constants; scalars take the dtype of
        the tensor they meet (NumPy's weak-scalar rule, float32 for bare floats)."""
        other = next((t.dtype for t in inputs if isinstance(t, Tensor)), None)
        out = []
        for t in inputs:
            if isinstance(t, Tensor):
                if t.graph is not self:
                    raise GraphError(f"input '{t.name}' belongs to another graph", where)
                out.append(t)
            elif isinstance(t, (bool, int, float, np.number)) and np.ndim(t) == 0:
                out.append(self.constant(t, dtype=dtypes.weak_scalar_dtype(t, other, where)))
            elif isinstance(t, np.ndarray):
                out.append(self.constant(t))
            elif hasattr(t, "__graph_tensor__"):  # e.g. an eager tensor read while tracing (pstrain/eager.py)
                out.append(t.__graph_tensor__(self))
            else:
                raise dtypes.DTypeError(f"cannot use {type(t).__name__} {t!r} as an op input", where)
        return out

    def _unique(self, base: str) -> str:
        if not _NAME_OK.match(base):
            raise GraphError("node names must start with a letter or '_' and use [A-Za-z0-9_./:-]", base)
        if base not in self.nodes and base not in self._counts:
            self._counts[base] = 0
            return base
        while True:
            self._counts[base] = self._counts.get(base, 0) + 1
            cand = f"{base}_{self._counts[base]}"
            if cand not in self.nodes:
                self._counts[cand] = 0
                return cand

    def _add_node(self, op, inputs, attrs, spec: TensorSpec, name, reserved: bool = False) -> Tensor:
        if not reserved:
            name = self._unique(name or op)
        for d in spec.shape:
            if d is not None and d < 0:
                raise ShapeError(f"negative dimension in shape {spec.shape}", name, op)
        self.nodes[name] = Node(name, op, list(inputs), dict(attrs), np.dtype(spec.dtype), tuple(spec.shape))
        return Tensor(self, name)
