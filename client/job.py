"""Job specs: what a job file's ``job()`` returns, turning one into the master's
``JobSpec``, running one in-process, and writing models the master exports.

Usage (a job file)::

    from client import nn
    from client.job import Job

    def job():
        model = nn.Sequential([...]); model.compile(...)
        return Job(model, dataset="mnist", batch_size=128, epochs=10, mode="sync")

and from code::

    job = load_job_file("examples/mnist_mlp.py")
    spec = job_to_spec(job, name="mnist_mlp")          # -> master_pb2.JobSpec
    MasterClient().submit(spec)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from client.nn import layers as layers_mod
from client.nn import optimizers
from client.nn.model import History, Sequential
from pstrain.runtime import datasets
from pstrain.runtime.modelfile import FORMAT, write_model
from pstrain.runtime.modes import MODES
from pstrain.runtime.spec import JobSpec, ModelSpec, TrainConfig


@dataclass
class Job:
    """A model (compiled) and how to train it.

    ``model`` is a compiled ``nn.Sequential``; or a graph to train (client/graphjob.py):
    a loss function ``loss_fn(x, y)`` (a ``pt.function`` or a plain function of pt
    tensors, traced with the dataset's shapes) together with ``variables`` (what it
    trains), ``optimizer`` and optionally ``prediction`` (``fn(x)``, for
    ``metrics=["accuracy"]``); or the loss tensor of a ``graph.Graph`` whose
    placeholders ``features`` and ``labels`` take x and y (``prediction``: a tensor).

    ``mode`` is how the parameter servers apply gradients: ``sync`` (one averaged update
    per step), ``async`` (each gradient as it arrives) or ``ssp`` (async, but no worker
    runs more than ``staleness`` versions ahead). ``num_workers`` / ``num_shards`` of 0
    use every registered worker / parameter-server shard.
    """

    model: Any  # Sequential | GraphModel, or what becomes one: a loss function or a graph loss tensor
    dataset: str = "mnist"
    batch_size: int = 32
    epochs: int = 1
    shuffle: bool = True
    validate: bool = True  # evaluate on the test split after every epoch
    mode: str = "sync"
    staleness: int = 0
    num_workers: int = 0
    num_shards: int = 0
    # A graph job's own settings (a Sequential carries these in compile()):
    variables: Sequence[Any] = ()
    optimizer: Any = None
    metrics: Sequence[str] = ()
    prediction: Any = None
    features: str = "x"
    labels: str = "y"
    graph_seed: int = 0  # a graph job's seed (shuffling, dropout); a Sequential has its own

    def __post_init__(self):
        from client.graphjob import GraphModel
        from graph.core import Tensor as GraphTensor

        if isinstance(self.model, Sequential):
            if self.variables or self.optimizer is not None or self.metrics:
                raise ValueError("Job(variables=, optimizer=, metrics=) are for graph jobs; a Sequential takes them "
                                 "in model.compile()")
            if self.model._compiled is None:
                raise ValueError("Job.model must be compiled (model.compile(optimizer, loss, metrics))")
        elif isinstance(self.model, GraphTensor):
            self.model = GraphModel.from_loss_tensor(self.model, self.features, self.labels, self.prediction,
                                                     optimizer=self.optimizer or "sgd", metrics=self.metrics,
                                                     seed=self.graph_seed)
        elif callable(self.model) and not isinstance(self.model, GraphModel):
            if not self.variables:
                raise ValueError("Job(loss_fn, variables=[...]): name the variables the loss function trains")
            data = datasets.load(self.dataset)
            # y as the loss function sees it: class ids (batch,); float targets of one value
            # per example as a column (batch, 1), the shape of a one-unit output; else as stored.
            ids = data.num_classes > 0
            y_shape = () if ids else ((1,) if data.y_train.ndim == 1 else data.y_train.shape[1:])
            self.model = GraphModel.from_loss_fn(
                self.model, self.variables, data.x_train.shape[1:], y_shape,
                np.int32 if ids else np.float32, prediction_fn=self.prediction,
                optimizer=self.optimizer or "sgd", metrics=self.metrics, seed=self.graph_seed)
        elif not isinstance(self.model, GraphModel):
            raise TypeError(f"Job.model must be an nn.Sequential, a loss function or a graph loss tensor, "
                            f"got {type(self.model).__name__}")
        if int(self.batch_size) < 1:
            raise ValueError(f"Job.batch_size={self.batch_size!r} must be >= 1")
        if int(self.epochs) < 0:
            raise ValueError(f"Job.epochs={self.epochs!r} must be >= 0")
        if self.mode not in MODES:
            raise ValueError(f"Job.mode={self.mode!r}: use one of {', '.join(MODES)}")
        if int(self.staleness) < 0:
            raise ValueError(f"Job.staleness={self.staleness!r} must be >= 0")
        if int(self.num_workers) < 0:
            raise ValueError(f"Job.num_workers={self.num_workers!r} must be >= 0 (0: every registered worker)")
        if int(self.num_shards) < 0:
            raise ValueError(f"Job.num_shards={self.num_shards!r} must be >= 0 (0: every registered shard)")

    @property
    def seed(self) -> int:
        """The model's seed: it fixes initialization, dropout masks and shuffling."""
        return self.model.seed


def load_job_file(path: str | os.PathLike, **overrides) -> Job:
    """Import a job file and call its ``job()``.

    ``overrides`` (e.g. ``epochs=3`` from the command line) go to ``job()`` as
    arguments when it takes them, so a job can size what depends on them (a learning
    rate schedule's decay steps); the rest are set on the returned Job."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"job file '{path}' does not exist")
    spec = importlib.util.spec_from_file_location("_pstrain_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "job", None)):
        raise ValueError(f"job file '{path}' must define a function job() returning a client.job.Job")
    params = inspect.signature(module.job).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    passed = {k: v for k, v in overrides.items() if takes_all or k in params}
    job = module.job(**passed)
    if not isinstance(job, Job):
        raise TypeError(f"job() in '{path}' returned {type(job).__name__}; return a client.job.Job")
    rest = {k: v for k, v in overrides.items() if k not in passed and getattr(job, k) != v}
    return dataclasses.replace(job, **rest) if rest else job


# ---- to the master ----------------------------------------------------------------------------
def ensure_built(job: Job) -> None:
    """Build the model's graph if it is not built yet, from the dataset's input shape
    when the first layer does not declare one (``input_dim=``)."""
    model = job.model
    if getattr(model, "built", False):
        return
    if not model.layers:
        raise ValueError("the job's model has no layers; add some before submitting it")
    shape = model.layers[0].input_shape
    if shape is None:
        shape = datasets.load(job.dataset).input_shape
    model.build(shape)


def _dataset_ref(dataset: str) -> str:
    # A relative .npz path means "relative to where I run psctl"; the master and the
    # workers run elsewhere (another cwd, maybe another host), so send it absolute.
    if os.path.exists(dataset):
        return os.path.abspath(dataset)
    return dataset


def job_to_spec(job: Job, name: str, device: str | None = None) -> JobSpec:
    """The declarative ``JobSpec`` for ``job``: graph, signature, settings, data
    (``MasterClient.submit`` sends it; ``protos.jobcodec`` is its wire form).

    ``device`` overrides the model's (``job.model.device``) kernel backend on the workers.
    """
    ensure_built(job)
    model = job.model
    if not isinstance(model, Sequential):  # a GraphModel
        sig = ModelSpec(model.graph, features=model.features, labels=model.labels, loss=model.loss,
                        prediction=model.prediction, model_config=model.config(), weight_order=model.weight_names())
        train = TrainConfig(
            optimizer=model.optimizer.get_config(), batch_size=int(job.batch_size), epochs=int(job.epochs),
            mode=job.mode, staleness=int(job.staleness), seed=int(job.seed),
            loss_name=model.accuracy_of if model.metrics else "", metrics=tuple(model.metrics),
            shuffle=bool(job.shuffle), device=device or model.device,
            num_workers=int(job.num_workers), num_shards=int(job.num_shards),
        )
        return JobSpec(name, sig, train, _dataset_ref(job.dataset))
    plan = model._plan
    compiled = model._compiled
    sig = ModelSpec(
        plan.graph, features=plan.features, labels=plan.labels, loss=plan.loss, prediction=plan.prediction,
        model_config=model.get_config(), weight_order=model._weight_names(),
    )
    train = TrainConfig(
        optimizer=compiled["optimizer"].get_config(), batch_size=int(job.batch_size), epochs=int(job.epochs),
        mode=job.mode, staleness=int(job.staleness), seed=int(job.seed), loss_name=compiled["loss"],
        metrics=tuple(compiled["metrics"]), shuffle=bool(job.shuffle), device=device or model.device,
        num_workers=int(job.num_workers), num_shards=int(job.num_shards),
    )
    return JobSpec(name, sig, train, _dataset_ref(job.dataset))


def steps_per_epoch(job: Job) -> int | None:
    """Global steps in one epoch (the batch is split across workers), or None when the
    dataset cannot be read here (e.g. a path that exists only on the cluster)."""
    try:
        n = len(datasets.load(job.dataset).x_train)
    except (OSError, ValueError, ImportError):
        return None
    return -(-n // int(job.batch_size))


# ---- exported models ----------------------------------------------------------------------------
def _check_export(config: dict, names: Sequence[str], weights: Sequence[np.ndarray]) -> None:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"the exported model config has format {got!r}; expected {FORMAT}")
    if len(names) != len(weights):
        raise ValueError(f"the export has {len(names)} weight names but {len(weights)} arrays")


def model_from_export(config: dict, names: Sequence[str], weights: Sequence[np.ndarray], device: str = "cpu") -> Sequential:
    """Rebuild the trained model from what ``MasterClient.export`` returns."""
    _check_export(config, names, weights)
    model = Sequential(
        [layers_mod.from_config(c) for c in config["layers"]], dtype=config["dtype"], seed=config["seed"],
        device=device, name=config["name"],
    )
    comp = config.get("compile") or {"optimizer": "sgd", "loss": "mse", "metrics": []}
    model.compile(optimizers.get(comp["optimizer"]), comp["loss"], comp["metrics"])
    if not model.built:
        if config.get("input_shape") is None:
            raise ValueError("the exported model config has no input_shape; the model was never built")
        model.build(tuple(config["input_shape"]))
    order = model._weight_names()
    if list(names) != order:
        missing, extra = sorted(set(order) - set(names)), sorted(set(names) - set(order))
        if missing or extra:
            raise ValueError(f"the export's weights do not match the model: missing {missing}, unexpected {extra}")
        by_name = dict(zip(names, weights))
        weights = [by_name[n] for n in order]
    model.set_weights(weights)
    return model


def save_export(path: str | os.PathLike, config: dict, names: Sequence[str], weights: Sequence[np.ndarray]) -> None:
    """Write an export as a model file that ``nn.load_model`` reads (atomically).

    ``names`` are in the model's weight order (Keras ``get_weights()`` order); the arrays
    are stored as ``weight_0 .. weight_N`` in that order.
    """
    from client.graphjob import GRAPH_FORMAT, save_graph_export

    if isinstance(config, dict) and config.get("format") == GRAPH_FORMAT:
        if len(names) != len(weights):
            raise ValueError(f"the export has {len(names)} weight names but {len(weights)} arrays")
        save_graph_export(path, names, weights)
        return
    _check_export(config, names, weights)
    write_model(path, config, weights)


# ---- in-process -----------------------------------------------------------------------------------
def run_in_process(job: Job, verbose: int = 1) -> tuple[History, dict]:
    """Train ``job`` in this process; returns the history and the final test metrics."""
    data = datasets.load(job.dataset)
    val = (data.x_test, data.y_test) if job.validate else None
    history = job.model.fit(
        data.x_train, data.y_train, batch_size=job.batch_size, epochs=job.epochs,
        shuffle=job.shuffle, validation_data=val, verbose=verbose,
    )
    test = job.model.evaluate(data.x_test, data.y_test, return_dict=True)
    if not isinstance(job.model, Sequential) and not job.metrics:
        test = {k: v for k, v in test.items() if k != "accuracy"}
    if verbose:
        print("test: " + " - ".join(f"{k}: {v:.4f}" for k, v in test.items()), file=sys.stdout)
    return history, test
