"""The low-level graph API: build a graph, take gradients, run SGD by hand.

Fits y = 3x - 2 with a one-unit linear model::

    python examples/graph_api.py

The same graph is a job (``job()``: its loss tensor, with x and y fed from an .npz)
that trains on a cluster, as any graph does::

    psctl train examples/graph_api.py --workers 2 --ps 2 -o line.npz   # line.npz: {"w": ..., "b": ...}
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graph import Graph, RunContext, gradients  # noqa: E402
from pstrain.runtime.executor import Executor  # noqa: E402


def line_model():
    """x, y placeholders; w, b variables; the mean squared error of x @ w + b."""
    g = Graph()
    x = g.placeholder((None, 1), "float32", name="x")
    y = g.placeholder((None, 1), "float32", name="y")
    w = g.variable(np.zeros((1, 1), np.float32), name="w")
    b = g.variable(np.zeros((1,), np.float32), name="b")
    return g, x, w, b, g.mse(x @ w + b, y, name="loss")


def job(epochs: int = 20):
    """The graph as a job: points of y = 3x - 2 in an .npz beside the other cached data."""
    from client import nn
    from client.job import Job

    rng = np.random.default_rng(0)
    xs = rng.uniform(-1, 1, (1024, 1)).astype(np.float32)
    path = os.path.join(os.environ.get("PSTRAIN_CACHE") or os.path.expanduser("~/.cache/pstrain"), "line-3x-2.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, x_train=xs, y_train=3 * xs - 2, x_test=xs[:256], y_test=3 * xs[:256] - 2)
    *_, loss = line_model()
    return Job(loss, optimizer=nn.optimizers.SGD(0.1), dataset=path, batch_size=64, epochs=epochs)


def main() -> float:
    g, x, w, b, loss = line_model()
    dw, db = gradients(loss, [w, b])

    ex = Executor(g, [loss, dw, db], backend="cpu")
    rng = np.random.default_rng(0)
    xs = rng.uniform(-1, 1, (256, 1)).astype(np.float32)
    ys = 3 * xs - 2
    params = {"w": g.initial_values["w"].copy(), "b": g.initial_values["b"].copy()}
    for step in range(200):
        loss_v, gw, gb = ex.run({"x": xs, "y": ys}, params, RunContext(step=step)).values
        params["w"] -= 0.1 * gw
        params["b"] -= 0.1 * gb
        if step % 50 == 0:
            print(f"step {step:3d}  loss {float(loss_v):.5f}")
    print(f"w = {params['w'].item():.3f} (want 3), b = {params['b'].item():.3f} (want -2)")
    return float(loss_v)


if __name__ == "__main__":
    main()
