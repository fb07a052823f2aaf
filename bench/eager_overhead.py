"""The eager API's overhead: one training step of the MNIST MLP (784-256-128-10, ReLU,
softmax cross-entropy, SGD, batch 128) against the same step through ``model.fit``, in
one run, three ways:

- eager: the loss written eagerly under a ``GradientTape``, ``assign_sub`` updates;
- the loss as a ``pt.function`` under that tape (its compiled forward and backward
  pass), the updates still eager;
- the whole step as a ``pt.function`` (tape and ``assign_sub`` inside it, TensorFlow's
  ``@tf.function def train_step``): one compiled graph per step.

    python bench/eager_overhead.py [--steps 40] [--repeats 5]

Each figure is the best of ``repeats`` runs of ``steps`` steps after a warm-up (load
from other processes only slows a run down); every way starts from the same weights.
Targets: eager within 3x of fit, a ``pt.function`` step within 1.2x.
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
    initial = [rng.normal(0, 0.05, s).astype(np.float32) for s in [(784, 256), (256,), (256, 128), (128,), (128, 10), (10,)]]
    weights = [pt.Variable(w) for w in initial]

    def loss_fn(xb, yb):
        h = pt.relu(xb @ weights[0] + weights[1])
        h = pt.relu(h @ weights[2] + weights[3])
        p_ = pt.softmax(h @ weights[4] + weights[5])
        return -pt.reduce_mean(pt.reduce_sum(yb * pt.log(p_), axis=1))

    def tape_step(loss):
        def step(xb, yb):
            with pt.GradientTape() as tape:
                value = loss(xb, yb)
            for v, g in zip(weights, tape.gradient(value, weights)):
                v.assign_sub(0.05 * g)
            return value
        return step

    def train(step):
        def run():
            for v, w in zip(weights, initial):
                v.assign(w)
            for i in range(args.steps):
                step(pt.constant(x[i * BATCH:(i + 1) * BATCH]), pt.constant(one_hot[i * BATCH:(i + 1) * BATCH]))
        return run

    eager = best_ms(train(tape_step(loss_fn)), args.steps, args.repeats)
    loss_function = best_ms(train(tape_step(pt.function(loss_fn))), args.steps, args.repeats)
    step_function = best_ms(train(pt.function(tape_step(loss_fn))), args.steps, args.repeats)
    print(f"MNIST MLP, batch {BATCH}, one training step (best of {args.repeats} x {args.steps} steps):")
    print(f"  model.fit                                   {fit:7.3f} ms   1.00x")
    print(f"  eager, GradientTape + assign_sub            {eager:7.3f} ms   {eager / fit:.2f}x")
    print(f"  loss as a pt.function, eager updates        {loss_function:7.3f} ms   {loss_function / fit:.2f}x")
    print(f"  the step as a pt.function (tape inside)     {step_function:7.3f} ms   {step_function / fit:.2f}x")
    for what, ratio, target in (("eager", eager / fit, TARGET_EAGER),
                                ("pt.function step", step_function / fit, TARGET_FUNCTION)):
        print(f"{'PASS' if ratio <= target else 'MISS'}  {what}: {ratio:.2f}x fit's step (target <= {target}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
