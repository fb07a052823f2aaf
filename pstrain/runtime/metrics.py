"""Metrics computed from predictions on the host, Keras semantics."""
from __future__ import annotations

import numpy as np

NAMES = ("accuracy",)


def check(names) -> list[str]:
    names = list(names or [])
    for n in names:
        if n not in NAMES and n != "acc":
            raise ValueError(f"unknown metric '{n}'; supported: {', '.join(NAMES)}")
    return ["accuracy" if n == "acc" else n for n in names]


def correct(loss: str, prediction: np.ndarray, labels: np.ndarray) -> float:
    """Sum over examples of each one's accuracy, judged the way Keras's "accuracy"
    does for ``loss`` (divide by the number of examples for the mean)."""
    if loss == "sparse_categorical_crossentropy":
        return int(np.sum(np.argmax(prediction, axis=-1) == labels.reshape(prediction.shape[:-1])))
    if loss == "categorical_crossentropy":
        return int(np.sum(np.argmax(prediction, axis=-1) == np.argmax(labels, axis=-1)))
    if loss == "binary_crossentropy":
        hits = (prediction > 0.5) == (labels > 0.5)
        return float(np.sum(np.mean(hits.reshape(len(hits), -1), axis=1)))
    hits = np.round(prediction) == labels
    return float(np.sum(np.mean(hits.reshape(len(hits), -1), axis=1)))
