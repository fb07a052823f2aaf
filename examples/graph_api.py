"""The low-level graph API: build a graph, take gradients, run SGD by hand.

Fits y = 3x - 2 with a one-unit linear model::

    python examples/graph_api.py
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graph import Graph, RunContext, gradients  # noqa: E402
from pstrain.runtime.executor import Executor  # noqa: E402


def main() -> float:
    g = Graph()
    x = g.placeholder((None, 1), "float32", name="x")
    y = g.placeholder((None, 1), "float32", name="y")
    w = g.variable(np.zeros((1, 1), np.float32), name="w")
    b = g.variable(np.zeros((1,), np.float32), name="b")
    loss = g.mse(x @ w + b, y, name="loss")
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
