"""Atomic file writes: the one helper every durable file of pstrain goes through
(model files, checkpoints, the cluster state file, dataset caches).

The bytes go to a temporary file beside the target, are flushed and fsynced, the
file is renamed over the target (``os.replace`` is atomic on POSIX) and the
directory is fsynced so the rename itself survives a power cut. A reader, or a
crash at any moment, sees the old file or the new one, never half of either.

Usage::

    with atomic_write("model.npz") as f:     # a binary file object
        np.savez(f, w=w)
    with atomic_write("cluster.json", text=True, mode=0o600) as f:
        json.dump(state, f)
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, text: bool = False, mode: int | None = None) -> Iterator[IO]:
    """Write ``path`` atomically; the parent directory is created if needed.

    ``mode`` sets the file's permission bits (the temporary file is private, 0600,
    until then). If the body raises, the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
