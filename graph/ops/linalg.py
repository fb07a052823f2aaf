"""Linear algebra on square matrices: ``matrix_inverse`` and ``matrix_determinant``
(rank 2, float). A singular matrix is an error naming the op, not a silent inf.

Gradients (with Y = X^-1): d(X^-1) = -Y^T dY Y^T; d(det X) = dy * det(X) * Y^T.
"""
from __future__ import annotations

import numpy as np

from graph.errors import ShapeError
from graph.ops._util import defop, fmt_shape, require_float
from graph.registry import TensorSpec


def _square(op):
    def infer(node, specs, attrs):
        (x,) = specs
        require_float(x, node, op)
        if x.rank != 2 or (x.shape[0] is not None and x.shape[1] is not None and x.shape[0] != x.shape[1]):
            raise ShapeError(f"{op} needs a square matrix (n, n), got shape {fmt_shape(x.shape)}", node, op)
        return x if op == "matrix_inverse" else TensorSpec((), x.dtype)

    return infer


def _inverse_ref(ctx, x):
    try:
        return np.linalg.inv(x)
    except np.linalg.LinAlgError:
        raise ValueError(f"the {x.shape[0]}x{x.shape[1]} matrix is singular: it has no inverse "
                         f"(its determinant is {np.linalg.det(x):g})") from None


def _inverse_grad(g, y, dy):
    yt = g.transpose(y, perm=[1, 0])
    return [g.neg(g.matmul(g.matmul(yt, dy), yt))]


def _det_grad(g, y, dy):
    x = g.tensor(y.node.inputs[0])
    return [g.mul(g.mul(dy, y), g.transpose(g.matrix_inverse(x), perm=[1, 0]))]


defop("matrix_inverse", _square("matrix_inverse"), _inverse_ref, _inverse_grad, num_inputs=1,
      doc="The inverse of a square matrix; a singular one is an error.")
defop("matrix_determinant", _square("matrix_determinant"), lambda ctx, x: np.asarray(np.linalg.det(x), x.dtype),
      _det_grad, num_inputs=1, doc="The determinant of a square matrix (a scalar).")
