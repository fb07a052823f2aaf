"""Errors raised while building, validating or running a graph.

Every error names the node it concerns, so a user can find the layer or op to fix.
"""
from __future__ import annotations


class GraphError(ValueError):
    """A graph is malformed; ``node`` names the offending node (may be None)."""

    def __init__(self, message: str, node: str | None = None, op: str | None = None):
        self.node = node
        self.op = op
        self.detail = message
        where = ""
        if node is not None:
            where = f"node '{node}'" + (f" (op '{op}')" if op else "") + ": "
        super().__init__(where + message)


class ShapeError(GraphError):
    """Static shapes of an op's inputs are incompatible."""


class DTypeError(GraphError):
    """An input has a dtype the op cannot take, or two dtypes clash."""


class UnknownOpError(GraphError):
    """The op type is not in the registry."""


class CycleError(GraphError):
    """The graph has a cycle."""


class DanglingInputError(GraphError):
    """A node names an input that does not exist."""
