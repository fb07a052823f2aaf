"""Atomic checkpoint files: named NumPy arrays plus JSON metadata.

A checkpoint is written to a temporary file in the destination's directory,
flushed and fsynced, then renamed over the destination (``os.replace`` is atomic
on POSIX) and the directory is fsynced so the rename itself survives a power
cut. A crash at any point therefore leaves either the previous checkpoint or
the new one, never a torn file. The format is a zip of ``.npy`` members (what
``np.savez`` writes) plus a ``__meta__.json`` member; nothing is pickled.

Usage::

    save_checkpoint("ckpt/shard-0.ckpt", CheckpointState({"w": w}, {"version": 7}))
    state = load_checkpoint("ckpt/shard-0.ckpt")   # None when there is none yet
    state.arrays["w"], state.meta["version"]
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pstrain.runtime.files import atomic_write

_META = "__meta__.json"
_NPY = ".npy"


@dataclass(frozen=True)
class CheckpointConfig:
    """Where a shard keeps its checkpoint and how often it writes one.

    ``every_versions``: write after this many new versions (0: only on ``close()``);
    ``every_seconds``: and at least this often while versions advance (0: no time bound).
    """

    path: str | os.PathLike
    every_versions: int = 100
    every_seconds: float = 0.0

    def __post_init__(self):
        if not str(self.path):
            raise ValueError("CheckpointConfig.path is empty; give the checkpoint file's path")
        if isinstance(self.every_versions, bool) or not isinstance(self.every_versions, int) or self.every_versions < 0:
            raise ValueError(
                f"CheckpointConfig.every_versions={self.every_versions!r} is out of range; allowed integers [0, inf) "
                "(0 writes only on close)"
            )
        seconds = self.every_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
            raise ValueError(f"CheckpointConfig.every_seconds={seconds!r} is out of range; allowed [0, inf) "
                             "(0: no time bound)")


@dataclass
class CheckpointState:
    """What a checkpoint holds: named arrays and JSON-serialisable metadata."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike, state: CheckpointState) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename, fsync dir).

    Creates the parent directory if needed. Raises ValueError for an array that
    would need pickling (object dtype) or metadata JSON cannot represent (NaN,
    Inf); the previous checkpoint at ``path``, if any, is then untouched.
    """
    path = Path(path)
    meta = json.dumps(_jsonable(state.meta), sort_keys=True, allow_nan=False)
    # Never leaves half-written temp files behind; on failure the old checkpoint is untouched.
    with atomic_write(path) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, array in state.arrays.items():
                with zf.open(key + _NPY, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            zf.writestr(_META, meta)


def load_checkpoint(path: str | os.PathLike, meta_only: bool = False) -> CheckpointState | None:
    """The checkpoint at ``path``, or None when there is none.

    ``meta_only``: read just the metadata (no arrays), e.g. which version a file holds.
    A file that exists but cannot be read raises ValueError (rather than
    silently starting over): atomic writes never produce one, so it means
    outside damage, and someone should look before training restarts from zero.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path, "r") as zf:
            meta = json.loads(zf.read(_META))
            arrays = {}
            for name in [] if meta_only else zf.namelist():
                if name.endswith(_NPY):
                    with zf.open(name) as member:
                        arrays[name[: -len(_NPY)]] = np.lib.format.read_array(member, allow_pickle=False)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
        raise ValueError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); move it aside to start over"
        ) from exc
    return CheckpointState(arrays, meta)




def _jsonable(value: Any) -> Any:
    """``value`` with NumPy scalars made Python ones, so json can write it."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
