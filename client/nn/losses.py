"""Losses by Keras name, lowered to graph ops.

A softmax head with a categorical cross-entropy (or a sigmoid head with a binary
one) is lowered to the stable from-logits form: the loss reads the pre-activation
logits and the model's prediction stays the probabilities.
"""
from __future__ import annotations

import numpy as np

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


def check(name) -> str:
    if not isinstance(name, str):
        raise ValueError(f"loss must be one of {', '.join(NAMES)}, got {name!r}")
    name = ALIASES.get(name, name)
    if name not in NAMES:
        raise ValueError(f"unknown loss '{name}'; use one of {', '.join(NAMES)}")
    return name


def label_spec(name: str, output_shape: tuple, dtype) -> tuple[tuple, np.dtype]:
    """Shape and dtype of the labels placeholder for a loss."""
    if name == "sparse_categorical_crossentropy":
        return output_shape[:-1], np.dtype("int64")
    return output_shape, np.dtype(dtype)


def build(g: Graph, name: str, output: Tensor, logits: Tensor | None, labels: Tensor) -> Tensor:
    """The scalar data loss; ``logits`` is the head's pre-activation when fusable."""
    if logits is not None:
        return g.op(name, [logits, labels], name="loss", from_logits=True)
    if name in FUSED_HEAD:
        return g.op(name, [output, labels], name="loss", from_logits=False)
    return g.op(name, [output, labels], name="loss")
