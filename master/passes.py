"""Rule-based graph passes the master runs before planning: constant folding,
common-subexpression elimination (CSE) and dead-node pruning.

Every pass is a pure function: it reads a ``graph.Graph`` and returns a *new* one
(plus a small report), never touching its input. Output graphs keep the input's
topological node order, keep the names of every surviving node, and compute the same
values as the input for the names the caller fetches, under any feeds, parameters and
``RunContext``.

Usage::

    from master.passes import optimize
    g2, report = optimize(plan.graph, [plan.loss, plan.prediction, *plan.grads.values()],
                          keep={plan.features, plan.labels})
    print(report.summary())   # "folded 1, merged 1, pruned 1 nodes: 38 -> 36 in 2 rounds"

or one pass at a time::

    g2, folded = fold_constants(g, keep=set())
    g3, merged = eliminate_common_subexpressions(g2, keep={"loss"})
    g4, removed = prune(g3, ["loss"])
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from graph.core import Graph, Node
from graph.errors import GraphError
from graph.interpret import needed_nodes
from graph.registry import OpDef, RunContext, get_op

log = logging.getLogger(__name__)

SOURCE_OPS = frozenset({"placeholder", "variable", "constant"})
# Ops whose value depends on the RunContext (training flag, step, run seed) rather
# than on their inputs alone. The registry flags random ops and ops with a state
# update, but not the batch_norm gradient, whose statistics also follow
# ctx.training, so the names are listed here too.
CONTEXT_OPS = frozenset({"dropout", "dropout_grad", "batch_norm", "batch_norm_grad"})


# ---- helpers shared by the passes ---------------------------------------------------
def _copy_node(node: Node, inputs: Sequence[str] | None = None, name: str | None = None) -> Node:
    """A fresh Node (own inputs list and attrs dict); attr values are shared, not copied."""
    return Node(
        name if name is not None else node.name,
        node.op,
        list(node.inputs if inputs is None else inputs),
        dict(node.attrs),
        np.dtype(node.dtype),
        tuple(node.shape),
    )


def _new_graph(nodes: Iterable[Node], initial_values: Mapping[str, np.ndarray]) -> Graph:
    """A Graph of ``nodes`` (already in topological order) with the initial values
    of the variables among them. Value arrays are shared with the input graph."""
    out = Graph()
    for node in nodes:
        out.nodes[node.name] = node
        if node.op == "variable":
            out.initial_values[node.name] = initial_values[node.name]
    return out


def _check_names(g: Graph, names: Iterable[str], what: str) -> None:
    for name in names:
        if name not in g.nodes:
            raise GraphError(f"{what} '{name}' is not a node of the graph", name)


def is_foldable(opdef: OpDef) -> bool:
    """Whether an op's value is a function of its input values alone, so a node of it
    with constant inputs may be replaced by its value."""
    return not (
        opdef.name in SOURCE_OPS or opdef.random or opdef.state_update is not None or opdef.name in CONTEXT_OPS
    )


def is_mergeable(opdef: OpDef) -> bool:
    """Whether two nodes of this op with equal inputs and attrs may become one.

    Placeholders and variables are distinct by identity; random ops draw their own
    numbers; an op with a state update would apply it once instead of twice."""
    return opdef.name not in ("placeholder", "variable") and not opdef.random and opdef.state_update is None


def freeze(value: Any) -> Any:
    """A hashable key for an attr value: equal keys mean interchangeable values.

    Arrays compare by dtype, shape and bytes (bitwise: 0.0 and -0.0 differ, as
    1/x tells them apart); scalars carry their type, so ``1``, ``1.0`` and ``True``
    stay distinct."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, np.ascontiguousarray(value).tobytes())
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
    if isinstance(value, np.generic):
        return ("np", value.dtype.str, value.tobytes())
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, value)
    return ("repr", type(value).__qualname__, repr(value))


# ---- constant folding -----------------------------------------------------------------
# The largest value folding makes: a bigger constant would bloat the graph every worker gets
# (and computing it could exhaust the master's memory: a submitted (N,1) + (1,N) is N*N).
FOLD_MAX_BYTES = 16 * 2**20


def fold_constants(
    g: Graph, keep: Collection[str] = (), *, max_bytes: int | None = FOLD_MAX_BYTES
) -> tuple[Graph, list[str]]:
    """Replace every node computable from constants alone by a constant of the same
    name, dtype and shape; returns the new graph and the folded names.

    Values come from the ops' NumPy references, the semantics every backend is
    checked against. Random ops, ops with a state update and ops that read the
    RunContext (``CONTEXT_OPS``) are never folded, nor is a node whose reference
    raises (its error is left for run time) or, with ``max_bytes``, a node whose
    value would be larger than that (judged from its declared shape before computing it). Folding keeps names, so nodes in ``keep``
    survive as they are required to; the argument is accepted for symmetry.

    Example: in ``x + 2 * 3``, the ``mul`` node becomes the constant 6.
    """
    del keep  # names never change here
    ctx = RunContext(training=True)
    values: dict[str, np.ndarray] = {}  # constant value of every (now) constant node
    folded: list[str] = []
    out: list[Node] = []
    for node in g.nodes.values():
        if node.op == "constant":
            values[node.name] = np.asarray(node.attrs["value"], dtype=node.dtype)
            out.append(_copy_node(node))
            continue
        opdef = get_op(node.op, node.name)
        if not (node.inputs and all(i in values for i in node.inputs) and is_foldable(opdef)):
            out.append(_copy_node(node))
            continue
        value = _evaluate(node, opdef, [values[i] for i in node.inputs], ctx, max_bytes)
        if value is None:
            out.append(_copy_node(node))
            continue
        values[node.name] = value
        folded.append(node.name)
        out.append(Node(node.name, "constant", [], {"value": value}, value.dtype, value.shape))
    return _new_graph(out, g.initial_values), folded


def _evaluate(node: Node, opdef: OpDef, args: list, ctx: RunContext, max_bytes: int | None) -> np.ndarray | None:
    """The node's value, or None when it should not be folded."""
    if max_bytes is not None:
        if any(d is None for d in node.shape):
            return None
        if int(np.prod(node.shape, dtype=np.float64)) * np.dtype(node.dtype).itemsize > max_bytes:
            return None  # refused before computing: the value alone could exhaust the master's memory
    try:
        with np.errstate(all="ignore"):  # inf/nan from folding are what run time gives too
            value = np.asarray(opdef.reference(ctx, *args, **node.attrs), dtype=node.dtype)
    except (ValueError, TypeError, ArithmeticError, IndexError) as exc:
        log.debug("not folding %s (%s): %s", node.name, node.op, exc)
        return None
    declared = node.shape
    if len(declared) != value.ndim or any(d is not None and d != v for d, v in zip(declared, value.shape)):
        log.debug("not folding %s: value shape %s does not match %s", node.name, value.shape, declared)
        return None
    if max_bytes is not None and value.nbytes > max_bytes:
        return None
    return value


# ---- dead-node pruning ----------------------------------------------------------------
def prune(g: Graph, outputs: Sequence[str]) -> tuple[Graph, list[str]]:
    """Keep only the nodes ``outputs`` depend on; returns the new graph and the removed
    names (in graph order). Variables that are removed lose their initial values too.

    Example: after ``gradients(loss, [w])``, the gradient with respect to the input
    placeholder that the matmul rule also builds is removed by
    ``prune(g, [loss.name, dw.name])``.
    """
    _check_names(g, outputs, "output")
    needed = set(needed_nodes(g, list(outputs)))
    kept = [_copy_node(n) for n in g.nodes.values() if n.name in needed]
    removed = [name for name in g.nodes if name not in needed]
    return _new_graph(kept, g.initial_values), removed


# ---- common-subexpression elimination ------------------------------------------------
def eliminate_common_subexpressions(g: Graph, keep: Collection[str] = ()) -> tuple[Graph, dict[str, str]]:
    """Merge nodes that compute the same thing: the same op, attrs, dtype and shape on
    the same inputs (after merging), or constants with equal dtype, shape and bytes.

    The survivor of a group is its earliest node, unless the group holds nodes in
    ``keep``: then the earliest kept node survives (moved to the group's first
    position, so the order stays topological) and every kept node stays, as kept
    nodes may not disappear. Never merged: placeholders, variables, random ops and
    ops with a state update. Returns the new graph and ``{removed: survivor}``.

    Example: ``relu(x @ w) + relu(x @ w)`` keeps one matmul and one relu.
    """
    keep = set(keep)
    group: dict[str, str] = {}  # node -> first node of its group
    first_by_key: dict[Any, str] = {}
    members: dict[str, list[str]] = {}  # first node -> the group, in graph order
    for node in g.nodes.values():
        key = _cse_key(node, [group[i] for i in node.inputs])
        first = node.name if key is None else first_by_key.setdefault(key, node.name)
        group[node.name] = first
        members.setdefault(first, []).append(node.name)

    survivor: dict[str, str] = {}  # group's first node -> the name that stands for it
    merged: dict[str, str] = {}
    for first, names in members.items():
        kept = [n for n in names if n in keep]
        survivor[first] = kept[0] if kept else first
        for n in names:
            if n not in kept and n != survivor[first]:
                merged[n] = survivor[first]

    out: list[Node] = []
    for node in g.nodes.values():
        first = group[node.name]
        inputs = [survivor[group[i]] for i in node.inputs]
        if node.name == first:
            rep = g.nodes[survivor[first]]  # the group's survivor takes the first slot
            out.append(_copy_node(rep, inputs))
        elif node.name in keep and node.name != survivor[first]:
            out.append(_copy_node(node, inputs))
    return _new_graph(out, g.initial_values), merged


def _cse_key(node: Node, input_groups: list[str]) -> Any:
    """What makes two nodes interchangeable, or None for a node that is never merged."""
    if node.op == "constant":
        value = np.asarray(node.attrs["value"], dtype=node.dtype)
        return ("constant", freeze(value))
    if not is_mergeable(get_op(node.op, node.name)):
        return None
    attrs = tuple(sorted((k, freeze(v)) for k, v in node.attrs.items()))
    return (node.op, tuple(input_groups), attrs, node.dtype.str, node.shape)


# ---- the pipeline ---------------------------------------------------------------------------
@dataclass
class PassReport:
    """What ``optimize`` did: folded and pruned names, ``merged`` as {removed: survivor}."""

    folded: list[str] = field(default_factory=list)
    merged: dict[str, str] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    rounds: int = 0

    def summary(self) -> str:
        return (
            f"folded {len(self.folded)}, merged {len(self.merged)}, pruned {len(self.pruned)} nodes: "
            f"{self.nodes_before} -> {self.nodes_after} in {self.rounds} round{'s' if self.rounds != 1 else ''}"
        )


def optimize(
    g: Graph, outputs: Sequence[str], keep: Collection[str] = (), *, max_rounds: int = 4
) -> tuple[Graph, PassReport]:
    """Fold constants, merge common subexpressions and prune to ``outputs``, repeated
    until nothing changes (at most ``max_rounds`` rounds).

    ``keep`` names nodes that must survive under their own names and with their own
    values, like the placeholders a plan feeds; the outputs are always kept. Every
    name in ``outputs`` and ``keep`` must be a node of ``g``.
    """
    if max_rounds < 1:
        raise ValueError(f"optimize: max_rounds must be >= 1, got {max_rounds}")
    keep = set(keep) | set(outputs)
    _check_names(g, outputs, "output")
    _check_names(g, sorted(keep - set(outputs)), "kept node")
    roots = list(dict.fromkeys([*outputs, *(n for n in g.nodes if n in keep)]))
    report = PassReport(nodes_before=len(g.nodes))
    for _ in range(max_rounds):
        report.rounds += 1
        g, folded = fold_constants(g, keep)
        g, merged = eliminate_common_subexpressions(g, keep)
        g, pruned = prune(g, roots)
        report.folded += folded
        # A survivor of an earlier round may itself be merged away now.
        report.merged = {old: merged.get(new, new) for old, new in report.merged.items()}
        report.merged.update(merged)
        report.pruned += pruned
        if not (folded or merged or pruned):
            break
    report.nodes_after = len(g.nodes)
    return g, report
