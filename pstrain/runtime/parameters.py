"""The parameter-client interface, ps-lite style: the whole of what a trainer asks of
wherever its parameters live is ``pull`` and ``push_pull``, over full variables keyed
by name. Where the variables are cut into slices, on which shard each lives, how the
bytes travel and how failures are retried stay behind it.

Two implementations: ``LocalParameterClient`` (here) over an in-process
``ParameterStore``, which ``model.fit`` uses, and ``ShardedParameterClient``
(``pstrain/transport/ps_client.py``) over a job's gRPC shards, which workers use.
The training loop (``pstrain/runtime/loop.py``) sees only this interface.

Usage::

    params = LocalParameterClient(store)
    values = params.pull()
    values = params.push_pull(step, grads, updates)    # the new parameters after the push
"""
from __future__ import annotations

import abc
from typing import Mapping

import numpy as np

from pstrain.runtime.store import ParameterStore


class RolledBack(Exception):
    """The parameters went back to version ``version`` (a shard restarted from its
    checkpoint and the job's shards rolled back to a version they all hold): pull, and
    compute again from step ``version``. Raised by ``pull`` / ``push_pull``."""

    def __init__(self, version: int, detail: str = ""):
        self.version = int(version)
        super().__init__(detail or f"the parameters rolled back to version {self.version}")


class Fenced(Exception):
    """Another process took this worker slot over (a newer ownership epoch): this one
    must stop without pushing anything more. Raised by ``pull`` / ``push_pull``."""


class ParameterClient(abc.ABC):
    """Where a trainer's parameters live. The mappings returned are the client's own
    arrays, updated in place by later calls: read them, don't write or keep them."""

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """The newest parameter version seen (updates applied so far)."""

    @abc.abstractmethod
    def pull(self, step: int = 0, min_version: int = 0) -> Mapping[str, np.ndarray]:
        """The current parameters, {variable: full array}, once they are at least
        ``min_version``. ``step`` is the step the caller is about to compute (a
        bounded-staleness server may make it wait)."""

    @abc.abstractmethod
    def push_pull(self, step: int, grads: Mapping[str, np.ndarray], updates: Mapping[str, np.ndarray],
                  weight: float = 1.0, min_version: int = 0) -> Mapping[str, np.ndarray]:
        """Push step ``step``'s gradients (trainable variables) and updates (new values
        of state variables) and return the parameters once they are at least
        ``min_version``. ``weight`` is the gradient's share of the global batch: the
        weight of a sync average, the factor an async update is scaled by; 0 applies
        nothing. Pushes are idempotent per step on servers that see them twice."""

    def close(self) -> None:
        """Release connections and buffers (nothing to do in process)."""

    def __enter__(self) -> ParameterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalParameterClient(ParameterClient):
    """A ``ParameterStore`` in this process: a push is applied at once (there is one
    trainer, so ``min_version`` is met as soon as it returns) and the store's own
    arrays come back, with no copies.

    Usage::

        client = LocalParameterClient(ParameterStore(initial, trainable, optimizer))
        params = client.push_pull(0, {"w": grad_w}, {})
    """

    def __init__(self, store: ParameterStore):
        self.store = store

    @property
    def version(self) -> int:
        return self.store.version

    def pull(self, step: int = 0, min_version: int = 0) -> Mapping[str, np.ndarray]:
        if min_version > self.store.version:
            raise ValueError(f"min_version {min_version} is ahead of the store's version {self.store.version}; "
                             "in process nothing else will advance it")
        return self.store.pull()

    def push_pull(self, step: int, grads: Mapping[str, np.ndarray], updates: Mapping[str, np.ndarray],
                  weight: float = 1.0, min_version: int = 0) -> Mapping[str, np.ndarray]:
        # As an async shard does (psserver/shard.py): weight 0 applies nothing, another
        # weight scales the gradients. The usual weight 1 pushes them as they are.
        if weight != 1.0:
            if weight == 0:
                return self.store.pull()
            grads = {n: np.multiply(g, weight, dtype=g.dtype) if g.dtype.kind == "f" else g for n, g in grads.items()}
        self.store.push(grads, updates)
        return self.store.pull()
