"""The reference backend: every op computed by its NumPy reference from the registry.

Slow (it allocates every step) but the ground truth the other backends are tested
against, and the fallback for ops a backend has no kernel for.
"""
from __future__ import annotations

import numpy as np

from graph.registry import get_op


def reference_kernel(node):
    """``k(ctx, out, *inputs)`` writing the reference result of ``node`` into ``out``."""
    ref = get_op(node.op, node.name).reference
    attrs = node.attrs

    def k(ctx, out, *inputs):
        out[...] = ref(ctx, *inputs, **attrs)

    return k


def sgd_update(param, grad, velocity, lr, momentum):
    """PyTorch's rule: v = momentum * v + g; p -= lr * v (plain SGD when momentum == 0)."""
    if momentum:
        velocity *= momentum
        velocity += grad
        param -= lr * velocity
    else:
        param -= lr * grad


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, t):
    """Adam (Kingma & Ba, PyTorch's placement of eps) at step t (1-based)."""
    m *= beta1
    m += (1 - beta1) * grad
    v *= beta2
    v += (1 - beta2) * grad * grad
    mhat = m / (1 - beta1**t)
    vhat = v / (1 - beta2**t)
    param -= (lr * mhat / (np.sqrt(vhat) + eps)).astype(param.dtype)


class ReferenceBackend:
    name = "reference"

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def asarray(self, a):
        return np.asarray(a)

    def to_host(self, a):
        return np.asarray(a)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def copy_into(self, dst, src):
        """Overwrite ``dst`` in place with ``src`` (same shape)."""
        dst[...] = src

    @staticmethod
    def all_finite(a) -> bool:
        """True when ``a`` holds no NaN or Inf."""
        a = np.asarray(a)
        if a.size == 0 or a.dtype.kind not in "fc":
            return True
        # max/min are NaN if any element is, and +-Inf if any element is: no temporaries.
        return bool(np.isfinite(np.max(a)) and np.isfinite(np.min(a)))

    def kernel(self, node):
        return reference_kernel(node)

    def fused(self, pattern, **attrs):
        return None

    def optimizer_kernels(self):
        return {"sgd": sgd_update, "adam": adam_update}
