"""A plain NumPy interpreter of a graph: the reference semantics, used by tests,
constant folding and as the oracle the worker's kernels are checked against.

Usage::

    out = evaluate(g, [loss], feeds={"x": xb}, params={"w": w0})
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from graph.core import Graph, Tensor
from graph.errors import GraphError
from graph.registry import RunContext, get_op


def needed_nodes(g: Graph, fetches: Sequence[str]) -> list[str]:
    """Names of the nodes ``fetches`` depend on, in topological order."""
    need = set(fetches)
    for name in reversed(list(g.nodes)):
        if name in need:
            need.update(g.nodes[name].inputs)
    return [n for n in g.nodes if n in need]


def evaluate(
    g: Graph,
    fetches: Sequence[Tensor | str],
    feeds: Mapping[str, np.ndarray] | None = None,
    params: Mapping[str, np.ndarray] | None = None,
    ctx: RunContext | None = None,
    known: Mapping[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Compute ``fetches``; variables take ``params`` (default: their initial values);
    ``known``: values of nodes already computed (e.g. an eager forward pass), not computed again."""
    ctx = ctx or RunContext()
    feeds = dict(feeds or {})
    params = dict(params or {})
    names = [f.name if isinstance(f, Tensor) else f for f in fetches]
    values: dict[str, np.ndarray] = dict(known or {})
    for name in needed_nodes(g, names):
        node = g.nodes[name]
        if name in values:
            continue
        if node.op == "placeholder":
            if name not in feeds:
                raise GraphError("placeholder was not fed", name, "placeholder")
            values[name] = np.asarray(feeds[name], dtype=node.dtype)
        elif node.op == "variable":
            values[name] = np.asarray(params.get(name, g.initial_values[name]))
        else:
            opdef = get_op(node.op, name)
            args = [values[i] for i in node.inputs]
            try:
                out = opdef.reference(ctx, *args, **node.attrs)
            except (ValueError, TypeError, FloatingPointError) as exc:
                raise GraphError(str(exc), name, node.op) from exc
            values[name] = np.asarray(out, dtype=node.dtype)
    return [values[n] for n in names]
