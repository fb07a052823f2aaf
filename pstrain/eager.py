"""Eager tensors, variables, ``GradientTape`` and traced functions: ``import pstrain as pt``.

Every eager op is an op of the graph IR's registry, run at once: its ``infer`` checks
shapes and dtypes (the same named errors as the graph builder) and its NumPy reference
computes the value; there is no second implementation of any op. A ``GradientTape``
records the ops run while it is active; ``tape.gradient`` rebuilds them as a graph and
applies ``graph.gradients``, so eager and graph gradients come from the same rules.
``pt.function`` traces a Python function of tensors into a ``graph.Graph``.

Usage::

    import pstrain as pt

    w = pt.Variable([[1.0], [2.0]], name="w")
    x = pt.constant([[3.0, 4.0]])
    with pt.GradientTape() as tape:
        loss = pt.reduce_sum(pt.square(x @ w - 1.0))
    dw = tape.gradient(loss, w)              # a Tensor of w's shape

    @pt.function
    def predict(x):
        return pt.sigmoid(x @ w)
    predict(x)                               # traced once per input signature
    predict.graph_for(x)                     # the graph.Graph that would be shipped
"""
from __future__ import annotations

import contextlib
import copy
import threading
import types
from typing import Any, Callable, Sequence

import numpy as np

from graph import dtypes
from graph.autodiff import gradients
from graph.core import Graph
from graph.core import Tensor as GraphTensor
from graph.errors import DTypeError, GraphError
from graph.interpret import evaluate
from graph.registry import RunContext, TensorSpec, get_op

float16, float32, float64 = np.dtype("float16"), np.dtype("float32"), np.dtype("float64")
int32, int64, bool_ = np.dtype("int32"), np.dtype("int64"), np.dtype("bool")

_CALL = "pt.function"  # the op name of a traced call recorded on a tape (see Function.__call__)
_local = threading.local()  # .tapes: active tapes; .trace: the Trace being built (pt.function)
_CTX = RunContext(training=True)


def _tapes() -> list:
    if not hasattr(_local, "tapes"):
        _local.tapes = []
    return _local.tapes


def _trace():
    return getattr(_local, "trace", None)


# ---- values -------------------------------------------------------------------------------------------
def _to_array(value, dtype=None) -> np.ndarray:
    """A Python value as an array with TensorFlow's dtype rules: Python floats (alone or
    mixed with ints) are float32, Python ints int32, NumPy arrays keep their dtype."""
    if isinstance(value, Tensor):
        arr = value._value
        return arr if dtype is None else _cast_array(arr, dtype)
    if isinstance(value, (str, bytes)) or (isinstance(value, (list, tuple)) and _has_text(value)):
        raise TypeError(f"cannot make a tensor of {value!r}: strings are not numbers")
    if dtype is not None:
        dt = dtypes.as_dtype(dtype)
        try:
            return np.array(value, dtype=dt)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"cannot make a {dt} tensor of {value!r}: {exc}") from None
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        arr = np.asarray(value)
    else:
        try:
            arr = np.array(value)
        except ValueError as exc:  # ragged lists
            raise ValueError(f"cannot make a tensor of {value!r}: {exc}") from None
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        elif arr.dtype.kind in "iu":
            arr = arr.astype(np.int32) if np.all((arr >= -2**31) & (arr < 2**31)) else arr.astype(np.int64)
    if arr.dtype.kind in "USOVM":
        raise TypeError(f"cannot make a tensor of {value!r} (dtype {arr.dtype})")
    return np.asarray(arr, dtype=dtypes.as_dtype(arr.dtype), order="C")


def _has_text(value) -> bool:
    return any(isinstance(v, (str, bytes)) or (isinstance(v, (list, tuple)) and _has_text(v)) for v in value)


def _cast_array(arr: np.ndarray, dtype) -> np.ndarray:
    return arr.astype(dtypes.as_dtype(dtype), copy=False)


class Tensor:
    """An immutable eager value: ``.numpy()``, ``.shape``, ``.dtype``, operators."""

    __array_priority__ = 100  # numpy array <op> Tensor defers to Tensor's reflected ops

    def __init__(self, value, dtype=None):
        arr = _to_array(value, dtype)
        if isinstance(value, np.ndarray) and arr.flags.writeable and np.may_share_memory(arr, value):
            arr = arr.copy()  # a snapshot: the caller's array stays writable and the tensor stays as it was
        arr.setflags(write=False)
        self._value = arr

    @classmethod
    def _wrap(cls, arr: np.ndarray) -> "Tensor":
        """A tensor of an array nobody else writes (an op's result): no checks, no copy."""
        t = cls.__new__(cls)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        arr.setflags(write=False)
        t._value = arr
        return t

    def numpy(self) -> np.ndarray:
        return self._value.copy()

    @property
    def shape(self) -> tuple:
        return tuple(self._value.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._value.dtype

    @property
    def ndim(self) -> int:
        return self._value.ndim

    def __len__(self) -> int:
        if not self._value.ndim:
            raise TypeError("a scalar tensor has no len()")
        return len(self._value)

    def __array__(self, dtype=None, copy=None):
        return self._value.astype(dtype) if dtype is not None else self._value.copy()

    def __float__(self) -> float:
        return float(self._value)

    def __int__(self) -> int:
        return int(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __graph_tensor__(self, graph: Graph) -> GraphTensor:
        """This tensor as a node of ``graph`` (the graph pt.function is tracing)."""
        trace = _trace()
        if trace is None or trace.graph is not graph:
            return graph.constant(self._value)
        return trace.lift(self)

    def __repr__(self) -> str:
        return f"<pt.{type(self).__name__}: shape={self.shape}, dtype={self.dtype.name}, numpy={self._value!r}>"

    # operators: the registry's ops, Python scalars weakly typed as in the graph builder
    def __add__(self, o): return add(self, o)
    def __radd__(self, o): return add(o, self)
    def __sub__(self, o): return subtract(self, o)
    def __rsub__(self, o): return subtract(o, self)
    def __mul__(self, o): return multiply(self, o)
    def __rmul__(self, o): return multiply(o, self)
    def __truediv__(self, o): return divide(self, o)
    def __rtruediv__(self, o): return divide(o, self)
    def __matmul__(self, o): return matmul(self, o)
    def __rmatmul__(self, o): return matmul(o, self)
    def __pow__(self, o): return pow(self, o)
    def __rpow__(self, o): return pow(o, self)
    def __neg__(self): return negative(self)


class Variable(Tensor):
    """A mutable tensor; a trainable one is watched by every GradientTape automatically.
    ``assign`` of another shape raises and leaves the value as it was."""

    _count = 0

    def __init__(self, value, trainable: bool = True, name: str | None = None, dtype=None):
        super().__init__(value, dtype)
        Variable._count += 1
        self.trainable = bool(trainable)
        self.name = name or f"Variable_{Variable._count}"

    def _set(self, value, how: str, owned: bool = False) -> "Variable":
        """``owned``: ``value`` is an array computed here, nobody else's."""
        new = _to_array(value)
        if new.shape != self._value.shape:
            raise ValueError(f"{how}: variable '{self.name}' has shape {self.shape}; the value has shape {new.shape}")
        if not np.can_cast(new.dtype, self.dtype, casting="same_kind"):
            raise DTypeError(f"{how}: variable '{self.name}' is {self.dtype}; cannot assign a {new.dtype} value")
        if not owned and isinstance(value, np.ndarray) and np.may_share_memory(new, value):
            new = new.astype(self.dtype)  # a copy: the caller's array stays writable, the variable as it was
        else:  # a tensor's (immutable) value, or computed here
            new = new.astype(self.dtype, copy=False)
        new.setflags(write=False)
        self._value = new
        return self

    def _update(self, how: str, value, op: str | None) -> "Variable":
        trace = _trace()
        if trace is not None:  # inside pt.function: the new value is a node of the graph
            return trace.assign(self, how, value, op)
        if op is None:
            return self._set(value, how)
        delta = _to_array(value, self.dtype)
        try:
            new = np.add(self._value, delta) if op == "add" else np.subtract(self._value, delta)
        except ValueError:
            return self._set(delta, how)  # shapes that do not broadcast: named as a wrong shape
        return self._set(new, how, owned=True)

    def assign(self, value) -> "Variable":
        return self._update("assign", value, None)

    def assign_add(self, delta) -> "Variable":
        return self._update("assign_add", delta, "add")

    def assign_sub(self, delta) -> "Variable":
        return self._update("assign_sub", delta, "sub")

    def __repr__(self) -> str:
        return f"<pt.Variable '{self.name}' shape={self.shape} dtype={self.dtype.name}, numpy={self._value!r}>"


def constant(value, dtype=None) -> Tensor:
    """A tensor of ``value`` (a Python number or nested list, a NumPy array or a tensor)."""
    return Tensor(value, dtype)


# ---- running one op -------------------------------------------------------------------------------------
def _scalar(x) -> bool:
    return isinstance(x, (bool, int, float, np.number)) and np.ndim(x) == 0


def _apply(op: str, inputs: Sequence[Any], **attrs) -> Tensor:
    """Run registry op ``op`` on ``inputs`` now (or add it to the graph being traced)."""
    trace = _trace()
    if trace is not None:
        return trace.op(op, inputs, attrs)
    opdef = get_op(op)
    other = next((x.dtype for x in inputs if isinstance(x, Tensor)), None)
    tensors = [x if isinstance(x, Tensor) else
               Tensor._wrap(np.array(x, dtype=dtypes.weak_scalar_dtype(x, other, op))) if _scalar(x) else Tensor(x)
               for x in inputs]
    attrs = {**opdef.attrs, **attrs}
    spec = opdef.infer(op, [TensorSpec(t._value.shape, t._value.dtype) for t in tensors], attrs)
    try:
        value = opdef.reference(_CTX, *[t._value for t in tensors], **attrs)
    except (ValueError, TypeError, FloatingPointError) as exc:
        raise GraphError(str(exc), op, op) from None
    out = Tensor._wrap(np.asarray(value, dtype=spec.dtype))
    for tape in _tapes():
        tape._record(op, tensors, attrs, out)
    return out


def add(a, b): return _apply("add", [a, b])
def subtract(a, b): return _apply("sub", [a, b])
def multiply(a, b): return _apply("mul", [a, b])
def divide(a, b): return _apply("div", [a, b])
def pow(a, b): return _apply("pow", [a, b])  # noqa: A001 - TensorFlow's name
def negative(x): return _apply("neg", [x])
def maximum(a, b): return _apply("maximum", [a, b])


def matmul(a, b, transpose_a: bool = False, transpose_b: bool = False):
    return _apply("matmul", [a, b], transpose_a=transpose_a, transpose_b=transpose_b)


def reshape(x, shape): return _apply("reshape", [x], shape=tuple(int(d) for d in shape))
def expand_dims(x, axis): return _apply("expand_dims", [x], axis=int(axis))
def transpose(x, perm=None): return _apply("transpose", [x], perm=None if perm is None else [int(p) for p in perm])
def reduce_sum(x, axis=None, keepdims=False): return _apply("reduce_sum", [x], axis=axis, keepdims=keepdims)
def reduce_mean(x, axis=None, keepdims=False): return _apply("reduce_mean", [x], axis=axis, keepdims=keepdims)
def reduce_max(x, axis=None, keepdims=False): return _apply("reduce_max", [x], axis=axis, keepdims=keepdims)
def exp(x): return _apply("exp", [x])
def log(x): return _apply("log", [x])
def sqrt(x): return _apply("sqrt", [x])
def square(x): return _apply("square", [x])
def abs(x): return _apply("abs", [x])  # noqa: A001 - TensorFlow's name
def sin(x): return _apply("sin", [x])
def cos(x): return _apply("cos", [x])
def sigmoid(x): return _apply("sigmoid", [x])
def tanh(x): return _apply("tanh", [x])
def relu(x): return _apply("relu", [x])
def softmax(x, axis=-1): return _apply("softmax", [x], axis=axis)
def cast(x, dtype): return _apply("cast", [x], dtype=dtypes.as_dtype(dtype).name)
def concat(values, axis): return _apply("concat", list(values), axis=int(axis))


linalg = types.SimpleNamespace(
    inv=lambda x: _apply("matrix_inverse", [x]),
    det=lambda x: _apply("matrix_determinant", [x]),
    matmul=matmul,
)


# ---- GradientTape ----------------------------------------------------------------------------------------
class GradientTape:
    """Records the eager ops run inside ``with``; ``gradient(target, sources)`` gives
    d(sum target)/d(source) for a tensor, a variable or a list/tuple of them (same
    structure back). Trainable variables are watched automatically; constants and
    non-trainable variables give None unless ``watch``ed; so do sources the target
    does not depend on. A non-persistent tape gives one set of gradients."""

    def __init__(self, persistent: bool = False, watch_accessed_variables: bool = True):
        self.persistent = persistent
        self.watch_accessed_variables = watch_accessed_variables
        self._records: list[tuple[str, list, dict, Tensor]] = []
        self._watched: set = set()  # ids of eager tensors, names of a traced graph's nodes
        self._keep: list = []  # what the watched ids belong to (ids stay unique while kept)
        self._made: set[int] = set()  # ids of the tensors recorded ops made (kept alive by the records)
        self._used = False
        self._trace = None

    def __enter__(self) -> "GradientTape":
        self._trace = _trace()
        if self._trace is not None:  # inside pt.function: gradients become nodes of the traced graph
            self._trace.tapes += 1
        else:
            _tapes().append(self)
        return self

    def __exit__(self, *exc) -> None:
        tapes = _tapes()
        if self in tapes:
            tapes.remove(self)

    def watch(self, tensor) -> None:
        for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
            if not isinstance(t, (Tensor, GraphTensor) if self._trace is not None else Tensor):
                raise TypeError(f"GradientTape.watch takes tensors or variables, not {type(t).__name__}")
            self._watched.add(t.name if isinstance(t, GraphTensor) else id(t))
            self._keep.append(t)

    def _record(self, op: str, inputs: list, attrs: dict, out: Tensor) -> None:
        # A variable is recorded with the value it had when read (a later assign does
        # not change the gradient of what was computed).
        self._records.append((op, [(t, t._value) for t in inputs], attrs, out))
        self._made.add(id(out))

    def _is_watched(self, t: Tensor) -> bool:
        if id(t) in self._watched:
            return True
        return isinstance(t, Variable) and t.trainable and self.watch_accessed_variables

    def gradient(self, target, sources):
        if self._used and not self.persistent:
            raise RuntimeError("a non-persistent GradientTape gives one set of gradients; "
                               "use GradientTape(persistent=True) to call gradient() more than once")
        self._used = True
        flat = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        kinds = (Tensor, GraphTensor) if self._trace is not None else Tensor
        for s in flat:
            if not isinstance(s, kinds):
                raise TypeError(f"gradient sources must be tensors or variables, not {type(s).__name__}")
        if not isinstance(target, kinds):
            raise TypeError(f"the gradient target must be a tensor, not {type(target).__name__}")
        grads = self._traced_gradients(target, flat) if self._trace is not None else self._gradients(target, flat)
        if isinstance(sources, tuple):
            return tuple(grads)
        return grads if isinstance(sources, list) else grads[0]

    def _traced_gradients(self, target, sources: list) -> list[GraphTensor | None]:
        """Inside pt.function: the gradients as nodes of the traced graph. Sources are
        variables (their value at this point of the function), the function's arguments
        (when watched) and tensors it computed."""
        trace = self._trace
        target = trace.lift(target)
        if not isinstance(target, GraphTensor) or not dtypes.is_float(target.dtype):
            return [None] * len(sources)
        nodes: list[GraphTensor | None] = []
        for s in sources:
            if isinstance(s, Variable):
                node = trace.current.get(id(s)) if self._is_watched(s) else None
            elif isinstance(s, GraphTensor):  # an argument needs watch(), like a constant outside
                node = s if s.op != "placeholder" or s.name in self._watched else None
            else:
                node = None  # an eager tensor: a constant of the traced graph
            nodes.append(node)
        wanted = [n for n in nodes if isinstance(n, GraphTensor)]
        if not wanted:
            return [None] * len(sources)
        graph = trace.graph
        frozen = [n for n in wanted if n.op == "variable" and not n.node.attrs.get("trainable", True)]
        for n in frozen:  # a watched non-trainable variable: differentiate it this once
            n.node.attrs["trainable"] = True
        try:
            grads = dict(zip((n.name for n in wanted), gradients(target, wanted)))
        finally:
            for n in frozen:
                graph.nodes[n.name].attrs["trainable"] = False
        return [grads.get(n.name) if isinstance(n, GraphTensor) else None for n in nodes]

    def _call_gradients(self, target: Tensor, sources: list[Tensor]) -> list[Tensor | None] | None:
        """The gradients a pt.function call computed with its output (its compiled
        forward and backward pass), when ``target`` is that output and every source is
        one of the call's inputs; else None (the general path)."""
        for op, inputs, attrs, out in reversed(self._records):
            if out is target:
                if op != _CALL:
                    return None
                made = self._made
                by_input = {id(t): i for i, (t, _) in enumerate(inputs)}
                if any(id(s) not in by_input for s in sources):
                    return None
                grads = attrs["grads"]
                return [Tensor._wrap(grads[by_input[id(s)]]) if grads[by_input[id(s)]] is not None
                        and (id(s) in made or self._is_watched(s)) else None for s in sources]
        return None

    def _gradients(self, target: Tensor, sources: list[Tensor]) -> list[Tensor | None]:
        fast = self._call_gradients(target, sources)
        if fast is not None:
            return fast
        if any(op == _CALL for op, *_ in self._records):
            return self._inlined_gradients(target, sources)
        return self._compiled_gradients(target, sources)

    def _compiled_gradients(self, target: Tensor, sources: list[Tensor]) -> list[Tensor | None]:
        """The backward pass, compiled once per shape of tape: the same ops on the same
        shapes (a training loop's every step) reuse one executor, fed the recorded
        values. Leaves and recorded outputs are its placeholders, so nothing of the
        forward pass runs again."""
        refs: dict[int, tuple] = {}  # id(tensor) -> ("leaf", j) | ("op", i)
        leaves: list[tuple[Tensor, np.ndarray]] = []
        structure: list[tuple] = []
        for i, (op, inputs, attrs, out) in enumerate(self._records):
            ins = []
            for t, value in inputs:
                if id(t) not in refs:  # a leaf: not made by an op on this tape
                    refs[id(t)] = ("leaf", len(leaves))
                    leaves.append((t, value))
                    structure.append(("leaf", value.shape, value.dtype, self._differentiable_leaf(t, value)))
                ins.append(refs[id(t)])
            structure.append((op, _frozen(attrs), tuple(ins)))
            refs[id(out)] = ("op", i)
        target_ref = refs.get(id(target))
        if target_ref is None or not dtypes.is_float(target.dtype):
            return [None] * len(sources)
        wanted = tuple(ref if ref is not None and (ref[0] == "op" or self._differentiable_leaf(*leaves[ref[1]])) else None
                       for ref in (refs.get(id(s)) for s in sources))
        if not any(wanted):
            return [None] * len(sources)
        try:
            key = (tuple(structure), target_ref, wanted)
            hash(key)
        except TypeError:  # an attribute that cannot be a key: compiled for this call only
            key = None
        cache = _backward_cache()
        backward = cache.pop(key, None) if key is not None else None
        if backward is None:
            backward = _Backward(self._records, leaves, target_ref, wanted)
        if key is not None:
            cache[key] = backward  # most recently used last
            while len(cache) > _BACKWARD_CACHE_SIZE:
                cache.pop(next(iter(cache)))
        return backward.run([v for _, v in leaves], [out._value for *_, out in self._records])

    def _differentiable_leaf(self, t: Tensor, value: np.ndarray) -> bool:
        return self._is_watched(t) and dtypes.is_float(value.dtype)

    def _inlined_gradients(self, target: Tensor, sources: list[Tensor]) -> list[Tensor | None]:
        """The general path, for a tape holding pt.function calls: their traced graphs
        inlined, the backward pass interpreted once."""
        g, nodes, feeds, leaves, known = Graph(), {}, {}, {}, {}
        for op, inputs, attrs, out in self._records:
            ins = []
            for t, value in inputs:
                if id(t) not in nodes:  # a leaf: not made by an op on this tape
                    if self._differentiable_leaf(t, value):
                        node = g.placeholder(value.shape, value.dtype)
                        feeds[node.name] = value
                    else:
                        node = g.constant(value)
                    nodes[id(t)], leaves[id(t)] = node, node
                ins.append(nodes[id(t)])
            if op == _CALL:  # a pt.function call: its traced graph, inlined
                nodes[id(out)] = attrs["call"].inline(g, ins)
            else:
                nodes[id(out)] = g.op(op, ins, **attrs)
            known[nodes[id(out)].name] = out._value  # computed already: the backward pass reuses it
        if id(target) not in nodes or not dtypes.is_float(target.dtype):
            return [None] * len(sources)
        wanted = [(i, nodes[id(s)]) for i, s in enumerate(sources)
                  if id(s) in nodes and (id(s) not in leaves or leaves[id(s)].op == "placeholder")]
        out: list[Tensor | None] = [None] * len(sources)
        if not wanted:
            return out
        grads = gradients(nodes[id(target)], [n for _, n in wanted])
        fetch = [(i, d) for (i, _), d in zip(wanted, grads) if d is not None]
        values = evaluate(g, [d for _, d in fetch], feeds=feeds, known=known) if fetch else []
        for (i, _), v in zip(fetch, values):
            out[i] = Tensor._wrap(np.asarray(v))
        return out


_BACKWARD_CACHE_SIZE = 32


def _backward_cache() -> dict:
    """This thread's compiled backward passes by tape structure (an executor's buffers
    are not shared between threads), least recently used first."""
    if not hasattr(_local, "backward"):
        _local.backward = {}
    return _local.backward


def _frozen(value):
    """``value`` (an op's attributes) as a hashable key."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_frozen(v) for v in value)
    return value


class _Backward:
    """A tape's backward pass as a graph whose placeholders are the tape's leaves and
    the recorded ops' outputs, compiled on the CPU kernels."""

    def __init__(self, records: list, leaves: list, target_ref: tuple, wanted: tuple):
        from pstrain.runtime.executor import Executor

        g = Graph()
        leaf_nodes = [g.placeholder(value.shape, value.dtype) for _, value in leaves]
        index = {id(t): n for (t, _), n in zip(leaves, leaf_nodes)}
        op_nodes = []
        for op, inputs, attrs, out in records:
            node = g.op(op, [index[id(t)] for t, _ in inputs], **attrs)
            index[id(out)] = node
            op_nodes.append(node)

        def node_of(ref):
            return leaf_nodes[ref[1]] if ref[0] == "leaf" else op_nodes[ref[1]]

        positions = [i for i, ref in enumerate(wanted) if ref is not None]
        grads = gradients(node_of(target_ref), [node_of(wanted[i]) for i in positions])
        self.n_sources = len(wanted)
        self.positions = [i for i, d in zip(positions, grads) if d is not None]
        for node, (*_, out) in zip(op_nodes, records):  # the forward pass is known: its outputs become inputs
            n = g.nodes[node.name]
            g.nodes[node.name] = type(n)(n.name, "placeholder", [], {}, n.dtype, tuple(out._value.shape))
        self.leaf_names = [n.name for n in leaf_nodes]
        self.op_names = [n.name for n in op_nodes]
        self.executor = Executor(g, [d for d in grads if d is not None], backend="cpu", own_fetches=True)

    def run(self, leaf_values: list, op_values: list) -> list[Tensor | None]:
        feeds = dict(zip(self.leaf_names, leaf_values))
        feeds.update(zip(self.op_names, op_values))
        values = self.executor.run(feeds, {}, _CTX).values if self.positions else []
        out: list[Tensor | None] = [None] * self.n_sources
        for i, v in zip(self.positions, values):
            out[i] = Tensor._wrap(v)
        return out


# ---- pt.function -----------------------------------------------------------------------------------------
class _Trace:
    """The graph a traced call builds: arguments are placeholders with an unknown batch
    dimension, variables read become variable nodes, eager tensors constants. A
    variable assigned in the function reads as its new value from then on; the call
    stores the assigned values when it has run."""

    def __init__(self):
        self.graph = Graph()
        self.variables: dict[int, tuple[Variable, GraphTensor]] = {}
        self.current: dict[int, GraphTensor] = {}  # a variable's value at this point of the function
        self.assigns: dict[int, tuple[Variable, GraphTensor, str]] = {}  # id -> (variable, new value, how)
        self.tapes = 0  # GradientTapes opened inside the function
        self.fetches: list | None = None  # the outputs as nodes of the graph, when first run

    @contextlib.contextmanager
    def active(self):
        """While in the block, pt ops build nodes of this trace's graph instead of running."""
        _local.trace, before = self, _trace()
        try:
            yield self
        finally:
            _local.trace = before

    def lift(self, x) -> GraphTensor | Any:
        if isinstance(x, GraphTensor) or _scalar(x):
            return x
        if isinstance(x, Variable):
            if id(x) not in self.variables:
                node = self.graph.variable(x._value, trainable=x.trainable, name=x.name)
                self.variables[id(x)] = (x, node)
                self.current[id(x)] = node
            return self.current[id(x)]
        if isinstance(x, Tensor):
            return self.graph.constant(x._value)
        return self.graph.constant(_to_array(x))

    def op(self, op: str, inputs, attrs) -> GraphTensor:
        return self.graph.op(op, [self.lift(x) for x in inputs], **attrs)

    def assign(self, var: Variable, how: str, value, op: str | None) -> Variable:
        """``var.assign*(value)`` inside the function: checked now where the shapes are
        known, and again on the values when the call has run."""
        value = self.lift(value)
        if not isinstance(value, GraphTensor):
            value = self.graph.constant(np.array(value, dtype=var.dtype))
        if value.dtype != var.dtype:
            if not np.can_cast(value.dtype, var.dtype, casting="same_kind"):
                raise DTypeError(f"{how}: variable '{var.name}' is {var.dtype}; cannot assign a {value.dtype} value")
            value = self.graph.op("cast", [value], dtype=var.dtype.name)
        new = value if op is None else self.graph.op(op, [self.lift(var), value])
        if len(new.shape) != var.ndim or any(d is not None and d != v for d, v in zip(new.shape, var.shape)):
            shape = tuple("?" if d is None else d for d in new.shape)
            raise ValueError(f"{how}: variable '{var.name}' has shape {var.shape}; the value has shape {shape}")
        self.lift(var)  # a variable only assigned is still one the function reads
        self.current[id(var)] = new
        self.assigns[id(var)] = (var, new, how)
        return var


class Function:
    """``pt.function(fn)``: ``fn`` traced into a ``graph.Graph`` once per input signature
    (dtype, and shape past the batch dimension), then run as that graph, compiled once
    (an Executor on the CPU kernels, fused where it can).

    A whole training step may be one function, as in TensorFlow: a ``GradientTape``
    inside it differentiates the traced graph, and ``assign``/``assign_add``/
    ``assign_sub`` of a variable inside it take effect when the call has run (reads
    after the assignment see the new value). Under an active (outer) GradientTape a
    call of a one-output function runs its compiled forward and backward pass at once
    and is recorded as one step: a tape asking for the gradient of its output gets
    those, one composing it with other ops inlines the graph. A function of several
    outputs, or one that assigns variables or opens a tape, runs op by op under an
    outer tape (recorded as eager ops are)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "function")
        self.__doc__ = getattr(fn, "__doc__", None)
        self._cache: dict[tuple, tuple[_Trace, list[str], Any]] = {}
        self._compiled: dict[tuple, _CompiledCall] = {}

    @staticmethod
    def _signature(args) -> tuple:
        return tuple((t._value.dtype, t._value.shape[1:] if t._value.ndim else None) for t in args)

    def trace(self, *args):
        """(trace, placeholder names, outputs) for these arguments' signature."""
        args = [a if isinstance(a, Tensor) else constant(a) for a in args]
        key = self._signature(args)
        if key not in self._cache:
            trace = _Trace()
            names, params = [], []
            for i, a in enumerate(args):
                shape = (None,) + a.shape[1:] if a.ndim else ()
                params.append(trace.graph.placeholder(shape, a.dtype.name, name=f"arg{i}"))
                names.append(params[-1].name)
            with trace.active():
                outputs = self.fn(*params)
            self._cache[key] = (trace, names, outputs)
        return self._cache[key]

    def graph_for(self, *args) -> Graph:
        """The graph traced for these arguments' signature (what a job ships)."""
        return self.trace(*args)[0].graph

    def variables_for(self, *args) -> list[Variable]:
        return [v for v, _ in self.trace(*args)[0].variables.values()]

    def __call__(self, *args):
        if _trace() is not None:
            return self.fn(*args)  # inlined into the outer trace
        args = [a if isinstance(a, Tensor) else constant(a) for a in args]
        trace, names, outputs = self.trace(*args)
        if _tapes():
            if trace.assigns or trace.tapes or not isinstance(outputs, GraphTensor) \
                    or not dtypes.is_float(outputs.dtype):
                return self.fn(*args)  # recorded op by op, as eager code is
            return self._call_recorded(args, trace, names, outputs)
        if trace.fetches is None:  # the outputs as nodes (an eager tensor returned: a constant), once
            flat = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            trace.fetches = [o if isinstance(o, GraphTensor) or o is None else
                             trace.lift(o if isinstance(o, Tensor) else constant(o)) for o in flat]
        fetches = trace.fetches
        call = self._compiled_call(args, trace, names, [o.name for o in fetches if o is not None])
        variables = [v for v, _ in trace.variables.values()]
        values, _ = call.run([a._value for a in args], [v._value for v in variables])
        assigned = values[len(values) - len(trace.assigns):]
        for (var, _, how), value in zip(trace.assigns.values(), assigned):  # all checked before any is stored
            if value.shape != var.shape:
                raise ValueError(f"{how}: variable '{var.name}' has shape {var.shape}; the value has shape {value.shape}")
        for (var, _, _), value in zip(trace.assigns.values(), assigned):
            value.setflags(write=False)
            var._value = value
        produced = iter(values)
        result = [None if o is None else Tensor._wrap(next(produced)) for o in fetches]
        if isinstance(outputs, tuple):
            return tuple(result)
        return result if isinstance(outputs, list) else result[0]

    def _compiled_call(self, args, trace: "_Trace", names: list[str], fetches: list[str],
                       wrt: tuple[int, ...] = ()) -> "_CompiledCall":
        key = (self._signature(args), tuple(fetches), wrt)
        if key not in self._compiled:
            self._compiled[key] = _CompiledCall(trace, names, fetches, wrt)
        return self._compiled[key]

    def _call_recorded(self, args, trace: "_Trace", names: list[str], output: GraphTensor) -> Tensor:
        """Run the traced graph's compiled forward and backward pass at once and record
        the call on every active tape, with the gradients of (the sum of) its output
        for each argument and variable some tape watches or computed."""
        variables = [v for v, _ in trace.variables.values()]
        inputs = list(args) + variables
        tapes = _tapes()
        wrt = tuple(i for i, t in enumerate(inputs) if dtypes.is_float(t.dtype)
                    and any(id(t) in tape._made or tape._is_watched(t) for tape in tapes))
        call = self._compiled_call(args, trace, names, [output.name], wrt)
        (value,), grads = call.run([a._value for a in args], [v._value for v in variables])
        out = Tensor._wrap(value)
        for tape in tapes:
            tape._record(_CALL, inputs, {"call": call, "grads": grads}, out)
        return out


class _CompiledCall:
    """A traced graph's ``fetches``, plus the backward pass of the first for the
    arguments and variables ``wrt`` (indices into arguments + variables), compiled
    once: an Executor on the CPU kernels, fused where it can."""

    def __init__(self, trace: "_Trace", names: list[str], fetches: list[str], wrt: tuple[int, ...] = ()):
        from pstrain.runtime.executor import Executor

        self.trace, self.names, self.output = trace, names, fetches[0] if fetches else None
        self.var_nodes = [node.name for _, node in trace.variables.values()]
        self.fetches = fetches + [node.name for _, node, _ in trace.assigns.values()]
        g = copy.deepcopy(trace.graph) if wrt else trace.graph  # the backward pass: on a copy
        grads: list = []
        if wrt:
            inputs = self.names + self.var_nodes
            for i in wrt:  # the tape decides what is watched
                g.nodes[inputs[i]].attrs["trainable"] = True
            grads = gradients(g.tensor(self.output), [g.tensor(inputs[i]) for i in wrt])
        self.which = [i for i, d in zip(wrt, grads) if d is not None]
        self.executor = Executor(g, self.fetches + [d.name for d in grads if d is not None], backend="cpu",
                                 own_fetches=True)

    def run(self, args: list[np.ndarray], variables: list[np.ndarray]) -> tuple[list[np.ndarray], list]:
        """(the fetched values, then the assigned ones; the gradients by input index, None
        where not computed): new arrays, the caller's."""
        host = self.executor.run(dict(zip(self.names, args)), dict(zip(self.var_nodes, variables)), _CTX).values
        grads: list = [None] * (len(args) + len(variables))
        for i, v in zip(self.which, host[len(self.fetches):]):
            grads[i] = v
        return host[:len(self.fetches)], grads

    def inline(self, g: Graph, inputs: list[GraphTensor]) -> GraphTensor:
        """The traced graph's nodes added to ``g``, its arguments and variables taken from
        ``inputs`` (in the order the call recorded them); returns its output."""
        mapping = dict(zip(self.names + self.var_nodes, inputs))
        for name, node in self.trace.graph.nodes.items():
            if name in mapping:
                continue
            if node.op == "constant":
                mapping[name] = g.constant(node.attrs["value"])
            else:
                mapping[name] = g.op(node.op, [mapping[i] for i in node.inputs], **node.attrs)
        return mapping[self.output]


def function(fn: Callable | None = None):
    """Decorator: ``@pt.function`` (see :class:`Function`)."""
    if fn is None:
        return function
    return Function(fn)


__all__ = [
    "Tensor", "Variable", "GradientTape", "Function", "constant", "function", "linalg",
    "float16", "float32", "float64", "int32", "int64", "bool_",
    "add", "subtract", "multiply", "divide", "pow", "negative", "maximum", "matmul", "reshape", "expand_dims",
    "transpose", "reduce_sum", "reduce_mean", "reduce_max", "exp", "log", "sqrt", "square", "abs", "sin", "cos",
    "sigmoid", "tanh", "relu", "softmax", "cast", "concat",
]
