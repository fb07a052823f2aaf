"""The executor: runs a graph's forward and backward nodes with one kernel backend.

A graph is compiled once per input signature (the feeds' shapes) into a flat
schedule: one kernel call per node, each writing into a buffer allocated at compile
time and reused every step, so the hot loop allocates nothing. A fusion pass turns
``act(matmul(x, w) + b)`` into one ``dense`` kernel where the backend offers one.

Usage::

    ex = Executor(g, fetches=[loss, dw], backend="cpu")
    loss_v, dw_v = ex.run({"x": xb, "y": yb}, params, RunContext(step=3)).values

Returned arrays are the executor's own buffers, overwritten by the next ``run``:
copy what you keep; or build it with ``own_fetches=True`` and every fetched value is
a new array each run, the caller's to keep (a kernel writes it where it would have
written the buffer, so this costs no copy).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from graph.core import Graph, Node, Tensor
from graph.errors import DTypeError, GraphError, ShapeError
from graph.interpret import needed_nodes
from graph.ops._util import fmt_shape
from graph.registry import RunContext, TensorSpec, get_op
from pstrain.kernels import get_backend
from pstrain.kernels.reference import reference_kernel

log = logging.getLogger(__name__)

_FUSABLE_ACTS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


@dataclass
class RunResult:
    """Fetched values (in fetch order) and, in training, new values of state
    variables (e.g. batch-norm moving statistics) by variable name."""

    values: list
    updates: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Step:
    kernel: Callable
    out: int  # slot of the output buffer
    inputs: tuple  # slots of the inputs
    node: str
    op: str


@dataclass
class _Program:
    slots: list  # buffers, by slot
    steps: list[_Step]
    feed_slots: dict[str, int]
    param_slots: dict[str, int]
    fetch_slots: list[int]
    state_updates: list  # (node, input slots, {input index: variable name})
    fresh: list = field(default_factory=list)  # (slot, shape, dtype): a new buffer every run (own_fetches)
    fresh_slots: frozenset = frozenset()  # those slots


class Executor:
    """Compiles and runs ``fetches`` of a graph on a backend ("cpu", "cuda", ...)."""

    def __init__(self, graph: Graph, fetches: Sequence[Tensor | str], backend: str | Any = "cpu", fuse: bool = True,
                 own_fetches: bool = False):
        self.graph = graph
        self.own_fetches = own_fetches
        self.fetches = [f.name if isinstance(f, Tensor) else f for f in fetches]
        for f in self.fetches:
            if f not in graph.nodes:
                raise GraphError("fetch is not a node of the graph", f)
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.fuse = fuse
        self._programs: dict[tuple, _Program] = {}
        needed = needed_nodes(graph, self.fetches)
        self.placeholders = [n for n in needed if graph.nodes[n].op == "placeholder"]
        self.variables = [n for n in needed if graph.nodes[n].op == "variable"]

    # ---- running -----------------------------------------------------------------------
    def run(
        self,
        feeds: Mapping[str, Any],
        params: Mapping[str, Any],
        ctx: RunContext | None = None,
    ) -> RunResult:
        """Run one step. ``feeds`` by placeholder name, ``params`` by variable name
        (missing variables use their initial values)."""
        ctx = ctx or RunContext()
        feeds = self._check_feeds(feeds)
        key = (ctx.training,) + tuple(feeds[n].shape for n in self.placeholders)
        prog = self._programs.get(key)
        if prog is None:
            prog = self._programs[key] = self._compile(feeds, ctx.training)
        slots = prog.slots
        for name, slot in prog.feed_slots.items():
            slots[slot] = self.backend.asarray(feeds[name])
        for name, slot in prog.param_slots.items():
            value = params.get(name)
            slots[slot] = self.backend.asarray(value if value is not None else self.graph.initial_values[name])
        for slot, shape, dtype in prog.fresh:
            slots[slot] = self.backend.empty(shape, dtype)
        for step in prog.steps:
            try:
                step.kernel(ctx, slots[step.out], *[slots[i] for i in step.inputs])
            except (ValueError, FloatingPointError, ZeroDivisionError) as exc:
                raise GraphError(str(exc), step.node, step.op) from exc
        updates = {}
        if ctx.training:
            for node, in_slots, targets in prog.state_updates:
                opdef = get_op(node.op)
                host_inputs = [self.backend.to_host(slots[i]) for i in in_slots]
                new = opdef.state_update(ctx, *host_inputs, **node.attrs)
                updates.update({var: new[i] for i, var in targets.items() if i in new})
        values = [slots[i] for i in prog.fetch_slots]
        if self.own_fetches:  # a fed, variable or constant value fetched as it is: a copy
            values = [v if i in prog.fresh_slots else self.backend.asarray(np.array(self.backend.to_host(v), copy=True))
                      for i, v in zip(prog.fetch_slots, values)]
        return RunResult(values, updates)

    def _check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for name in self.placeholders:
            if name not in feeds:
                raise GraphError("placeholder was not fed", name, "placeholder")
            node = self.graph.nodes[name]
            value = feeds[name]
            if not hasattr(value, "shape") or isinstance(value, np.ndarray):
                arr = np.asarray(value)
                if arr.dtype != node.dtype:
                    if not np.can_cast(arr.dtype, node.dtype, "same_kind"):
                        raise DTypeError(f"fed {arr.dtype} to a {node.dtype} placeholder", name, "placeholder")
                    arr = arr.astype(node.dtype)
                value = arr
            if len(value.shape) != len(node.shape) or any(
                d is not None and d != v for d, v in zip(node.shape, value.shape)
            ):
                raise ShapeError(
                    f"fed shape {fmt_shape(tuple(value.shape))} does not match {fmt_shape(node.shape)}",
                    name,
                    "placeholder",
                )
            out[name] = value
        return out

    # ---- compiling ------------------------------------------------------------------
    def _compile(self, feeds: Mapping[str, Any], training: bool) -> _Program:
        g = self.graph
        order = needed_nodes(g, self.fetches)
        specs: dict[str, TensorSpec] = {}
        for name in order:
            node = g.nodes[name]
            if node.op == "placeholder":
                specs[name] = TensorSpec(tuple(feeds[name].shape), node.dtype)
            elif node.op in ("variable", "constant"):
                specs[name] = node.spec
            else:
                specs[name] = get_op(node.op).infer(name, [specs[i] for i in node.inputs], node.attrs)

        consumers: dict[str, list[str]] = {n: [] for n in order}
        for name in order:
            for i in g.nodes[name].inputs:
                consumers[i].append(name)
        fused = self._fusions(order, consumers) if self.fuse else {}
        skipped = {n for f in fused.values() for n in f[1]}

        slot_of: dict[str, int] = {}
        slots: list = []

        def new_slot(value=None) -> int:
            slots.append(value)
            return len(slots) - 1

        feed_slots, param_slots, steps = {}, {}, []
        for name in order:
            if name in skipped:
                continue
            node = g.nodes[name]
            if node.op == "placeholder":
                slot_of[name] = feed_slots[name] = new_slot()
            elif node.op == "variable":
                slot_of[name] = param_slots[name] = new_slot()
            elif node.op == "constant":
                slot_of[name] = new_slot(self.backend.asarray(np.array(node.attrs["value"], order="C")))
            else:
                spec = specs[name]
                slot_of[name] = new_slot(self.backend.empty(spec.shape, spec.dtype))
                if name in fused:
                    kernel, _, inputs = fused[name]
                else:
                    concrete = Node(name, node.op, node.inputs, node.attrs, spec.dtype, spec.shape)
                    kernel = self.backend.kernel(concrete) or self._host_fallback(concrete)
                    inputs = node.inputs
                steps.append(_Step(kernel, slot_of[name], tuple(slot_of[i] for i in inputs), name, node.op))

        state_updates = []
        if training:
            for name in order:
                node = g.nodes[name]
                opdef = get_op(node.op)
                if opdef.state_update is None:
                    continue
                targets = {
                    i: inp for i, inp in enumerate(node.inputs) if g.nodes[inp].op == "variable"
                }
                state_updates.append((node, tuple(slot_of[i] for i in node.inputs), targets))
        log.debug("compiled %d steps (%d fused) for %s", len(steps), len(fused), self.backend.name)
        fetch_slots = [slot_of[f] for f in self.fetches]
        made = {step.out for step in steps}
        fresh = [(i, slots[i].shape, slots[i].dtype) for i in dict.fromkeys(fetch_slots)
                 if self.own_fetches and i in made]
        return _Program(slots, steps, feed_slots, param_slots, fetch_slots, state_updates, fresh,
                        frozenset(slot for slot, _, _ in fresh))

    def _fusions(self, order, consumers) -> dict[str, tuple]:
        """Find act(add(matmul(x, w), b)) (or add(matmul(x, w), b)) chains, and a ± b * c
        with c a scalar, the backend can run as one kernel. Returns {output node:
        (kernel, skipped nodes, inputs)}."""
        g, fetched = self.graph, set(self.fetches)
        out = {}

        def sole_use(name, user):
            return consumers[name] == [user] and name not in fetched

        for name in order:
            node = g.nodes[name]
            act, add = "linear", node
            if node.op in _FUSABLE_ACTS:
                act, add = _FUSABLE_ACTS[node.op], g.nodes[node.inputs[0]]
                if add.op != "add" or not sole_use(add.name, name):
                    continue
            elif node.op != "add":
                continue
            mm = g.nodes[add.inputs[0]]
            bias = g.nodes[add.inputs[1]]
            if (
                mm.op != "matmul"
                or mm.attrs["transpose_a"]
                or mm.attrs["transpose_b"]
                or len(mm.shape) != 2
                or bias.shape != (mm.shape[-1],)
                or bias.dtype != mm.dtype
                or not sole_use(mm.name, add.name)
            ):
                continue
            kernel = self.backend.fused("dense", act=act)
            if kernel is None:
                continue
            skipped = [mm.name] + ([add.name] if add is not node else [])
            out[name] = (kernel, skipped, (mm.inputs[0], mm.inputs[1], bias.name))
        # An add fused as "linear" must not also be the inner add of an activation chain.
        for name, (_, skipped, _) in list(out.items()):
            for s in skipped:
                out.pop(s, None)
        taken = set(out) | {s for _, skipped, _ in out.values() for s in skipped}
        for name in order:  # a ± b * c with c a scalar (a traced SGD update): one pass
            node = g.nodes[name]
            if node.op not in ("add", "sub") or name in taken:
                continue
            a, m = (g.nodes[i] for i in node.inputs)
            if m.op != "mul" or m.name in taken or not sole_use(m.name, name):
                continue
            x, y = (g.nodes[i] for i in m.inputs)
            b, c = (x, y) if y.shape == () else (y, x)
            shape = node.shape
            if c.shape != () or None in shape or a.shape != shape or b.shape != shape \
                    or len({a.dtype, b.dtype, c.dtype, node.dtype}) != 1:
                continue
            kernel = self.backend.fused("axpy", negate=node.op == "sub")
            if kernel is not None:
                out[name] = (kernel, [m.name], (a.name, b.name, c.name))
                taken.update((name, m.name))
        return out

    def _host_fallback(self, node: Node):
        """Run an op with no backend kernel by its NumPy reference, on the host."""
        ref = reference_kernel(node)
        backend = self.backend
        if backend.name in ("reference", "cpu"):
            return ref

        def k(ctx, out, *inputs):
            host_out = np.empty(out.shape, out.dtype)
            ref(ctx, host_out, *[backend.to_host(x) for x in inputs])
            out.copy_to_device(host_out)

        return k
