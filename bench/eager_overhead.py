"""The eager API's overhead: one training step of the MNIST MLP (784-256-128-10, ReLU,
softmax cross-entropy, SGD, batch 128) written eagerly under a ``GradientTape`` with
``assign_sub`` updates, and the same loss as a ``pt.function`` (its compiled forward and
backward pass), against the same step through ``model.fit``, in one run.

    python bench/eager_overhead.py [--steps 40] [--repeats 5]

Each figure is the best of ``repeats`` runs of ``steps`` steps after a warm-up (load
from other processes only slows a run down). Targets: eager within 3x of fit, a
``pt.function`` step within 1.2x.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH = 128
TARGET_EAGER, TARGET_FUNCTION = 3.0, 1.2


def best_ms(run, steps: int, repeats: int) -> float:
    run()  # warm-up: kernels compile, traces build
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) / steps * 1e3)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import pstrain as pt
    from client import datasets, nn

    data = datasets.load("mnist")
    n = BATCH * args.steps
    x, y = data.x_train[:n], data.y_train[:n]
    one_hot = np.eye(10, dtype=np.float32)[y]

    model = nn.Sequential([nn.Dense(256, activation="relu", input_dim=784), nn.Dense(128, activation="relu"),
                           nn.Dense(10, activation="softmax")], seed=0)
    model.compile(nn.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    fit = best_ms(lambda: model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0), args.steps, args.repeats)

    rng = np.random.default_rng(0)
    weights = [pt.Variable(rng.normal(0, 0.05, s).astype(np.float32))
               for s in [(784, 256), (256,), (256, 128), (128,), (128, 10), (10,)]]

    def loss_fn(xb, yb):
        h = pt.relu(xb @ weights[0] + weights[1])
        h = pt.relu(h @ weights[2] + weights[3])
        p_ = pt.softmax(h @ weights[4] + weights[5])
        return -pt.reduce_mean(pt.reduce_sum(yb * pt.log(p_), axis=1))

    def train(f):
        def run():
            for i in range(args.steps):
                xb, yb = pt.constant(x[i * BATCH:(i + 1) * BATCH]), pt.constant(one_hot[i * BATCH:(i + 1) * BATCH])
                with pt.GradientTape() as tape:
                    loss = f(xb, yb)
                for v, g in zip(weights, tape.gradient(loss, weights)):
                    v.assign_sub(0.05 * g)
        return run

    eager = best_ms(train(loss_fn), args.steps, args.repeats)
    function = best_ms(train(pt.function(loss_fn)), args.steps, args.repeats)
    print(f"MNIST MLP, batch {BATCH}, one training step (best of {args.repeats} x {args.steps} steps):")
    print(f"  model.fit                         {fit:7.3f} ms   1.00x")
    print(f"  eager, GradientTape + assign_sub  {eager:7.3f} ms   {eager / fit:.2f}x")
    print(f"  pt.function under a tape          {function:7.3f} ms   {function / fit:.2f}x")
    for what, ratio, target in (("eager", eager / fit, TARGET_EAGER), ("pt.function", function / fit, TARGET_FUNCTION)):
        print(f"{'PASS' if ratio <= target else 'MISS'}  {what}: {ratio:.2f}x fit's step (target <= {target}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
