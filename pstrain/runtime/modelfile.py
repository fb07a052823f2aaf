"""The model file: one ``.npz`` with the model's JSON config (``__config__``, format
``pstrain-model/1``) and its weights ``weight_0 .. weight_N`` in Keras
``get_weights()`` order. ``model.save``, ``psctl export`` and the master's export
all write it here; ``nn.load_model`` reads it back with ``read_model``.

Usage::

    write_model("m.npz", config, weights)
    config, weights = read_model("m.npz")
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from pstrain.runtime.files import atomic_write

FORMAT = "pstrain-model/1"


def write_model(path: str | os.PathLike, config: dict, weights: Sequence[np.ndarray], mode: int = 0o644) -> None:
    """Write ``config`` and ``weights`` to ``path`` atomically (``read_model`` checks the
    format), with permission bits ``mode``."""
    arrays = {f"weight_{i}": np.asarray(w) for i, w in enumerate(weights)}
    with atomic_write(path, mode=mode) as f:
        np.savez(f, __config__=np.frombuffer(json.dumps(config).encode(), np.uint8), **arrays)


def read_model(path: str | os.PathLike, check_format: bool = True) -> tuple[dict, list[np.ndarray]]:
    """(config, weights) of a model file; ValueError naming the file if it is not one.
    ``check_format=False`` takes any config (the master's export of a graph job has none)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            config = json.loads(bytes(f["__config__"]).decode())
            count = len([k for k in f.files if k.startswith("weight_")])
            weights = [f[f"weight_{i}"] for i in range(count)]
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a pstrain model file ({exc})") from exc
    if check_format:
        check_config(config, where=os.fspath(path))
    return config, weights


def check_config(config, where: str = "the model config") -> None:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{where}: unsupported model format {got!r}; expected {FORMAT}")
