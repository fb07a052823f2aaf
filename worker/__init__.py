"""pstrain worker: runs a graph's forward and backward passes with Numba kernels."""
