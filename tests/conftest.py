"""Test-wide setup.

CUDA kernels run in Numba's simulator unless PSTRAIN_REAL_GPU=1 (then
``pytest -m gpu`` runs the same kernel tests on a real GPU). The variable must be
set before anything imports numba, which is why it lives here.
"""
import os

if os.environ.get("PSTRAIN_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
