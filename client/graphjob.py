"""Models given as a graph rather than an ``nn.Sequential``: a loss function of
``(x, y)`` (a ``pt.function``, or a plain function traced on submit) with the variables
it trains, or a loss tensor of a ``graph.Graph`` built with the low-level API. The
master runs its passes, autodiff and placement on the graph exactly as for Sequential;
in-process training runs the same ``TrainingLoop``. Usage (in a job file)::

    import pstrain as pt
    from client import nn
    from client.job import Job

    w, b = pt.Variable(np.zeros((13, 1), np.float32), name="w"), pt.Variable(np.zeros(1, np.float32), name="b")

    def loss(x, y):
        return pt.reduce_mean(pt.square(x @ w + b - y))

    def job():
        return Job(loss, variables=[w, b], optimizer=nn.optimizers.SGD(0.01), dataset="data.npz", epochs=20)

Exports (``psctl export``) are ``.npz`` files keyed by variable name.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable, Sequence

import numpy as np

from client.nn import optimizers
from client.nn.model import History
from graph import Graph, GraphError
from graph.core import Tensor as GraphTensor
from pstrain.runtime import datasets
from pstrain.runtime.loop import Callback, EpochTotals, Schedule, TrainingLoop
from pstrain.runtime.optimizers import Optimizer
from pstrain.runtime.parameters import LocalParameterClient
from pstrain.runtime.plan import build_train_plan
from pstrain.runtime.step import StepRunner
from pstrain.runtime.store import ParameterStore

GRAPH_FORMAT = "pstrain-graph-export-1"  # the export config of a graph job (weights keyed by variable name)
ACCURACY_OF = {"int": "sparse_categorical_crossentropy", "one": "binary_crossentropy", "many": "categorical_crossentropy"}


class GraphModel:
    """A forward graph to train: ``features`` and ``labels`` placeholders, a scalar float
    ``loss``, a ``prediction`` (default: the loss; needed for ``metrics=["accuracy"]``),
    an optimizer (an ``nn.optimizers`` object or name) and its seed."""

    def __init__(self, graph: Graph, loss: str, features: str, labels: str, optimizer="sgd",
                 prediction: str | None = None, metrics: Sequence[str] = (), seed: int = 0, device: str = "cpu",
                 name: str = "graph"):
        for role, node in (("features", features), ("labels", labels)):
            if node not in graph.nodes or graph.nodes[node].op != "placeholder":
                have = [p.name for p in graph.placeholders()]
                raise ValueError(f"the graph job's {role} must name a placeholder; '{node}' is not one "
                                 f"(placeholders: {', '.join(have) or 'none'})")
        for role, node in (("loss", loss), ("prediction", prediction or loss)):
            if node not in graph.nodes:
                raise ValueError(f"the graph job's {role} '{node}' is not a node of its graph")
        spec = graph.nodes[loss].spec
        if spec.shape != () or spec.dtype.kind != "f":
            raise GraphError(f"the loss must be a float scalar, got shape {spec.shape} and dtype {spec.dtype}", loss)
        if not graph.variables(trainable_only=True):
            raise ValueError("the graph job has no trainable variable to train")
        unknown = [m for m in metrics if m != "accuracy"]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown} for a graph job; supported: accuracy")
        if metrics and prediction is None:
            raise ValueError("metrics=['accuracy'] needs prediction= (the model's output) in a graph job")
        self.graph, self.loss, self.features, self.labels = graph, loss, features, labels
        self.prediction = prediction or loss
        self.optimizer = optimizers.get(optimizer)
        self.metrics = tuple(metrics)
        self.seed, self.device, self.name = int(seed), device, name
        self._loop: TrainingLoop | None = None
        self._store: ParameterStore | None = None

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_loss_tensor(cls, loss: GraphTensor, features: str = "x", labels: str = "y",
                         prediction: GraphTensor | str | None = None, **kw) -> "GraphModel":
        """A low-level graph: its loss tensor, and which placeholders hold x and y."""
        pred = prediction.name if isinstance(prediction, GraphTensor) else prediction
        return cls(loss.graph, loss.name, features, labels, prediction=pred, **kw)

    @classmethod
    def from_loss_fn(cls, fn: Callable, variables: Sequence, x_shape: tuple, y_shape: tuple, y_dtype,
                     prediction_fn: Callable | None = None, **kw) -> "GraphModel":
        """Trace ``fn(x, y) -> scalar loss`` (a ``pt.function`` or a plain function) with
        placeholders of one batch's shapes (batch unknown); ``variables`` are what it
        trains (each must be read by ``fn``); ``prediction_fn(x)`` (optional) the output."""
        from pstrain.eager import Function, Tensor

        traced = fn if isinstance(fn, Function) else Function(fn)
        x = Tensor(np.zeros((1,) + tuple(x_shape), np.float32))
        y = Tensor(np.zeros((1,) + tuple(y_shape), y_dtype))
        trace, names, out = traced.trace(x, y)
        if isinstance(out, (list, tuple)) or not isinstance(out, GraphTensor):
            raise TypeError(f"the loss function must return one scalar tensor, got {type(out).__name__}")
        if trace.assigns or trace.tapes:
            what = (f"assigns variable(s) {', '.join(v.name for v, _, _ in trace.assigns.values())}"
                    if trace.assigns else "opens a GradientTape")
            raise ValueError(f"the loss function {what}: a job's loss function only computes the loss "
                             "(the master adds the backward pass, the shards apply the optimizer)")
        g = trace.graph
        read = {id(v) for v, _ in trace.variables.values()}
        unread = [getattr(v, "name", repr(v)) for v in variables if id(v) not in read]
        if unread:
            raise ValueError(f"the loss function does not read variable(s) {', '.join(unread)}; "
                             "pass the variables it trains")
        wanted = {id(v) for v in variables}
        for v, node in trace.variables.values():  # only the listed variables train
            if id(v) not in wanted:
                g.nodes[node.name].attrs["trainable"] = False
        pred = None
        if prediction_fn is not None:
            with trace.active():
                pred = trace.lift(prediction_fn(g.tensor(names[0])))
        return cls(g, out.name, names[0], names[1], prediction=pred.name if pred is not None else None, **kw)

    # -- what the master and the exports need ----------------------------------------------------
    @property
    def built(self) -> bool:
        return True

    @property
    def accuracy_of(self) -> str:
        """The loss kind accuracy is judged by, from the labels: class ids, one or many columns."""
        node = self.graph.nodes[self.labels]
        if node.dtype.kind in "iu":
            return ACCURACY_OF["int"]
        return ACCURACY_OF["one" if (node.shape[-1:] in ((), (1,))) else "many"]

    def weight_names(self) -> list[str]:
        return [v.name for v in self.graph.variables()]

    def config(self) -> dict:
        return {"format": GRAPH_FORMAT, "name": self.name, "variables": self.weight_names()}

    # -- in-process training ---------------------------------------------------------------------
    def _ensure_loop(self) -> TrainingLoop:
        if self._loop is None:
            g = copy.deepcopy(self.graph)  # the backward pass goes into a copy: the shipped graph stays forward
            plan = build_train_plan(g, g.tensor(self.loss), g.tensor(self.prediction), self.features, self.labels)
            runner = StepRunner(plan, backend=self.device)
            self._store = ParameterStore(g.initial_values, set(plan.grads), Optimizer(self.optimizer, runner.backend))
            self._loop = TrainingLoop(runner, LocalParameterClient(self._store), seed=self.seed,
                                      accuracy_of=self.accuracy_of if self.metrics else None, reuse_batch_buffers=False)
            self._loop.pull()
        return self._loop

    def _targets(self, y):
        node = self.graph.nodes[self.labels]
        return datasets.fit_targets(np.asarray(y), node.shape, node.dtype)

    def fit(self, x, y, batch_size: int = 32, epochs: int = 1, shuffle: bool = True, validation_data=None,
            verbose: int = 1) -> History:
        loop = self._ensure_loop()
        x = np.asarray(x, self.graph.nodes[self.features].dtype)
        log = _EpochLog(self, epochs, validation_data, verbose)
        loop.run(x, self._targets(y), Schedule(len(x), int(batch_size), int(epochs), seed=self.seed, shuffle=shuffle),
                 [log])
        return log.history

    def evaluate(self, x, y, batch_size: int = 256, return_dict: bool = True) -> dict:
        loss, accuracy = self._ensure_loop().evaluate(np.asarray(x, self.graph.nodes[self.features].dtype),
                                                      self._targets(y), batch_size)
        return {"loss": loss, "accuracy": accuracy} if self.metrics else {"loss": loss}

    def get_weights(self) -> dict[str, np.ndarray]:
        """The trained variables by name."""
        params = self._ensure_loop().params
        return {n: np.array(self._store.backend.to_host(params[n]), copy=True) for n in self.weight_names()}


class _EpochLog(Callback):
    def __init__(self, model: GraphModel, epochs: int, validation_data, verbose: int):
        self.model, self.epochs, self.validation_data, self.verbose = model, epochs, validation_data, verbose
        self.history = History()

    def on_epoch_end(self, epoch: int, totals: EpochTotals) -> None:
        logs = {"loss": totals.loss}
        if self.model.metrics:
            logs["accuracy"] = totals.correct / max(totals.seen, 1)
        if self.validation_data is not None:
            logs.update({f"val_{k}": v for k, v in self.model.evaluate(*self.validation_data[:2]).items()})
        self.history.add(epoch, logs)
        if self.verbose:
            print(f"Epoch {epoch + 1}/{self.epochs} - " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()),
                  file=sys.stdout, flush=True)


def save_graph_export(path, names: Sequence[str], weights: Sequence[np.ndarray]) -> None:
    """An ``.npz`` keyed by variable name (atomically)."""
    from pstrain.runtime.files import atomic_write

    with atomic_write(str(path)) as f:
        np.savez(f, **{n: np.asarray(w) for n, w in zip(names, weights)})
