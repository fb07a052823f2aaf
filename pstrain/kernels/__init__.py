"""Kernel backends, one file each, behind one interface; ``get_backend`` chooses.
May import: ``graph`` only.

A backend provides:

- ``name``;
- ``empty(shape, dtype)`` / ``zeros(shape, dtype)`` / ``asarray(host_array)`` /
  ``to_host(array)`` / ``copy_into(dst, src)`` / ``all_finite(array)`` for its memory (host NumPy arrays for ``reference`` and ``cpu``, device arrays for ``cuda``);
- ``kernel(node)``: a callable ``k(ctx, out, *inputs)`` that computes ``node`` into
  the preallocated ``out``, or ``None`` when the backend has no kernel of its own
  for that op (the executor then falls back to the NumPy reference);
- ``fused(pattern, **attrs)``: fused kernels the executor's fusion pass asks for
  (``"dense"`` = matmul + bias + activation; ``"axpy"`` = ``a ± b * c``, c a scalar:
  ``k(ctx, out, a, b, c)``, attr ``negate``), or ``None``;
- ``optimizer_kernels()``: in-place ``sgd(param, grad, velocity, lr, momentum)`` and
  ``adam(param, grad, m, v, lr, beta1, beta2, eps, t)`` updates.

Usage::

    backend = get_backend("cpu")      # "reference" | "cpu" | "cuda" | "auto"
"""
from __future__ import annotations

import functools


@functools.cache
def get_backend(device: str = "cpu"):
    """The backend for ``device``; "auto" is cuda when a GPU is usable, else cpu."""
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "reference":
        from pstrain.kernels.reference import ReferenceBackend

        return ReferenceBackend()
    if device == "cpu":
        from pstrain.kernels.cpu import CpuBackend

        return CpuBackend()
    if device == "cuda":
        if not cuda_available():
            raise RuntimeError(
                "device 'cuda' was asked for but no CUDA GPU is usable (numba.cuda.is_available() is False); "
                "use --device cpu, or set NUMBA_ENABLE_CUDASIM=1 to run the CUDA kernels in the simulator"
            )
        from pstrain.kernels.cuda import CudaBackend

        return CudaBackend()
    raise ValueError(f"unknown device '{device}'; use one of: auto, cpu, cuda, reference")


def cuda_available() -> bool:
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # numba without CUDA support installed
        return False
