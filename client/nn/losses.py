"""Losses by Keras name, lowered to graph ops, or a callable ``loss(y_true, y_pred)``.

A softmax head with a categorical cross-entropy (or a sigmoid head with a binary
one) is lowered to the stable from-logits form: the loss reads the pre-activation
logits and the model's prediction stays the probabilities.

A callable loss gets two graph tensors, the labels (the output's shape, in the
model's float dtype) and the prediction, and returns a graph tensor built from them
with graph ops: a scalar, or per-example losses that are averaged over the batch (as
Keras does). It works in this process only; a model config cannot hold it.

Usage::

    def mean_abs_cubed_error(y_true, y_pred):
        g, d = y_pred.graph, y_pred - y_true
        return g.reduce_mean(g.abs(d) * g.square(d), axis=-1)   # one loss per example
    model.compile("sgd", loss=mean_abs_cubed_error)
"""
from __future__ import annotations

from typing import Callable, Union

import numpy as np

from client.nn.activations import describe
from graph import dtypes
from graph.core import Graph, Tensor

NAMES = (
    "mse",
    "mae",
    "binary_crossentropy",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
)
ALIASES = {"mean_squared_error": "mse", "mean_absolute_error": "mae"}
# head activation whose logits a loss can consume directly
FUSED_HEAD = {
    "categorical_crossentropy": "softmax",
    "sparse_categorical_crossentropy": "softmax",
    "binary_crossentropy": "sigmoid",
}

Loss = Union[str, Callable[[Tensor, Tensor], Tensor]]


def get(identifier) -> Loss:
    """A Keras loss name (aliases resolved), or a callable loss returned as is."""
    if isinstance(identifier, str):
        name = ALIASES.get(identifier, identifier)
        if name not in NAMES:
            raise ValueError(f"unknown loss '{identifier}'; use one of {', '.join(NAMES)} or a callable loss(y_true, y_pred)")
        return name
    if callable(identifier):
        return identifier
    raise ValueError(f"loss must be one of {', '.join(NAMES)} or a callable loss(y_true, y_pred), got {identifier!r}")


def serialize(loss: Loss) -> str:
    """What a model config stores for ``loss``; a callable cannot be stored."""
    if isinstance(loss, str):
        return loss
    raise ValueError(
        f"loss {describe(loss)} is a Python callable; it works in this process only (fit/evaluate/predict) and "
        "cannot go into a model config (save, fit(cluster=...), psctl). Compile with a named loss "
        f"({', '.join(NAMES)}) to save or ship the model"
    )


def accuracy_rule(loss: Loss, output_shape: tuple) -> str:
    """The loss name whose "accuracy" rule applies (pstrain.runtime.metrics.correct):
    the loss's own, or for a callable Keras's choice by shape (one output: binary
    at 0.5; several: the arg-max class)."""
    if isinstance(loss, str):
        return loss
    return "binary_crossentropy" if output_shape[-1:] == (1,) else "categorical_crossentropy"


def label_spec(loss: Loss, output_shape: tuple, dtype) -> tuple[tuple, np.dtype]:
    """Shape and dtype of the labels placeholder for a loss."""
    if loss == "sparse_categorical_crossentropy":
        return output_shape[:-1], np.dtype("int64")
    return output_shape, np.dtype(dtype)


def build(g: Graph, loss: Loss, output: Tensor, logits: Tensor | None, labels: Tensor) -> Tensor:
    """The scalar data loss; ``logits`` is the head's pre-activation when fusable."""
    if not isinstance(loss, str):
        return _build_callable(g, loss, output, labels)
    if logits is not None:
        return g.op(loss, [logits, labels], name="loss", from_logits=True)
    if loss in FUSED_HEAD:
        return g.op(loss, [output, labels], name="loss", from_logits=False)
    return g.op(loss, [output, labels], name="loss")


def _build_callable(g: Graph, fn, output: Tensor, labels: Tensor) -> Tensor:
    value = fn(labels, output)
    if not isinstance(value, Tensor) or value.graph is not g:
        raise TypeError(
            f"loss {describe(fn)} returned {type(value).__name__}; it must return a graph tensor built from "
            "(y_true, y_pred) with graph ops, e.g. y_true.graph.reduce_mean(y_true.graph.square(y_pred - y_true))"
        )
    if not dtypes.is_float(value.dtype):
        raise TypeError(f"loss {describe(fn)} returned a {value.dtype} tensor; a loss must be a float")
    if value.shape == ():
        return value
    if value.shape[0] is not None:
        raise ValueError(
            f"loss {describe(fn)} returned shape {value.shape}; return a scalar or one loss per example "
            "(the batch axis first)"
        )
    return g.reduce_mean(value, name="loss")  # per-example losses: the batch mean, as Keras
