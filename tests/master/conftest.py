"""Fixtures the master's tests share: a tiny valid job spec (a 64-8-10 MLP on digits)."""
from __future__ import annotations

import pytest

from client import nn
from client.job import Job, job_to_spec
from protos import jobcodec, master_pb2


@pytest.fixture(scope="module")
def spec_bytes() -> bytes:
    model = nn.Sequential(
        [nn.Dense(8, activation="relu", input_dim=64), nn.Dense(10, activation="softmax")], seed=0
    )
    model.compile(optimizer=nn.optimizers.SGD(learning_rate=0.1), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return jobcodec.job_spec_to_bytes(job_to_spec(Job(model, dataset="digits", batch_size=16, epochs=1), name="tiny"))


@pytest.fixture
def spec(spec_bytes) -> master_pb2.JobSpec:
    """A fresh, valid JobSpec (a copy each test may corrupt)."""
    return master_pb2.JobSpec.FromString(spec_bytes)
