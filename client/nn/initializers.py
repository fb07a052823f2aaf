"""Weight initializers by Keras name (or a NumPy array used as is)."""
from __future__ import annotations

import numpy as np

NAMES = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "zeros", "ones", "random_normal", "random_uniform")


def _fans(shape):
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def initialize(init, shape: tuple, dtype, rng: np.random.Generator, where: str) -> np.ndarray:
    """A new array of ``shape`` drawn by ``init`` (a name or an array)."""
    if isinstance(init, np.ndarray) or isinstance(init, (list, tuple)):
        arr = np.asarray(init)
        if arr.shape != tuple(shape):
            raise ValueError(f"{where}: initializer array has shape {arr.shape}, the weight needs {tuple(shape)}")
        return arr.astype(dtype, copy=True)
    if init not in NAMES:
        raise ValueError(f"{where}: unknown initializer '{init}'; use one of {', '.join(NAMES)} or an array")
    fan_in, fan_out = _fans(shape)
    if init == "zeros":
        out = np.zeros(shape)
    elif init == "ones":
        out = np.ones(shape)
    elif init == "glorot_uniform":
        lim = np.sqrt(6.0 / (fan_in + fan_out))
        out = rng.uniform(-lim, lim, shape)
    elif init == "glorot_normal":
        out = rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), shape)
    elif init == "he_uniform":
        lim = np.sqrt(6.0 / fan_in)
        out = rng.uniform(-lim, lim, shape)
    elif init == "he_normal":
        out = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif init == "random_normal":
        out = rng.normal(0.0, 0.05, shape)
    else:
        out = rng.uniform(-0.05, 0.05, shape)
    return np.asarray(out, dtype=dtype)
