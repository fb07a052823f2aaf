"""pstrain: the shared layers under the role packages, and the public front door
``import pstrain as pt`` (the eager API).

The layers, top to bottom; imports point down only (import-linter contracts in
pyproject.toml, run by ``make test``)::

    client                         Keras API, job files, psctl, launchers
    master | psserver | worker     services: gRPC edge <-> plain types; independent of each other
    pstrain.transport              clients of the services (PS client, master client, membership)
    protos | pstrain.eager         wire format: .proto, codec, frames, shared memory, rpc helpers | eager tensors, tape
    pstrain.runtime                core: plan, executor, step, optimizers, store, placement, data, model file
    pstrain.kernels                kernel backends (reference | cpu | cuda) behind one interface
    graph                          graph IR, op registry, autodiff

This module itself stays import-free so that importing any layer below does not
load the ones above it; the eager API (``pt.constant``, ``pt.GradientTape``, ...,
in ``pstrain/eager.py``: the graph IR, and the runtime's executor for pt.function) loads
on first use.
"""

_EAGER = frozenset({
    "Tensor", "Variable", "GradientTape", "Function", "constant", "function", "linalg",
    "float16", "float32", "float64", "int32", "int64", "bool_",
    "add", "subtract", "multiply", "divide", "pow", "negative", "maximum", "matmul", "reshape", "expand_dims",
    "transpose", "reduce_sum", "reduce_mean", "reduce_max", "exp", "log", "sqrt", "square", "abs", "sin", "cos",
    "sigmoid", "tanh", "relu", "softmax", "cast", "concat",
})


def __getattr__(name: str):
    if name in _EAGER:
        from pstrain import eager

        return getattr(eager, name)
    raise AttributeError(f"module 'pstrain' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _EAGER)
