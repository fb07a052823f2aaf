"""Training steps on the CUDA backend match the CPU backend.

In CI this runs one step of a tiny model in Numba's CUDA simulator; on a GPU machine
(``PSTRAIN_REAL_GPU=1 pytest -m gpu tests/worker``) it trains a bigger MLP for
several steps on the device and compares every weight with the CPU run.
"""
import os

import numpy as np
import pytest
from numba import cuda

from client import datasets, nn

REAL_GPU = os.environ.get("PSTRAIN_REAL_GPU") == "1"

pytestmark = [
    pytest.mark.skipif(not cuda.is_available(), reason="numba.cuda has no usable GPU or simulator"),
    *([pytest.mark.gpu] if REAL_GPU else []),
]

if REAL_GPU:
    SIZES, BATCH, STEPS = (32, 64, 32, 4), 128, 20
else:  # the simulator runs each GPU thread as a Python thread: keep it tiny
    SIZES, BATCH, STEPS = (6, 5, 3), 8, 1


def _model(device: str, dtype: str, optimizer):
    layers = [nn.Dense(SIZES[1], activation="relu", input_dim=SIZES[0], kernel_regularizer=nn.regularizers.L2(1e-3))]
    layers += [nn.Dense(u, activation="tanh") for u in SIZES[2:-1]]
    layers += [nn.Dense(SIZES[-1], activation="softmax")]
    m = nn.Sequential(layers, dtype=dtype, seed=3, device=device)
    m.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 2e-4)])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_cuda_training_matches_cpu(dtype, rtol, opt):
    optimizer = nn.optimizers.SGD(0.1, momentum=0.9) if opt == "sgd" else nn.optimizers.Adam(0.01)
    data = datasets.synthetic(n_train=BATCH * STEPS, n_test=BATCH, dim=SIZES[0], num_classes=SIZES[-1])
    gpu, cpu = _model("cuda", dtype, optimizer), _model("cpu", dtype, optimizer)
    for s in range(STEPS):
        xb = data.x_train[s * BATCH : (s + 1) * BATCH]
        yb = data.y_train[s * BATCH : (s + 1) * BATCH]
        lg, ag = gpu.train_on_batch(xb, yb)
        lc, ac = cpu.train_on_batch(xb, yb)
        np.testing.assert_allclose(lg, lc, rtol=rtol, atol=rtol)
    for wg, wc in zip(gpu.get_weights(), cpu.get_weights()):
        np.testing.assert_allclose(wg, wc, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(gpu.predict(data.x_test), cpu.predict(data.x_test), rtol=rtol, atol=rtol)
