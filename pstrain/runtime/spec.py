"""Plain, validated types for what a job is and what its processes tell each other:
the core's data types, converted to and from protobuf only at the service edge
(``protos/jobcodec.py``).

- ``TrainConfig``: how to train (optimizer config, global batch, epochs, consistency
  mode, staleness, seed, loss and metrics, shuffle, device, cluster size);
- ``ModelSpec``: the forward graph and its named roles (features, labels, loss,
  prediction), the Keras config for export, the weight order;
- ``JobSpec``: a named model + train config + dataset, what a client submits;
- ``TaskSpec``: one worker slot of a planned job, what the master hands the process
  that runs it (in a ``HeartbeatReply``, with jobs cancelled, ``FinishedJob``s and
  slots to release, ``SlotRef``s);
- ``Progress``: one worker report (step, epoch, loss, metrics, done / final / error).

Every type is a frozen dataclass validated on construction; an invalid field raises
ValueError naming the field, the value and what is allowed.

Usage::

    train = TrainConfig(optimizer={"name": "sgd", "learning_rate": 0.1}, batch_size=128, epochs=3,
                        mode=Mode.SSP, staleness=2)
    spec = JobSpec("mnist", ModelSpec(graph, "x", "y", "loss", "probs"), train, dataset="mnist")
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from graph.core import Graph
from graph.errors import GraphError
from pstrain.runtime.modes import Mode


class Device(str, Enum):
    """Where a worker's kernels run (``auto``: cuda when a GPU is usable, else cpu)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    REFERENCE = "reference"  # the NumPy reference kernels (tests, debugging)

    @classmethod
    def parse(cls, value: Device | str, field_name: str = "device") -> Device:
        if isinstance(value, cls):
            return value
        try:
            return cls(value or "auto")
        except ValueError:
            raise ValueError(f"{field_name}={value!r}: use one of {[d.value for d in cls]}") from None


def _parse_mode(value: Mode | str) -> Mode:
    if isinstance(value, Mode):
        return value
    try:
        return Mode(value)
    except ValueError:
        raise ValueError(f"mode={value!r}: use sync, async or ssp") from None


def _at_least(name: str, value: int, low: int) -> None:
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= low
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the declarative part of a job besides the graph.

    ``optimizer`` is an optimizer config (``SGD(...).get_config()``); ``batch_size`` is
    the global batch, split across workers; ``num_workers`` / ``num_shards`` 0 means
    every registered one.
    """

    optimizer: Mapping[str, Any]
    batch_size: int
    epochs: int
    mode: Mode = Mode.SYNC
    staleness: int = 0
    seed: int = 0
    loss_name: str = ""
    metrics: tuple[str, ...] = ()
    shuffle: bool = True
    device: Device = Device.CPU
    num_workers: int = 0
    num_shards: int = 0

    def __post_init__(self):
        object.__setattr__(self, "mode", _parse_mode(self.mode))
        object.__setattr__(self, "device", Device.parse(self.device))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not isinstance(self.optimizer, Mapping):
            raise ValueError(f"optimizer={self.optimizer!r} must be an optimizer config (a dict with a 'name')")
        object.__setattr__(self, "optimizer", dict(self.optimizer))
        _at_least("batch_size", self.batch_size, 1)
        _at_least("epochs", self.epochs, 0)
        _at_least("staleness", self.staleness, 0)
        _at_least("num_workers", self.num_workers, 0)
        _at_least("num_shards", self.num_shards, 0)
        try:
            operator.index(self.seed)
        except TypeError:
            raise ValueError(f"seed={self.seed!r} must be an integer") from None


@dataclass(frozen=True)
class ModelSpec:
    """The forward graph of a job and the names of its roles in it."""

    graph: Graph
    features: str  # input placeholder
    labels: str  # target placeholder
    loss: str  # scalar total loss
    prediction: str  # model output
    model_config: Mapping[str, Any] = field(default_factory=dict)  # the Keras-style config, for export
    weight_order: tuple[str, ...] = ()  # variable names in Keras get_weights() order

    def __post_init__(self):
        object.__setattr__(self, "weight_order", tuple(self.weight_order))
        object.__setattr__(self, "model_config", dict(self.model_config or {}))
        g = self.graph
        roles = {"features": self.features, "labels": self.labels, "loss": self.loss, "prediction": self.prediction}
        for role, name in roles.items():
            if name not in g.nodes:
                raise GraphError(f"the job's {role} node does not exist in the graph", name or "<empty>")
        for role in ("features", "labels"):
            node = g.nodes[roles[role]]
            if node.op != "placeholder":
                raise GraphError(f"the job's {role} must be a placeholder", node.name, node.op)
        loss = g.nodes[self.loss]
        if loss.shape != ():
            raise GraphError(f"the loss must be a scalar, got shape {loss.shape}", loss.name, loss.op)
        for name in self.weight_order:
            if name not in g.nodes or g.nodes[name].op != "variable":
                raise GraphError("weight_order names a node that is not a variable", name)


@dataclass(frozen=True)
class JobSpec:
    """What a client submits: a named model, how to train it, and the dataset by name or path."""

    name: str
    model: ModelSpec
    train: TrainConfig
    dataset: str

    def __post_init__(self):
        if not self.dataset:
            raise ValueError("dataset is empty: name one (mnist, digits, synthetic) or a path to an .npz")


@dataclass(frozen=True)
class SliceSpec:
    """Rows ``[start, stop)`` of ``variable`` live on ``shard`` under ``key`` (a scalar: the whole)."""

    variable: str
    key: str
    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class TaskSpec:
    """One worker slot of a planned job: the training graph (forward + backward) and its
    roles, where every variable slice lives, and how to train.

    A job has a fixed set of worker slots (``workers``); slot k trains part k of every
    global batch, whichever process runs it. ``owner_epoch`` numbers the slot's
    assignments to processes (a process with an older one is fenced off);
    ``start_step`` is where a process taking a running slot over starts."""

    job: str
    worker_index: int
    workers: tuple[int, ...]  # every worker slot of the job
    graph: Graph
    features: str
    labels: str
    loss: str
    prediction: str
    grads: Mapping[str, str]  # trainable variable -> gradient node
    state_variables: tuple[str, ...]
    slices: tuple[SliceSpec, ...]
    shard_addresses: tuple[str, ...]  # by shard index
    train: TrainConfig
    dataset: str
    owner_epoch: int = 0
    start_step: int = 0

    def __post_init__(self):
        _at_least("owner_epoch", self.owner_epoch, 0)
        _at_least("start_step", self.start_step, 0)
        object.__setattr__(self, "workers", tuple(sorted(self.workers)))
        object.__setattr__(self, "state_variables", tuple(self.state_variables))
        object.__setattr__(self, "slices", tuple(self.slices))
        object.__setattr__(self, "shard_addresses", tuple(self.shard_addresses))
        object.__setattr__(self, "grads", dict(self.grads))
        if self.worker_index not in self.workers:
            raise ValueError(f"worker_index={self.worker_index} is not one of the job's workers {list(self.workers)}")
        for sl in self.slices:
            if not 0 <= sl.shard < len(self.shard_addresses):
                raise ValueError(f"slice {sl.key!r} is on shard {sl.shard}, but the job has "
                                 f"{len(self.shard_addresses)} shard addresses")


@dataclass(frozen=True)
class FinishedJob:
    """Every worker of ``job`` is done: worker ``evaluator`` evaluates the final model."""

    job: str
    evaluator: int


@dataclass(frozen=True)
class SlotRef:
    """Worker slot ``worker`` of ``job``, as run by the process holding ``owner_epoch``."""

    job: str
    worker: int
    owner_epoch: int = 0


@dataclass(frozen=True)
class HeartbeatReply:
    """What a heartbeat answers: ``known`` False means register again; the rest is new
    work, jobs to stop, jobs whose final model is to be evaluated, and worker slots to
    release after their current step (the master moves them to another process)."""

    known: bool
    tasks: tuple[TaskSpec, ...] = ()
    cancelled_jobs: tuple[str, ...] = ()
    finished: tuple[FinishedJob, ...] = ()
    release: tuple[SlotRef, ...] = ()


@dataclass(frozen=True)
class Progress:
    """One worker report. ``done``: it ran its last step; ``final``: the final evaluation
    of the trained model; ``error``: it failed (the job fails); ``released``: it stopped
    as the master asked, and ``step`` is the slot's next step. ``owner_epoch``: the
    sender's ownership of the slot (a report from a fenced-off process changes nothing)."""

    job: str
    worker: int
    step: int = 0
    epoch: int = 0
    loss: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)
    step_time: float = 0.0  # seconds per step, recent mean
    done: bool = False
    final: bool = False
    error: str = ""
    owner_epoch: int = 0
    released: bool = False

    def __post_init__(self):
        object.__setattr__(self, "metrics", {str(k): float(v) for k, v in dict(self.metrics).items()})
        _at_least("owner_epoch", self.owner_epoch, 0)
        _at_least("worker", self.worker, 0)
        _at_least("step", self.step, 0)
        _at_least("epoch", self.epoch, 0)
