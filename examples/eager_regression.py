"""Linear regression written eagerly (tensors, a GradientTape, assign_sub), then the same
loss as a job that trains on a cluster.

    python examples/eager_regression.py                     # the eager loop, then the traced step
    psctl train examples/eager_regression.py -o reg.npz    # the same loss on a local 2 x 2 cluster
    psctl plan examples/eager_regression.py                 # what the master makes of it

The loss function is all a job needs: the master traces it, adds the backward pass and
places ``w`` and ``b`` on the parameter-server shards; ``reg.npz`` holds them by name.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pstrain as pt  # noqa: E402

TRUE_W = np.array([[1.5], [-2.0], [0.5], [3.0], [-1.0]], np.float32)
TRUE_B = 0.7

w = pt.Variable(np.zeros((5, 1), np.float32), name="w")
b = pt.Variable(np.zeros(1, np.float32), name="b")


def loss(x, y):
    """Mean squared error of the line x @ w + b."""
    return pt.reduce_mean(pt.square(x @ w + b - y))


LR = 0.1


@pt.function
def train_step(x, y):
    """One SGD step as one traced graph (TensorFlow's @tf.function train step)."""
    with pt.GradientTape() as tape:
        value = loss(x, y)
    dw, db = tape.gradient(value, [w, b])
    w.assign_sub(LR * dw)
    b.assign_sub(LR * db)
    return value


def data(n: int = 1024, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x @ TRUE_W + TRUE_B + rng.normal(0, 0.01, (n, 1))).astype(np.float32)
    return x, y


def dataset_path() -> str:
    """The points as an .npz beside the other cached data (what the job trains on)."""
    x, y = data()
    path = os.path.join(os.environ.get("PSTRAIN_CACHE") or os.path.expanduser("~/.cache/pstrain"), "eager-regression.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, x_train=x, y_train=y, x_test=x[:256], y_test=y[:256])
    return path


def job(epochs: int = 10, batch_size: int = 64):
    from client import nn
    from client.job import Job

    return Job(loss, variables=[w, b], optimizer=nn.optimizers.SGD(LR), dataset=dataset_path(),
               batch_size=batch_size, epochs=epochs)


def main(steps: int = 100) -> float:
    xs, ys = data()
    x, y = pt.constant(xs), pt.constant(ys)
    for step in range(steps):  # eagerly: every op runs at once, the tape records them
        with pt.GradientTape() as tape:
            value = loss(x, y)
        dw, db = tape.gradient(value, [w, b])
        w.assign_sub(LR * dw)
        b.assign_sub(LR * db)
        if step % 25 == 0:
            print(f"eager step {step:3d}  loss {float(value):.5f}")
    for step in range(steps, 2 * steps):  # the same step traced once, then run as a graph
        value = train_step(x, y)
        if step % 25 == 0:
            print(f"pt.function step {step:3d}  loss {float(value):.5f}")
    print("w =", np.round(w.numpy().ravel(), 3), "(want", TRUE_W.ravel(), ")")
    print(f"b = {float(b.numpy()[0]):.3f} (want {TRUE_B})")
    return float(value)


if __name__ == "__main__":
    main()
