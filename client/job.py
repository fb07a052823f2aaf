"""Job specs: what a job file's ``job()`` returns, and running one in-process.

Usage (a job file)::

    from client import nn
    from client.job import Job

    def job():
        model = nn.Sequential([...]); model.compile(...)
        return Job(model, dataset="mnist", batch_size=128, epochs=10)
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

from client import datasets
from client.nn.model import History, Sequential


@dataclass
class Job:
    """A model (compiled) and how to train it."""

    model: Sequential
    dataset: str = "mnist"
    batch_size: int = 32
    epochs: int = 1
    shuffle: bool = True
    validate: bool = True  # evaluate on the test split after every epoch

    def __post_init__(self):
        if not isinstance(self.model, Sequential):
            raise TypeError(f"Job.model must be an nn.Sequential, got {type(self.model).__name__}")
        if self.model._compiled is None:
            raise ValueError("Job.model must be compiled (model.compile(optimizer, loss, metrics))")
        if int(self.batch_size) < 1:
            raise ValueError(f"Job.batch_size={self.batch_size!r} must be >= 1")
        if int(self.epochs) < 0:
            raise ValueError(f"Job.epochs={self.epochs!r} must be >= 0")


def load_job_file(path: str | os.PathLike) -> Job:
    """Import a job file and call its ``job()``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"job file '{path}' does not exist")
    spec = importlib.util.spec_from_file_location("_pstrain_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "job", None)):
        raise ValueError(f"job file '{path}' must define a function job() returning a client.job.Job")
    job = module.job()
    if not isinstance(job, Job):
        raise TypeError(f"job() in '{path}' returned {type(job).__name__}; return a client.job.Job")
    return job


def run_in_process(job: Job, verbose: int = 1) -> tuple[History, dict]:
    """Train ``job`` in this process; returns the history and the final test metrics."""
    data = datasets.load(job.dataset)
    val = (data.x_test, data.y_test) if job.validate else None
    history = job.model.fit(
        data.x_train, data.y_train, batch_size=job.batch_size, epochs=job.epochs,
        shuffle=job.shuffle, validation_data=val, verbose=verbose,
    )
    test = job.model.evaluate(data.x_test, data.y_test, return_dict=True)
    if verbose:
        print("test: " + " - ".join(f"{k}: {v:.4f}" for k, v in test.items()), file=sys.stdout)
    return history, test
