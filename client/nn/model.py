"""``Sequential`` models: Keras's API, lowered to the graph IR and trained by the
same pieces the distributed runtime uses (``pstrain.runtime.plan`` for the backward pass,
``pstrain.runtime.loop`` for the training loop every worker also runs,
``pstrain.runtime.store`` for parameters and optimizer, behind ``LocalParameterClient``).

Usage::

    from client import nn
    model = nn.Sequential([nn.Dense(128, activation="relu", input_dim=784),
                           nn.Dense(10, activation="softmax")])
    model.compile(nn.optimizers.SGD(0.1, momentum=0.9),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=128, epochs=5, validation_data=(xt, yt))
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from client.nn import activations, losses, optimizers
from client.nn import layers as layers_mod
from client.progress import ProgressBar, write_epoch_header
from graph.core import Graph
from graph.registry import RunContext
from pstrain.runtime import metrics as metrics_mod
from pstrain.runtime.executor import Executor
from pstrain.runtime.loop import Callback, EpochTotals, Schedule, TrainingLoop
from pstrain.runtime.modelfile import FORMAT, read_model, write_model
from pstrain.runtime.optimizers import Optimizer
from pstrain.runtime.parameters import LocalParameterClient
from pstrain.runtime.plan import TrainPlan, build_train_plan
from pstrain.runtime.step import StepRunner
from pstrain.runtime.store import ParameterStore


@dataclass
class History:
    """What ``fit`` returns: per-epoch ``history["loss"]``, ``["accuracy"]``, ``["val_..."]``."""

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)

    def add(self, epoch: int, logs: dict) -> None:
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))


class Sequential:
    """A linear stack of layers.

    ``dtype`` is the float type of weights and activations ("float32" or "float64");
    ``seed`` fixes initialization, dropout masks and shuffling (None: random);
    ``device`` picks the kernel backend ("cpu", "cuda", "auto", "reference").
    """

    def __init__(self, layers: Sequence[layers_mod.Layer] = (), dtype="float32", seed: int | None = None, device: str = "cpu", name: str = "sequential"):
        self.layers: list[layers_mod.Layer] = []
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"Sequential: dtype must be float32 or float64, got {dtype}")
        self.seed = int(seed) if seed is not None else int(np.random.SeedSequence().entropy % (2**31))
        self.device = device
        self.name = name
        self._input_shape: tuple | None = None  # set by build
        self._predictor: Executor | None = None  # the forward pass, compiled or not
        self._store: ParameterStore | None = None  # every weight, from build on
        self._plan: TrainPlan | None = None  # loss and gradients: built and compiled
        self._runner: StepRunner | None = None
        self._loop: TrainingLoop | None = None
        self._compiled: dict | None = None
        self._step = 0
        for layer in layers:
            self._append(layer)
        if self.layers and self.layers[0].input_shape is not None:
            self.build(self.layers[0].input_shape)  # the input shape is known: built, as in Keras

    # ---- building -----------------------------------------------------------------
    def add(self, layer: layers_mod.Layer) -> None:
        """Append a layer; the model is built as soon as its input shape is known
        (the first layer's ``input_dim``/``input_shape``), and a built model is built
        again with the new layer, keeping the weights it has."""
        self._append(layer)
        shape = self._input_shape or self.layers[0].input_shape
        if shape is None:
            return
        try:
            self.build(shape)
        except Exception:
            self.layers.pop()  # a layer that does not fit leaves the model as it was
            raise

    def _append(self, layer: layers_mod.Layer) -> None:
        if not isinstance(layer, layers_mod.Layer):
            raise TypeError(f"Sequential.add takes a layer (e.g. nn.Dense), got {type(layer).__name__}")
        counts = sum(1 for l in self.layers if l.kind == layer.kind)
        if layer.name is None:
            layer.name = layer.kind if counts == 0 else f"{layer.kind}_{counts}"
        if any(l.name == layer.name for l in self.layers):
            raise ValueError(f"two layers are named '{layer.name}'; layer names must be unique")
        self.layers.append(layer)

    def compile(self, optimizer="sgd", loss="mse", metrics=None) -> None:
        """Choose optimizer (name or nn.optimizers.*), loss (Keras name, or a callable
        ``loss(y_true, y_pred)`` on graph tensors: see nn.losses) and metrics.
        A built model keeps its weights, as in Keras."""
        compiled = {
            "optimizer": optimizers.get(optimizer),
            "loss": losses.get(loss),
            "metrics": metrics_mod.check(metrics),
        }
        before, self._compiled = self._compiled, compiled
        try:
            if self.built:
                self.build(self._input_shape)
        except Exception:
            self._compiled = before  # a loss that does not build leaves the model as it was
            raise

    @property
    def built(self) -> bool:
        """Whether the input shape is known (the first layer's ``input_dim``/``input_shape``,
        ``build``, or a first fit/predict), as Keras's ``built``: the weights exist and
        ``predict`` works, compiled or not."""
        return self._input_shape is not None

    def build(self, input_shape: tuple) -> None:
        """Lower the model to a graph for inputs of shape (batch, *input_shape): the
        forward pass (all predict needs), and once compiled the loss and its gradients.
        Building again (compile after build) keeps the current weights."""
        if not self.layers:
            raise ValueError("the model has no layers; add some before building")
        input_shape = tuple(int(d) for d in input_shape)
        kept = self._host_parameters() if input_shape == self._input_shape else {}
        g = Graph()
        rng = np.random.default_rng(self.seed)
        x = g.placeholder((None,) + input_shape, self.dtype, name="x")
        h, shape = x, input_shape
        for layer in self.layers:
            layer.build(g, shape, self.dtype, rng)
            h = layer.call(g, h)
            shape = layer.output_shape(shape)
        for name, value in kept.items():
            if name in g.initial_values and g.initial_values[name].shape == value.shape:
                g.initial_values[name] = value
        predictor = Executor(g, [h], self.device)
        backend = predictor.backend
        plan = runner = loop = None
        if self._compiled is None:
            # Nothing is trainable before compile, so this store takes no gradient and
            # its optimizer never runs; compile builds the real one.
            store = ParameterStore(g.initial_values, set(), Optimizer("sgd", backend))
        else:
            plan = build_train_plan(g, self._total_loss(g, h), h, features="x", labels="y")
            runner = StepRunner(plan, backend=backend)
            store = ParameterStore(g.initial_values, set(plan.grads), Optimizer(self._compiled["optimizer"], backend))
            accuracy_of = losses.accuracy_rule(self._compiled["loss"], h.shape) if self._compiled["metrics"] else None
            # Fancy indexing (no reused batch buffers) is the faster gather for fit's batches.
            loop = TrainingLoop(runner, LocalParameterClient(store), seed=self.seed, accuracy_of=accuracy_of,
                                reuse_batch_buffers=False)
            loop.pull()
        self._predictor, self._store, self._plan, self._runner, self._loop = predictor, store, plan, runner, loop
        self._input_shape = input_shape

    def _total_loss(self, g: Graph, h):
        """The data loss on the labels placeholder ``y``, plus every layer's penalties."""
        loss = self._compiled["loss"]
        head = self.layers[-1]
        fused = losses.FUSED_HEAD.get(loss) if isinstance(loss, str) else None
        head_act = getattr(head, "activation", None)
        logits = head.logits if fused is not None and activations.name_of(head_act) == fused else None
        label_shape, label_dtype = losses.label_spec(loss, h.shape, self.dtype)
        y = g.placeholder(label_shape, label_dtype, name="y")
        total = losses.build(g, loss, h, logits, y)
        for layer in self.layers:
            for p in layer.penalties:
                total = g.add(total, p, name="total_loss")
        return total

    def _require_compiled(self, what: str) -> None:
        if self._compiled is None:
            raise RuntimeError(
                f"model '{self.name}' is not compiled: call model.compile(optimizer, loss) before {what} "
                "(predict works without it)"
            )

    def _ensure_built(self, x: np.ndarray) -> None:
        if not self.built:
            self.build(x.shape[1:])
        if tuple(x.shape[1:]) != self._input_shape:
            raise ValueError(
                f"model '{self.name}' expects inputs of shape (batch, {', '.join(map(str, self._input_shape))}), "
                f"got {tuple(x.shape)}"
            )

    # ---- data helpers ------------------------------------------------------------------
    def _prep(self, x, y=None):
        x = np.ascontiguousarray(np.asarray(x, dtype=self.dtype))
        if x.ndim < 2:
            raise ValueError(f"inputs must be batch-major with at least 2 dimensions, got shape {x.shape}")
        self._ensure_built(x)
        if y is None:
            return x, None
        y = np.asarray(y)
        if len(y) != len(x):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        node = self._plan.graph.nodes[self._plan.labels]
        if node.dtype.kind in "iu":
            if y.dtype.kind not in "iu":
                if not np.all(np.mod(y, 1) == 0):
                    raise ValueError(f"labels for {self._compiled['loss']} must be integer class indices")
            y = y.reshape(len(y), *[d for d in node.shape[1:]]) if y.ndim > 1 else y
            y = y.reshape(len(y)).astype(node.dtype)
        else:
            y = np.asarray(y, dtype=node.dtype)
            if y.ndim == 1 and len(node.shape) == 2 and node.shape[1] == 1:
                y = y.reshape(-1, 1)
            if y.shape[1:] != tuple(node.shape[1:]):
                raise ValueError(
                    f"labels have shape {y.shape}; model '{self.name}' needs (batch, {', '.join(map(str, node.shape[1:]))}), "
                    "the shape of its output"
                )
        return x, np.ascontiguousarray(y)

    # ---- training --------------------------------------------------------------------------
    def train_on_batch(self, x, y) -> float | list[float]:
        """One optimizer step on one batch; returns the loss (and metrics, if compiled with any)."""
        self._require_compiled("train_on_batch")
        x, y = self._prep(x, y)
        loss, correct = self._train_batch(x, y)
        if self._compiled["metrics"]:
            return [loss, correct / len(x)]
        return loss

    def _train_batch(self, x, y) -> tuple[float, float]:
        loss, correct = self._loop.train_batch(x, y, self._step)
        self._step += 1
        return loss, correct

    def fit(self, x, y, batch_size: int = 32, epochs: int = 1, shuffle: bool = True, validation_data=None, verbose: int = 1, cluster: str | None = None) -> History:
        """Train with mini-batch gradient descent (batch_size = len(x): batch GD;
        1: stochastic GD), reshuffling every epoch. ``cluster="host:port"`` runs the same
        training on a pstrain cluster (sync mode) and loads the trained weights back."""
        if int(batch_size) <= 0 or int(epochs) < 0:
            raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size}, {epochs}")
        self._require_compiled("fit")
        x, y = self._prep(x, y)
        if cluster is not None:
            self.get_config()  # the cluster gets the model as its config: a callable in it fails here, named
            from client.remote import fit_on_cluster

            if validation_data is not None:
                validation_data = self._prep(*validation_data[:2])
            return fit_on_cluster(self, x, y, batch_size, epochs, shuffle, validation_data, verbose, cluster)
        schedule = Schedule(len(x), int(batch_size), int(epochs), seed=self.seed, shuffle=shuffle)
        progress = _FitProgress(self, schedule.steps_per_epoch, epochs, verbose, validation_data, int(batch_size))
        # Batches go through _train_batch, as train_on_batch's do: one count of the model's steps.
        self._loop.run(x, y, schedule, [progress], first_step=self._step,
                       train_batch=lambda xb, yb, step, weight, min_version: self._train_batch(xb, yb))
        return progress.history

    def _logs(self, loss_sum, correct_sum, seen) -> dict:
        logs = {"loss": loss_sum / max(seen, 1)}
        if self._compiled["metrics"]:
            logs["accuracy"] = correct_sum / max(seen, 1)
        return logs

    # ---- inference -------------------------------------------------------------------------
    def evaluate(self, x, y, batch_size: int = 256, verbose: int = 0, return_dict: bool = False):
        """Loss (and metrics) over a dataset, in inference mode."""
        self._require_compiled("evaluate")
        x, y = self._prep(x, y)
        loss, accuracy = self._loop.evaluate(x, y, batch_size)
        logs = {"loss": loss, "accuracy": accuracy} if self._compiled["metrics"] else {"loss": loss}
        if verbose:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), file=sys.stdout)
        if return_dict:
            return logs
        return list(logs.values()) if len(logs) > 1 else logs["loss"]

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """Model outputs for ``x`` (probabilities for a softmax head), in inference
        mode; a built model need not be compiled for this."""
        x, _ = self._prep(x)
        params = self._store.pull()
        if len(x) == 0:
            out_shape = self._predictor.graph.nodes[self._predictor.fetches[0]].shape[1:]
            return np.empty((0,) + tuple(out_shape), self.dtype)
        return np.concatenate([self._predict_batch(x[s : s + batch_size], params) for s in range(0, len(x), batch_size)])

    def _predict_batch(self, x: np.ndarray, params) -> np.ndarray:
        (out,) = self._predictor.run({"x": x}, params, RunContext(training=False)).values
        return np.array(self._predictor.backend.to_host(out), copy=True)

    # ---- weights -------------------------------------------------------------------------------
    def _weight_names(self) -> list[str]:
        self._require_built()
        return [w.name for layer in self.layers for w in layer.weights]

    def _host_parameters(self) -> dict[str, np.ndarray]:
        """Copies of every variable's current value, by name."""
        return {n: np.array(self._store.backend.to_host(v), copy=True) for n, v in self._store.pull().items()}

    def _require_built(self):
        if not self.built:
            raise RuntimeError("the model is not built yet: give the first layer input_dim= or call fit/build")

    def get_weights(self) -> list[np.ndarray]:
        """Copies of all weights, in Keras order (per layer: kernel, bias, ...)."""
        names = self._weight_names()
        params = self._store.pull()
        return [np.array(self._store.backend.to_host(params[n]), copy=True) for n in names]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        names = self._weight_names()
        if len(weights) != len(names):
            raise ValueError(f"set_weights got {len(weights)} arrays; the model has {len(names)} ({', '.join(names)})")
        params = self._store.pull()
        for name, w in zip(names, weights):
            w = np.asarray(w)
            if w.shape != tuple(params[name].shape):
                raise ValueError(f"weight '{name}' has shape {tuple(params[name].shape)}, got {w.shape}")
            self._store.backend.copy_into(params[name], w.astype(self.dtype))

    @property
    def trainable_weights_names(self) -> list[str]:
        self._require_built()
        graph = self._predictor.graph
        return [w.name for layer in self.layers for w in layer.weights if graph.nodes[w.name].attrs["trainable"]]

    def summary(self) -> str:
        self._require_built()
        lines = [f"Model: {self.name}", f"{'Layer':<28}{'Output shape':<20}{'Params':>10}"]
        shape, total = self._input_shape, 0
        for layer in self.layers:
            shape = layer.output_shape(shape)
            n = sum(int(np.prod(w.shape)) for w in layer.weights)
            total += n
            lines.append(f"{layer.name + ' (' + type(layer).__name__ + ')':<28}{str((None,) + tuple(shape)):<20}{n:>10}")
        lines.append(f"Total params: {total}")
        text = "\n".join(lines)
        print(text)
        return text

    # ---- saving ------------------------------------------------------------------------------------
    def get_config(self) -> dict:
        """The model as JSON-able values (save, clusters); ValueError, naming it, for
        a callable activation or loss, which works in this process only."""
        return {
            "format": FORMAT,
            "name": self.name,
            "dtype": str(self.dtype),
            "seed": self.seed,
            "input_shape": list(self._input_shape) if self.built else None,
            "layers": [l.get_config() for l in self.layers],
            "compile": None
            if self._compiled is None
            else {
                "optimizer": self._compiled["optimizer"].get_config(),
                "loss": losses.serialize(self._compiled["loss"]),
                "metrics": self._compiled["metrics"],
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write config and weights to one ``.npz`` file (atomically)."""
        self._require_built()
        write_model(path, self.get_config(), self.get_weights())


class _FitProgress(Callback):
    """``fit``'s view of the loop: the step count, Keras's progress bar and epoch
    header, validation after every epoch, and the History."""

    def __init__(self, model: Sequential, steps_per_epoch: int, epochs, verbose: int, validation_data, batch_size: int):
        self.model, self.steps, self.epochs, self.verbose = model, steps_per_epoch, epochs, verbose
        self.validation_data, self.batch_size = validation_data, batch_size
        self.history = History()
        self.bar: ProgressBar | None = None
        self.done = 0  # steps of this epoch

    def on_epoch_begin(self, epoch: int) -> None:
        write_epoch_header(epoch + 1, self.epochs, self.verbose)
        self.bar = ProgressBar(self.steps, verbose=self.verbose)
        self.done = 0

    def on_step_end(self, step: int, totals: EpochTotals, samples: int, seconds: float, exchange_seconds: float) -> None:
        self.done += 1
        self.bar.update(self.done, **self.model._logs(totals.loss_sum, totals.correct, totals.seen))

    def on_epoch_end(self, epoch: int, totals: EpochTotals) -> None:
        logs = self.model._logs(totals.loss_sum, totals.correct, totals.seen)
        if self.validation_data is not None:
            vx, vy = self.validation_data[0], self.validation_data[1]
            val = self.model.evaluate(vx, vy, batch_size=max(self.batch_size, 256), verbose=0, return_dict=True)
            logs.update({f"val_{k}": v for k, v in val.items()})
            self.bar.finish(**{k: v for k, v in logs.items() if k.startswith("val_")})
        else:
            self.bar.finish()
        self.history.add(epoch, logs)


def load_model(path: str | os.PathLike, device: str = "cpu") -> Sequential:
    """Load a model written by ``model.save`` (or ``psctl export``)."""
    config, weights = read_model(path)
    model = Sequential([layers_mod.from_config(c) for c in config["layers"]], dtype=config["dtype"], seed=config["seed"], device=device, name=config["name"])
    comp = config["compile"]
    if comp is not None:  # a model saved uncompiled loads uncompiled, as in Keras
        model.compile(optimizers.get(comp["optimizer"]), comp["loss"], comp["metrics"])
    if not model.built:
        model.build(tuple(config["input_shape"]))
    model.set_weights(weights)
    return model
