"""Train a 784-256-128-10 ReLU MLP on MNIST with SGD + momentum (cosine-decayed learning rate).

Run it as a script (trains in-process)::

    python examples/mnist_mlp.py [--epochs 10] [--save model.npz]

or use it as a job file: it defines ``job()``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from client import nn  # noqa: E402
from client.job import Job, run_in_process  # noqa: E402

TRAIN_EXAMPLES = 60000


def build_model(seed: int = 0, epochs: int = 10, batch_size: int = 128) -> nn.Sequential:
    model = nn.Sequential(
        [
            nn.Dense(256, activation="relu", input_dim=784),
            nn.Dense(128, activation="relu"),
            nn.Dense(10, activation="softmax"),
        ],
        seed=seed,
    )
    steps = epochs * -(-TRAIN_EXAMPLES // batch_size)
    model.compile(
        optimizer=nn.optimizers.SGD(
            learning_rate=nn.optimizers.schedules.CosineDecay(0.1, decay_steps=max(steps, 1)), momentum=0.9
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def job(epochs: int = 10, batch_size: int = 128, seed: int = 0) -> Job:
    return Job(build_model(seed, epochs, batch_size), dataset="mnist", batch_size=batch_size, epochs=epochs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="write the trained model here (.npz)")
    args = p.parse_args(argv)
    j = job(args.epochs, args.batch_size, args.seed)
    _, test = run_in_process(j)
    if args.save:
        j.model.save(args.save)
        print(f"saved {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
