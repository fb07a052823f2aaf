"""pstrain's graph IR: op registry, builder and autodiff (imports neither grpc nor numba).

The bottom layer: imports nothing of pstrain's.

Usage::

    from graph import Graph, gradients
    g = Graph()
    x = g.placeholder((None, 2), name="x")
    w = g.variable(np.zeros((2, 1), np.float32), name="w")
    loss = g.reduce_mean(g.square(x @ w))
    (dw,) = gradients(loss, [w])
"""
from graph.autodiff import gradients
from graph.core import Graph, Node, Tensor
from graph.errors import (
    CycleError,
    DanglingInputError,
    DTypeError,
    GraphError,
    ShapeError,
    UnknownOpError,
)
from graph.registry import OpDef, RunContext, TensorSpec, all_ops, get_op
from graph.validate import load_nodes

__all__ = [
    "Graph", "Node", "Tensor", "gradients", "load_nodes", "OpDef", "RunContext", "TensorSpec",
    "all_ops", "get_op", "GraphError", "ShapeError", "DTypeError", "UnknownOpError", "CycleError",
    "DanglingInputError",
]
