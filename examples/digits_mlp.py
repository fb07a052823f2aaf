"""A small, fast job: a 64-32-10 MLP on scikit-learn's 8x8 digits (a few seconds).

    psctl train examples/digits_mlp.py --workers 2 --ps 1
    python examples/digits_mlp.py          # in-process
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from client import nn  # noqa: E402
from client.job import Job, run_in_process  # noqa: E402


def job(epochs: int = 20, batch_size: int = 64, seed: int = 0) -> Job:
    model = nn.Sequential(
        [nn.Dense(32, activation="relu", input_dim=64), nn.Dense(10, activation="softmax")], seed=seed
    )
    model.compile(nn.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return Job(model, dataset="digits", batch_size=batch_size, epochs=epochs)


if __name__ == "__main__":
    run_in_process(job())
