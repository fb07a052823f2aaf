"""Reverse-mode automatic differentiation over the op registry.

Usage::

    (dw, db) = gradients(loss, [w, b])

``gradients`` adds the backward nodes to the same graph. Gradients flow through
every path from ``y`` to each x; a non-trainable variable, an integer tensor or an
x that ``y`` does not depend on gets ``None``.
"""
from __future__ import annotations

from typing import Sequence

from graph import dtypes
from graph.core import Graph, Tensor
from graph.errors import GraphError
from graph.registry import get_op


def gradients(y: Tensor, xs: Sequence[Tensor], dy: Tensor | None = None) -> list[Tensor | None]:
    """d(sum y)/dx for each x in ``xs``; ``dy`` seeds the backward pass (default ones)."""
    g: Graph = y.graph
    if not dtypes.is_float(y.dtype):
        raise GraphError(f"cannot differentiate a {y.dtype} tensor", y.name, y.op)
    wanted = {x.name for x in xs}
    # Nodes on a path from some x to y: reachable backward from y and forward from xs.
    order = list(g.nodes)
    index = {n: i for i, n in enumerate(order)}
    upstream = {y.name}
    for name in reversed(order[: index[y.name] + 1]):
        if name in upstream:
            upstream.update(g.nodes[name].inputs)
    downstream = set(wanted)
    for name in order:
        if any(i in downstream for i in g.nodes[name].inputs):
            downstream.add(name)
    relevant = upstream & downstream

    grads: dict[str, Tensor] = {}
    if dy is None:
        dy = g.ones_like(y) if y.shape != () else g.constant(1.0, dtype=y.dtype)
    grads[y.name] = dy
    for name in reversed(order[: index[y.name] + 1]):
        if name not in relevant or name not in grads or name in wanted and not g.nodes[name].inputs:
            continue
        node = g.nodes[name]
        if not node.inputs:
            continue
        opdef = get_op(node.op, name)
        if not opdef.differentiable or opdef.grad is None:
            raise GraphError("has no gradient rule; it cannot sit between the loss and a variable", name, node.op)
        input_grads = opdef.grad(g, Tensor(g, name), grads[name])
        for inp, gi in zip(node.inputs, input_grads):
            if gi is None or inp not in relevant or not _differentiable(g, inp):
                continue
            grads[inp] = gi if inp not in grads else g.add(grads[inp], gi)
    return [grads.get(x.name) if _differentiable(g, x.name) else None for x in xs]


def _differentiable(g: Graph, name: str) -> bool:
    node = g.nodes[name]
    if not dtypes.is_float(node.dtype):
        return False
    return not (node.op == "variable" and not node.attrs.get("trainable", True))
