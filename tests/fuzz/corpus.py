"""Seed inputs for the fuzz harnesses: small valid encodings to start mutating from.

Plain Python (no atheris): the harnesses, run as scripts, and the pytest driver both
import it. ``write_seeds(harness, directory)`` writes one file per seed.

Usage::

    from tests.fuzz import corpus
    corpus.write_seeds("jobspec", tmp_path)     # tmp_path/seed-000, seed-001, ...
"""
from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

from graph.core import Graph
from protos import jobcodec, tensorwire
from pstrain.runtime.spec import JobSpec, ModelSpec, TrainConfig

SHM_TOKEN = bytes(range(16))  # the token fuzz_shm_header's segments start with
PUSH_JOB = "fuzz-job"  # the job fuzz_push_frame's shard serves
PUSH_SHM_NAME = "pstrain-fuzz-push"  # the segment fuzz_push_frame attaches for its shard
PUSH_VARIABLES = {  # the shard's variables (and the shapes a valid push carries)
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 10,
    "b": np.zeros(3, np.float32),
    "steps": np.zeros((), np.int64),  # state, not trainable: pushed as an assignment
}
PUSH_TRAINABLE = ("w", "b")


# ---- job specs -----------------------------------------------------------------------
def sequential_spec() -> JobSpec:
    """The spec ``psctl submit`` sends for a small Keras-style MLP on digits."""
    from client import nn
    from client.job import Job, job_to_spec

    model = nn.Sequential([nn.Dense(8, activation="relu", input_dim=64), nn.Dense(10, activation="softmax")], seed=0)
    model.compile(optimizer=nn.optimizers.SGD(learning_rate=0.1), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return job_to_spec(Job(model, dataset="digits", batch_size=16, epochs=1), name="tiny")


def graph_spec(mode: str = "async", optimizer: dict | None = None) -> JobSpec:
    """A low-level graph job using more of the op set: reshape, reductions over an
    axis, constants, tanh/sigmoid, and a variable that is not trained."""
    g = Graph()
    x = g.placeholder((None, 4), "float32", name="x")
    y = g.placeholder((None, 1), "float32", name="y")
    w = g.variable(np.full((4, 3), 0.1, np.float32), name="w")
    b = g.variable(np.zeros(3, np.float32), name="b")
    scale = g.variable(np.float32(2.0), trainable=False, name="scale")
    h = g.tanh(g.add(g.matmul(x, w), b), name="h")
    r = g.reshape(h, shape=(-1, 3, 1), name="r")
    s = g.reduce_sum(r, axis=2, name="s")
    p = g.sigmoid(g.reduce_mean(s, axis=1, keepdims=True) * scale, name="p")
    loss = g.reduce_mean(g.square(g.sub(p, y)), name="loss")
    model = ModelSpec(g, "x", "y", loss.name, p.name, weight_order=("w", "b"))
    train = TrainConfig(optimizer=optimizer or {"name": "adam", "learning_rate": 0.01}, batch_size=8, epochs=2,
                        mode=mode, staleness=2 if mode == "ssp" else 0, seed=3)
    return JobSpec("graph", model, train, "synthetic")


@functools.cache
def jobspec_seeds() -> tuple[bytes, ...]:
    """Serialized ``master_pb2.JobSpec`` messages that plan."""
    specs = [sequential_spec(), graph_spec(), graph_spec("ssp", {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9})]
    return tuple(jobcodec.job_spec_to_bytes(s) for s in specs)


# ---- push frames -----------------------------------------------------------------------
def push_frame(step: int = 0, worker: int = 0, pull: bool = False, **meta) -> bytes:
    """A valid raw push of every variable of fuzz_push_frame's shard."""
    tensors = {f"g:{n}": np.full_like(v, 0.5) for n, v in PUSH_VARIABLES.items() if n in PUSH_TRAINABLE}
    tensors["a:steps"] = np.array(step + 1, np.int64)
    return tensorwire.pack({"job": PUSH_JOB, "worker": worker, "step": step, "weight": 0.5, "pull": pull, **meta},
                           tensors)


def push_frame_seeds() -> tuple[bytes, ...]:
    """fuzz_push_frame inputs: one byte choosing the shard's mode, then a frame."""
    frames = [
        push_frame(),
        push_frame(step=1, worker=1, pull=True, min_version=0, timeout=0.01),
        push_frame(owner_epoch=2, checkpoint=True),
        tensorwire.pack({"job": PUSH_JOB, "worker": 0, "step": 0}, {}),
    ]
    shm = push_frame()
    frames.append(tensorwire.pack({"job": PUSH_JOB, "shm": {"name": PUSH_SHM_NAME, "size": len(shm)}}, {}))
    return tuple(bytes([mode]) + f for mode in range(3) for f in frames)


# ---- shared-memory segments --------------------------------------------------------------
def shm_seeds() -> tuple[bytes, ...]:
    """fuzz_shm_header inputs: flags (1 byte), the claimed request capacity and push
    size (int32 LE each), then the segment file: token, padding to 64, request area."""
    frame = push_frame()
    capacity = -(-len(frame) // 64) * 64
    segment = SHM_TOKEN + bytes(48) + frame + bytes(capacity - len(frame)) + bytes(64)

    def head(flags: int, capacity: int, size: int) -> bytes:
        return bytes([flags]) + capacity.to_bytes(4, "little", signed=True) + size.to_bytes(4, "little", signed=True)

    return (
        head(0, capacity, len(frame)) + segment,
        head(0, 0, 0) + SHM_TOKEN + bytes(48),
        head(1, capacity, len(frame)) + segment,
        head(2, 64, 8) + bytes([len(PUSH_SHM_NAME)]) + PUSH_SHM_NAME.encode() + segment,
    )


SEEDS = {"jobspec": jobspec_seeds, "push_frame": push_frame_seeds, "shm_header": shm_seeds}


def write_seeds(harness: str, directory: str | pathlib.Path) -> list[pathlib.Path]:
    """Write ``harness``'s seeds into ``directory``, one file each; returns the paths."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(SEEDS[harness]()):
        path = directory / f"seed-{i:03d}"
        path.write_bytes(data)
        paths.append(path)
    return paths


if __name__ == "__main__":  # python tests/fuzz/corpus.py: print the seeds' sizes
    print(json.dumps({name: [len(s) for s in seeds()] for name, seeds in SEEDS.items()}))
