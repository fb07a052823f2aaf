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
        self._value = _to_array(value, dtype)
        self._value.setflags(write=False)

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

    def _set(self, value, how: str) -> "Variable":
        new = _to_array(value)
        if new.shape != self._value.shape:
            raise ValueError(f"{how}: variable '{self.name}' has shape {self.shape}; the value has shape {new.shape}")
        if not np.can_cast(new.dtype, self.dtype, casting="same_kind"):
            raise DTypeError(f"{how}: variable '{self.name}' is {self.dtype}; cannot assign a {new.dtype} value")
        value = new.astype(self.dtype)
        value.setflags(write=False)
        self._value = value
        return self

    def assign(self, value) -> "Variable":
        return self._set(value, "assign")

    def assign_add(self, delta) -> "Variable":
        return self._set(self._value + _to_array(delta, self.dtype), "assign_add")

    def assign_sub(self, delta) -> "Variable":
        return self._set(self._value - _to_array(delta, self.dtype), "assign_sub")

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
               Tensor(x, dtypes.weak_scalar_dtype(x, other, op) if _scalar(x) else None) for x in inputs]
    attrs = {**opdef.attrs, **attrs}
    spec = opdef.infer(op, [TensorSpec(t.shape, t.dtype) for t in tensors], attrs)
    try:
        value = opdef.reference(_CTX, *[t._value for t in tensors], **attrs)
    except (ValueError, TypeError, FloatingPointError) as exc:
        raise GraphError(str(exc), op, op) from None
    out = Tensor(np.asarray(value, dtype=spec.dtype))
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
        self._watched: set[int] = set()
        self._keep: list = []  # what the watched ids belong to (ids stay unique while kept)
        self._used = False

    def __enter__(self) -> "GradientTape":
        _tapes().append(self)
        return self

    def __exit__(self, *exc) -> None:
        tapes = _tapes()
        if self in tapes:
            tapes.remove(self)

    def watch(self, tensor) -> None:
        for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
            if not isinstance(t, Tensor):
                raise TypeError(f"GradientTape.watch takes tensors or variables, not {type(t).__name__}")
            self._watched.add(id(t))
            self._keep.append(t)

    def _record(self, op: str, inputs: list, attrs: dict, out: Tensor) -> None:
        # A variable is recorded with the value it had when read (a later assign does
        # not change the gradient of what was computed).
        self._records.append((op, [(t, t._value) for t in inputs], attrs, out))

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
        for s in flat:
            if not isinstance(s, Tensor):
                raise TypeError(f"gradient sources must be tensors or variables, not {type(s).__name__}")
        if not isinstance(target, Tensor):
            raise TypeError(f"the gradient target must be a tensor, not {type(target).__name__}")
        grads = self._gradients(target, flat)
        if isinstance(sources, tuple):
            return tuple(grads)
        return grads if isinstance(sources, list) else grads[0]

    def _call_gradients(self, target: Tensor, sources: list[Tensor]) -> list[Tensor | None] | None:
        """The gradients a pt.function call computed with its output (its compiled
        forward and backward pass), when ``target`` is that output and every source is
        one of the call's inputs; else None (the general path)."""
        for op, inputs, attrs, out in reversed(self._records):
            if out is target:
                if op != _CALL:
                    return None
                made = {id(o) for *_, o in self._records}
                by_input = {id(t): i for i, (t, _) in enumerate(inputs)}
                if any(id(s) not in by_input for s in sources):
                    return None
                grads = attrs["grads"]
                return [Tensor(grads[by_input[id(s)]]) if grads[by_input[id(s)]] is not None
                        and (id(s) in made or self._is_watched(s)) else None for s in sources]
        return None

    def _gradients(self, target: Tensor, sources: list[Tensor]) -> list[Tensor | None]:
        fast = self._call_gradients(target, sources)
        if fast is not None:
            return fast
        g, nodes, feeds, leaves, known = Graph(), {}, {}, {}, {}
        for op, inputs, attrs, out in self._records:
            ins = []
            for t, value in inputs:
                if id(t) not in nodes:  # a leaf: not made by an op on this tape
                    if self._is_watched(t) and dtypes.is_float(value.dtype):
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
            out[i] = Tensor(v)
        return out


# ---- pt.function -----------------------------------------------------------------------------------------
class _Trace:
    """The graph a traced call builds: arguments are placeholders with an unknown batch
    dimension, variables read become variable nodes, eager tensors constants."""

    def __init__(self):
        self.graph = Graph()
        self.variables: dict[int, tuple[Variable, GraphTensor]] = {}

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
                self.variables[id(x)] = (x, self.graph.variable(x._value, trainable=x.trainable, name=x.name))
            return self.variables[id(x)][1]
        if isinstance(x, Tensor):
            return self.graph.constant(x._value)
        return self.graph.constant(_to_array(x))

    def op(self, op: str, inputs, attrs) -> GraphTensor:
        return self.graph.op(op, [self.lift(x) for x in inputs], **attrs)


class Function:
    """``pt.function(fn)``: ``fn`` traced into a ``graph.Graph`` once per input signature
    (dtype, and shape past the batch dimension), then run as that graph. Under an
    active GradientTape a call runs the graph's compiled forward and backward pass at
    once (the CPU kernels) and is recorded as one step; a tape asking for the
    gradient of its output gets those, and one composing it with other ops inlines
    the graph. A function of several outputs runs op by op under a tape."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "function")
        self.__doc__ = getattr(fn, "__doc__", None)
        self._cache: dict[tuple, tuple[_Trace, list[str], Any]] = {}
        self._compiled: dict[tuple, _CompiledCall] = {}

    @staticmethod
    def _signature(args) -> tuple:
        return tuple((t.dtype.name, t.ndim, t.shape[1:]) for t in args)

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
            if not isinstance(outputs, GraphTensor) or not dtypes.is_float(outputs.dtype):
                return self.fn(*args)  # several outputs, or an integer one: recorded op by op
            return self._call_recorded(args, trace, names, outputs)
        flat = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        lifted = [trace.lift(o) for o in flat]
        params = {node.name: v._value for v, node in trace.variables.values()}
        values = evaluate(trace.graph, lifted, feeds=dict(zip(names, (a._value for a in args))), params=params)
        result = [Tensor(v) for v in values]
        if isinstance(outputs, tuple):
            return tuple(result)
        return result if isinstance(outputs, list) else result[0]


    def _call_recorded(self, args, trace: "_Trace", names: list[str], output: GraphTensor) -> Tensor:
        """Run the traced graph's compiled forward and backward pass at once and record
        the call on every active tape, with the gradients of (the sum of) its output
        for each argument and variable."""
        key = self._signature(args)
        if key not in self._compiled:
            self._compiled[key] = _CompiledCall(trace, names, output)
        call = self._compiled[key]
        variables = [v for v, _ in trace.variables.values()]
        value, grads = call.run([a._value for a in args], [v._value for v in variables])
        out = Tensor(value)
        inputs = list(args) + variables
        for tape in _tapes():
            tape._record(_CALL, inputs, {"call": call, "grads": grads}, out)
        return out


class _CompiledCall:
    """A traced graph plus its backward pass for every float argument and variable,
    compiled once (an Executor on the CPU kernels, fused where it can)."""

    def __init__(self, trace: "_Trace", names: list[str], output: GraphTensor):

        from pstrain.runtime.executor import Executor

        self.trace, self.names, self.output = trace, names, output.name
        self.var_nodes = [node.name for _, node in trace.variables.values()]
        g = copy.deepcopy(trace.graph)
        for name in self.var_nodes:  # the tape decides what is watched; compute them all
            g.nodes[name].attrs["trainable"] = True
        xs = [g.tensor(n) for n in self.names + self.var_nodes]
        grads = gradients(g.tensor(self.output), xs)
        self.which = [i for i, d in enumerate(grads) if d is not None]
        self.executor = Executor(g, [g.tensor(self.output)] + [grads[i] for i in self.which], backend="cpu")

    def run(self, args: list[np.ndarray], variables: list[np.ndarray]) -> tuple[np.ndarray, list]:
        values = self.executor.run(dict(zip(self.names, args)), dict(zip(self.var_nodes, variables)), _CTX).values
        host = [np.array(self.executor.backend.to_host(v), copy=True) for v in values]
        grads: list = [None] * (len(args) + len(variables))
        for i, v in zip(self.which, host[1:]):
            grads[i] = v
        return host[0], grads

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
