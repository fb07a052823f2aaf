"""Rebuild a ``Graph`` from untrusted node records (e.g. a decoded GraphDef),
checking everything: unknown ops, dangling inputs, cycles, attrs, shapes, dtypes.

Usage::

    g = load_nodes([{"name": "x", "op": "placeholder", "inputs": [], "attrs": {},
                     "dtype": "float32", "shape": [None, 3]}, ...], initial_values)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from graph import dtypes
from graph.core import _NAME_OK, Graph, Node
from graph.errors import CycleError, DanglingInputError, DTypeError, GraphError, ShapeError
from graph.registry import TensorSpec, get_op


def topological_order(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Order node records so inputs come first; raise on duplicates, dangling inputs, cycles."""
    by_name: dict[str, Mapping[str, Any]] = {}
    for r in records:
        if r["name"] in by_name:
            raise GraphError("duplicate node name", r["name"], r.get("op"))
        by_name[r["name"]] = r
    for r in records:
        for i in r["inputs"]:
            if i not in by_name:
                raise DanglingInputError(f"input '{i}' does not exist in the graph", r["name"], r["op"])
    state: dict[str, int] = {}  # 1 visiting, 2 done
    out: list[Mapping[str, Any]] = []
    for root in by_name:
        stack = [(root, iter(by_name[root]["inputs"]))]
        if state.get(root) == 2:
            continue
        state[root] = 1
        while stack:
            name, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[name] = 2
                out.append(by_name[name])
            elif state.get(nxt) == 1:
                cycle = [n for n, _ in stack[[n for n, _ in stack].index(nxt):]] + [nxt]
                raise CycleError(f"cycle: {' -> '.join(cycle)}", name, by_name[name]["op"])
            elif state.get(nxt) is None:
                state[nxt] = 1
                stack.append((nxt, iter(by_name[nxt]["inputs"])))
    return out


def load_nodes(records: Sequence[Mapping[str, Any]], initial_values: Mapping[str, np.ndarray] | None = None) -> Graph:
    """Validate node records and return the equivalent ``Graph``."""
    initial_values = dict(initial_values or {})
    for i, r in enumerate(records):
        missing = {"name", "op", "inputs", "dtype", "shape"} - set(r)
        if missing:
            raise GraphError(f"node record is missing {sorted(missing)}", r.get("name") or f"nodes[{i}]", r.get("op"))
    g = Graph()
    for r in topological_order(records):
        name, op = r["name"], r["op"]
        opdef = get_op(op, name)
        if not _NAME_OK.match(str(name)):
            raise GraphError("node names must start with a letter or '_' and use [A-Za-z0-9_./:-]", name, op)
        shape = tuple(None if d is None or d == -1 else int(d) for d in r["shape"])
        if any(d is not None and d < 0 for d in shape):
            raise ShapeError(f"negative dimension in declared shape {tuple(r['shape'])}", name, op)
        declared = TensorSpec(shape, dtypes.as_dtype(r["dtype"], name))
        attrs = dict(r.get("attrs") or {})
        unknown = set(attrs) - set(opdef.attrs)
        if unknown:
            raise GraphError(f"unknown attrs {sorted(unknown)}; allowed: {sorted(opdef.attrs)}", name, op)
        attrs = {**opdef.attrs, **attrs}
        if opdef.num_inputs is not None and len(r["inputs"]) != opdef.num_inputs:
            raise GraphError(f"takes {opdef.num_inputs} inputs, got {len(r['inputs'])}", name, op)
        if op == "placeholder":
            spec = declared
        elif op == "variable":
            if name not in initial_values:
                raise GraphError("variable has no initial value", name, op)
            v = np.asarray(initial_values[name])
            spec = TensorSpec(v.shape, v.dtype)
            g.initial_values[name] = v
        elif op == "constant":
            v = attrs.get("value")
            if not isinstance(v, np.ndarray):
                raise GraphError("constant has no value", name, op)
            spec = TensorSpec(v.shape, v.dtype)
        else:
            spec = _infer(opdef, name, [g.nodes[i].spec for i in r["inputs"]], attrs)
        _check_declared(name, op, declared, spec)
        g.nodes[name] = Node(name, op, list(r["inputs"]), attrs, np.dtype(spec.dtype), tuple(spec.shape))
        g._counts.setdefault(name, 0)
    return g


def _infer(opdef, name: str, specs: list[TensorSpec], attrs: dict) -> TensorSpec:
    """The op's shape rule, with any error as a GraphError naming the node: the rules
    trust their attrs (the builder gives sane ones), and a decoded graph's are untrusted."""
    try:
        return opdef.infer(name, specs, attrs)
    except GraphError:
        raise
    except (TypeError, ValueError, LookupError, ArithmeticError) as exc:
        shown = {k: v for k, v in attrs.items() if not isinstance(v, np.ndarray)}
        raise GraphError(f"attrs {shown} do not fit this op and its inputs ({type(exc).__name__}: {exc})",
                         name, opdef.name) from exc


def _check_declared(name, op, declared: TensorSpec, inferred: TensorSpec) -> None:
    if declared.dtype != inferred.dtype:
        raise DTypeError(f"declared dtype {declared.dtype} but its inputs give {inferred.dtype}", name, op)
    if len(declared.shape) != len(inferred.shape) or any(
        a is not None and b is not None and a != b for a, b in zip(declared.shape, inferred.shape)
    ):
        raise ShapeError(f"declared shape {declared.shape} but its inputs give {inferred.shape}", name, op)
