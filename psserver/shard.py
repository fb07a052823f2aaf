"""A parameter-server shard with no transport: pushes, pulls, consistency modes, checkpoints.

A shard owns some of a job's variables (slices, by name) and applies the
workers' gradients to them with the job's optimizer. gRPC server threads call
it concurrently; one ``threading.Condition`` guards all state, and waiters
(blocked pulls) are woken whenever the version, the clocks or the membership
change. What differs between modes is asked of a pure policy object
(``psserver.consistency``); the shard itself has no per-mode code.

Modes:

- ``sync``: pushes for step t are buffered until every live worker has pushed
  step t, then their weighted average ``sum_k w_k g_k / sum_k w_k`` (summed in
  ascending worker order, so the result never depends on arrival order) is
  applied once and the version becomes t + 1.
- ``async``: each push is applied as it arrives (no averaging).
- ``ssp`` (stale synchronous parallel, staleness s): applied as in async, but a
  worker's pull for step t waits until the slowest live worker has pushed step
  t - s - 1, i.e. no worker runs more than s steps ahead of the slowest.

Pushes are idempotent: each worker's steps arrive in increasing order (a worker
retries a push until it is acknowledged before starting the next step), so a
push whose step is not above the worker's highest received step is a retry; it
is acknowledged with ``duplicate=True`` and never applied twice.

Workers are *slots* (slot k trains part k of every global batch), and the process
running a slot can change: ``fence(k, epoch)`` gives slot k a newer ownership epoch
and answers where the slot stands (its first step not received here); from then on
pushes and pulls carrying an older epoch raise ``Fenced``. What the old process
pushed stays: the new one computes the same gradients from that step, so a step
both send is applied once. Epochs are checkpointed and never go back.

Usage::

    shard = Shard("mnist", 0, {"dense/kernel": w}, trainable={"dense/kernel"},
                  optimizer=SGD(0.1), mode="sync", workers=[0, 1],
                  checkpoint=CheckpointConfig("ckpt/mnist-0.ckpt", every_versions=100))
    version, params = shard.pull(worker=0, step=0, min_version=0)
    ack = shard.push(worker=0, step=0, grads={"dense/kernel": g}, assigns={}, weight=0.5)
    version, next_step = shard.fence(worker=1, epoch=1)   # another process takes slot 1 over
    shard.close()   # writes a final checkpoint

A shard reports what it does (apply time, staleness, barrier waits, rejections) to
an optional ``observer`` (``psserver.metrics.ShardMetrics``); the default records nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from psserver.checkpoint import CheckpointConfig, CheckpointState, load_checkpoint, save_checkpoint
from psserver.consistency import ConsistencyPolicy, policy_for
from pstrain.kernels import get_backend
from pstrain.runtime.modes import MODES, Mode
from pstrain.runtime.optimizers import Optimizer, UpdateRule
from pstrain.runtime.store import ParameterStore, PushRejected

__all__ = ["MODES", "CheckpointConfig", "PushAck", "PushRefused", "Shard", "ShardClosed", "ShardObserver"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class ShardClosed(RuntimeError):
    """The shard was closed (its job ended, or the server is stopping)."""


@dataclass(frozen=True)
class PushAck:
    """The answer to an accepted push: the shard's version after it, and whether it
    was a retry of a push already received (then nothing was applied)."""

    version: int
    duplicate: bool = False
    checkpoint_due: bool = False  # sync: the time bound passed; a worker marks its next push (``checkpoint``)


class PushRefused(PushRejected):
    """A push refused for who sent it or when, not for its contents: ``reason`` is
    unknown_worker, stale_step, out_of_order, bad_step or bad_weight; ``variable`` is None."""

    def __init__(self, reason: str, message: str):
        ValueError.__init__(self, message)
        self.reason = reason
        self.variable = None


class RolledBack(RuntimeError):
    """The shard went back to an earlier version (another shard of the job restarted
    from its checkpoint, and every shard rolled back to a version they all hold): the
    worker must pull and compute again from step ``version``."""

    def __init__(self, job: str, shard: int, version: int):
        self.version = version
        super().__init__(f"job '{job}' shard {shard} rolled back to version {version}; "
                         f"pull and compute again from step {version}")


class Fenced(RuntimeError):
    """A request from a process that no longer owns its worker slot: another took the
    slot over with a newer ownership epoch (the master moved it, or decided the old
    process was lost). Nothing of it is applied; the process must stop."""

    def __init__(self, job: str, shard: int, worker: int, epoch: int, current: int):
        self.worker, self.epoch, self.current = worker, epoch, current
        super().__init__(f"job '{job}' shard {shard}: worker slot {worker} was taken over (owner epoch {current}); "
                         f"this process holds epoch {epoch} and is fenced off: stop")


class PullRefused(ValueError):
    """A pull that asks for a version the shard cannot reach soon (``min_version`` far
    beyond its version): refused at once instead of holding a server thread."""


# How far ahead of the shard's version a push's step or a pull's min_version may be.
# Workers are at most a few steps ahead (sync waits at every barrier; an async worker's
# own pushes advance the version), so a step far beyond it is a bug or an attack: taken,
# it would make every later real push of that worker look like a retry.
DEFAULT_STEP_WINDOW = 1024


class ShardObserver:
    """What a shard reports as it works; this default records nothing
    (``psserver.metrics.ShardMetrics`` turns the reports into Prometheus series).
    Called with the shard's lock held, so implementations must be quick."""

    def held(self, nbytes: int, version: int) -> None:
        """The shard holds ``nbytes`` of variables at ``version`` (on creation)."""

    def applied(self, seconds: float, version: int) -> None:
        """One update took ``seconds`` to apply; the shard is now at ``version``."""

    def stale(self, versions: int) -> None:
        """Async/SSP: the gradient just applied was computed ``versions`` updates ago."""

    def barrier(self, seconds: float) -> None:
        """Sync: a step's barrier completed ``seconds`` after its first push arrived."""

    def rejected(self, reason: str) -> None:
        """A push was refused for ``reason`` (``PushRejected.reason``)."""


@dataclass(frozen=True)
class _Push:
    """A sync push waiting at its step's barrier (the shard's own copies)."""

    weight: float
    grads: dict[str, np.ndarray]
    assigns: dict[str, np.ndarray]


class Shard:
    """The state of one parameter-server shard; thread-safe. See the module docstring."""

    def __init__(
        self,
        job: str,
        shard_id: int,
        variables: Mapping[str, np.ndarray],
        trainable: set[str] | None,
        optimizer: UpdateRule | dict | str,
        mode: Mode | str = "sync",
        *,
        staleness: int = 0,
        workers: Iterable[int],
        backend: str = "cpu",
        checkpoint: CheckpointConfig | None = None,
        observer: ShardObserver | None = None,
        step_window: int = DEFAULT_STEP_WINDOW,
        incarnation: str = "",
    ):
        mode = Mode.parse(mode, field="Shard.mode")
        if isinstance(step_window, bool) or not isinstance(step_window, int) or step_window < 1:
            raise ValueError(f"Shard.step_window={step_window!r} is out of range; allowed integers [1, inf)")
        self.step_window = step_window
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"Shard.staleness={staleness!r} is out of range; allowed integers [0, inf)")
        self.job = job
        self.shard_id = int(shard_id)
        self.mode: str = mode.value  # the plain string, as stats and checkpoints carry it
        self.staleness = staleness  # only ssp uses it; a job may carry one whatever its mode
        self._policy: ConsistencyPolicy = policy_for(mode, staleness)
        self.checkpoint_config = checkpoint
        self._backend = get_backend(backend)
        self._store = ParameterStore(variables, trainable, Optimizer(optimizer, self._backend))
        self._cond = threading.Condition()
        self._live: set[int] = _worker_set(workers)
        self._clocks: dict[int, int] = {k: 0 for k in self._live}  # worker -> steps pushed (its last step + 1)
        self._last_step: dict[int, int] = {}  # worker -> highest step received: the idempotency key
        self._pending: dict[int, dict[int, _Push]] = {}  # buffered (sync): step -> worker -> push
        self._barrier_start: dict[int, float] = {}  # buffered (sync): step -> when its first push arrived
        self._pulled_version: dict[int, int] = {}  # worker -> version of its last pull (staleness)
        self._observer = observer or ShardObserver()
        self._closed = False
        self._scratch_buffers: dict[str, tuple] = {}
        self._applied = 0
        self._duplicates = 0
        self._rejected: Counter[str] = Counter()
        self._pushed_bytes = 0
        self._pulled_bytes = 0
        # Checkpoint snapshots are taken under the condition and written outside it, so
        # file I/O never stalls pushes; the write lock keeps an older snapshot from
        # replacing a newer one.
        self._write_lock = threading.Lock()
        self._snapshot_seq = 0
        self._written_seq = 0
        self._snapshot_version = 0
        self._checkpoint_version: int | None = None
        self._checkpoints_written = 0
        self._checkpoint_errors = 0
        self._restored = False
        self._incarnation = incarnation
        self._generation = 0  # rollbacks so far: a pull waiting across one is told to start over
        self._rewind: dict[int, int] = {}  # worker -> version it must compute from (until it pulls)
        self._owners: dict[int, int] = {}  # worker slot -> newest ownership epoch seen (older ones are fenced)
        self._due: list[tuple[int, CheckpointState]] = []  # aligned sync snapshots to write
        self._snapshot_time = time.monotonic()  # when the last snapshot was taken (the time bound)
        self._checkpoint_steps: set[int] = set()  # sync: steps a worker marked for a checkpoint
        self._checkpoint_versions: list[int] = []  # on disk: the previous and the latest
        if checkpoint is not None:
            previous = self._load_own(_previous(checkpoint.path), meta_only=True)
            latest = self._load_own(checkpoint.path)
            self._checkpoint_versions = [int(s.meta["version"]) for s in (previous, latest) if s is not None]
            if latest is not None:
                self._restore(latest)
            else:  # version 0 on disk too: a rollback can always go back to the start
                self._write(*self._snapshot(), raise_errors=False)

        self._observer.held(sum(int(p.nbytes) for p in self._store.params.values()), self._store.version)

    # ---- public API ------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Updates applied so far (sync: completed steps)."""
        with self._cond:
            return self._store.version

    @property
    def live_workers(self) -> frozenset[int]:
        with self._cond:
            return frozenset(self._live)

    def push(
        self,
        worker: int,
        step: int,
        grads: Mapping[str, np.ndarray],
        assigns: Mapping[str, np.ndarray] | None = None,
        weight: float = 1.0,
        *,
        immutable: bool = False,
        owner_epoch: int = 0,
        checkpoint: bool = False,
    ) -> PushAck:
        """Receive worker ``worker``'s gradients (trainable variables) and assignments
        (state such as batch-norm moving statistics) for ``step``.

        The whole push is checked before anything is buffered or applied; a bad one
        raises ``PushRejected`` (``PushRefused`` for worker/step/weight problems) and
        changes nothing. ``weight`` is the share of the global batch the gradient
        stands for (its local batch / the global batch): it weights the sync average,
        and in async/ssp the gradient is scaled by it before it is applied, so K
        workers each pushing 1/K of a batch move the parameters as one full batch
        would. ``weight == 0`` applies nothing.

        Until it returns the arrays are only read. ``immutable=True`` promises that they
        never change afterwards either (views of a received frame's bytes): a push left
        waiting at a sync barrier then keeps them as they are instead of copying.
        ``owner_epoch`` is the sender's ownership epoch of the slot: an older one than the
        shard has seen raises ``Fenced`` (see ``fence``). ``checkpoint`` (sync) asks for a
        checkpoint once this step's barrier completes: the sender marks the same step on
        every shard (after one answered ``checkpoint_due``), so they all hold that version.
        """
        worker, step, weight = int(worker), int(step), float(weight)
        grads = {name: np.asarray(g) for name, g in grads.items()}
        assigns = {name: np.asarray(a) for name, a in (assigns or {}).items()}
        try:
            # Outside the lock: it reads only the variables' shapes and dtypes, which never change.
            self._check_contents(worker, step, weight, grads, assigns)
        except PushRejected as exc:
            if not isinstance(exc, PushRefused):  # the store's message names the variable, not who sent it
                exc.args = (f"job '{self.job}' shard {self.shard_id}: push from worker {worker} step {step}: {exc}",)
            with self._cond:
                self._rejected[exc.reason] += 1
                self._observer.rejected(exc.reason)
            log.warning("%s", exc)
            raise
        with self._cond:
            self._check_open()
            self._admit(worker, int(owner_epoch))
            if worker in self._rewind:
                raise RolledBack(self.job, self.shard_id, self._rewind[worker])
            if self._is_duplicate(worker, step):
                self._duplicates += 1
                log.debug("job %s shard %d: duplicate push worker %d step %d", self.job, self.shard_id, worker, step)
                return PushAck(self._store.version, duplicate=True)
            self._last_step[worker] = step
            self._clocks[worker] = max(self._clocks.get(worker, 0), step + 1)
            self._pushed_bytes += sum(a.nbytes for a in grads.values()) + sum(a.nbytes for a in assigns.values())
            if self._policy.buffers_pushes:
                if checkpoint and self.checkpoint_config is not None:
                    self._checkpoint_steps.add(step)
                self._barrier_start.setdefault(step, time.perf_counter())
                self._pending.setdefault(step, {})[worker] = _Push(weight, grads, assigns)
                self._complete_barriers()
                if not immutable and worker in self._pending.get(step, {}):
                    # It waits at the barrier, and the caller may reuse its arrays: keep our
                    # own copies. (The push that completes a barrier is applied as it is.)
                    self._pending[step][worker] = _Push(
                        weight, {n: g.copy() for n, g in grads.items()}, {n: a.copy() for n, a in assigns.items()}
                    )
            elif (scale := self._policy.gradient_scale(weight)) != 0:
                started = time.perf_counter()
                if scale != 1.0:
                    grads = {n: np.multiply(g, scale, dtype=g.dtype) if g.dtype.kind == "f" else g
                             for n, g in grads.items()}
                self._apply(grads, assigns, step)
                self._applied += 1
                if worker in self._pulled_version:
                    self._observer.stale(self._store.version - self._pulled_version[worker])
                self._store.version += 1
                self._observer.applied(time.perf_counter() - started, self._store.version)
            self._cond.notify_all()
            version = self._store.version
            due = self._due_snapshot()
            time_due = self._policy.buffers_pushes and self._time_due()
        for snapshot in due:
            self._write(*snapshot, raise_errors=False)
        return PushAck(version, checkpoint_due=time_due)

    def pull(
        self, worker: int, step: int, min_version: int = 0, timeout: float | None = None, owner_epoch: int = 0
    ) -> tuple[int, dict[str, np.ndarray]]:
        """The version and copies of all variables, once the mode allows worker
        ``worker`` to compute ``step``: sync waits for ``version >= min_version``, ssp
        until the slowest live worker's clock is ``>= step - staleness``, async never.

        Raises TimeoutError after ``timeout`` seconds (None: wait as long as it takes).
        """
        live = self._store.params
        return self.pull_encoded(worker, step, min_version, timeout,
                                 lambda version, params: {n: self._owned(p, live[n]) for n, p in params.items()},
                                 owner_epoch=owner_epoch)

    def pull_encoded(self, worker: int, step: int, min_version: int, timeout: float | None, encode,
                     owner_epoch: int = 0):
        """``pull``, handing the variables to ``encode(version, {name: host array})``
        under the lock and returning ``(version, what encode returned)``: a service
        frames the live arrays directly instead of copying them first. ``encode`` must
        not keep the arrays; on the CPU backend they are the shard's own."""
        with self._cond:
            if worker >= 0:
                self._admit(worker, int(owner_epoch))
            if min_version > self._store.version + self.step_window:
                self._rejected["bad_min_version"] += 1
                self._observer.rejected("bad_min_version")
                raise PullRefused(
                    f"job '{self.job}' shard {self.shard_id}: pull by worker {worker} asks for min_version "
                    f"{min_version}, more than {self.step_window} versions ahead of the shard's version "
                    f"{self._store.version}; pull at most the version after the step you pushed"
                )
            # It pulls: from here on it computes from what it gets. Unless it asks for a version
            # past the one rolled back to (a sync worker's first pull as it takes a slot over):
            # nobody computes the steps in between for it, so it must start over from there.
            rewind = self._rewind.pop(worker, None)
            if rewind is not None and min_version > self._store.version:
                raise RolledBack(self.job, self.shard_id, self._store.version)
            ready, generation = self._ready(step, min_version), self._generation
            if not self._cond.wait_for(lambda: self._closed or self._generation != generation or ready(), timeout):
                raise TimeoutError(self._wait_message(worker, step, min_version, timeout))
            self._check_open()
            if self._generation != generation:
                raise RolledBack(self.job, self.shard_id, self._store.version)
            version = self._store.version
            params = {name: self._backend.to_host(p) for name, p in self._store.params.items()}
            self._pulled_bytes += sum(a.nbytes for a in params.values())
            if worker >= 0:  # the master pulls as worker -1
                self._pulled_version[worker] = version
            return version, encode(version, params)

    def fence(self, worker: int, epoch: int) -> tuple[int, int]:
        """A new process takes worker slot ``worker`` over with ownership ``epoch``: from
        now on the slot's pushes and pulls with an older epoch raise ``Fenced``. Returns
        (version, the slot's first step not received here): where the new owner starts.
        Its pushes already received stay (buffered ones too): the new owner computes the
        same gradients, so a step both send is applied once."""
        worker = int(worker)
        with self._cond:
            self._check_open()
            self._admit(worker, int(epoch))
            self._cond.notify_all()
            return self._store.version, self._last_step.get(worker, -1) + 1

    def set_live_workers(self, workers: Iterable[int]) -> None:
        """Change membership (a worker died or joined). A removed worker's buffered
        pushes are dropped and its later pushes refused (unknown_worker); sync
        barriers and ssp waits are re-evaluated against the remaining workers. A new
        worker starts at the slowest live worker's clock, so it holds nobody back."""
        new = _worker_set(workers)
        with self._cond:
            self._check_open()
            self._set_live(new)
            self._complete_barriers()  # the barrier may have waited only for removed workers
            self._cond.notify_all()
            due = self._due_snapshot()
        for snapshot in due:
            self._write(*snapshot, raise_errors=False)

    def rollback(self, version: int) -> int:
        """Go back to the checkpoint of ``version`` (the latest or the previous one on
        disk): parameters, optimizer state, clocks and the idempotency table as they were
        then. Waiting pulls and every worker's next push raise ``RolledBack`` until that
        worker pulls again; returns the version now held."""
        if self.checkpoint_config is None:
            raise ValueError(f"job '{self.job}' shard {self.shard_id} keeps no checkpoints; it cannot roll back")
        with self._cond:
            self._check_open()
            held = self._checkpoint_versions
            path = self.checkpoint_config.path
            state = None
            if version in held:
                state = self._load_own(path if version == held[-1] else _previous(path))
            if state is None or int(state.meta["version"]) != version:
                raise ValueError(f"job '{self.job}' shard {self.shard_id} holds no checkpoint of version {version} "
                                 f"(it holds {held})")
            self._restore(state)
            self._barrier_start.clear()
            self._checkpoint_steps.clear()
            self._generation += 1
            self._rewind = {w: version for w in self._live}
            self._cond.notify_all()
            log.warning("job %s shard %d: rolled back to version %d", self.job, self.shard_id, version)
            return self._store.version

    def _load_own(self, path, meta_only: bool = False) -> CheckpointState | None:
        """The checkpoint at ``path`` if it is this job incarnation's (a master restarted on a
        fresh database reuses job ids: another job's checkpoint is never restored)."""
        state = load_checkpoint(path, meta_only=meta_only)
        if state is None:
            return None
        if state.meta.get("incarnation", "") != self._incarnation:
            log.warning("job %s shard %d: ignoring checkpoint %s of another run of this job id", self.job,
                        self.shard_id, path)
            return None
        return state

    def reject(self, reason: str) -> None:
        """Count a request refused outside the shard (the service's ``oversize``)."""
        with self._cond:
            self._rejected[reason] += 1
            self._observer.rejected(reason)

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and debugging (a consistent snapshot)."""
        with self._cond:
            return {
                "job": self.job,
                "shard": self.shard_id,
                "mode": self.mode,
                "version": self._store.version,
                "live_workers": sorted(self._live),
                "clocks": dict(sorted(self._clocks.items())),
                "pending_steps": {t: sorted(ws) for t, ws in sorted(self._pending.items())},
                "bytes": sum(int(p.nbytes) for p in self._store.params.values()),  # held here
                "restored": self._restored,
                "pushed_bytes": self._pushed_bytes,
                "pulled_bytes": self._pulled_bytes,
                "applied_pushes": self._applied,
                "duplicates": self._duplicates,
                "rejected": dict(self._rejected),
                "owners": dict(sorted(self._owners.items())),
                "checkpoint_version": self._checkpoint_version,
                "checkpoint_versions": list(self._checkpoint_versions),
                "checkpoints_written": self._checkpoints_written,
                "checkpoint_errors": self._checkpoint_errors,
            }

    def optimizer_state(self) -> dict[str, dict[str, Any]]:
        """Host copies of the optimizer's per-variable state (see ``Optimizer.state_dict``)."""
        with self._cond:
            return self._store.optimizer.state_dict()

    def close(self) -> None:
        """Stop serving: blocked pulls raise RuntimeError, and a final checkpoint is
        written (raising if that fails). Closing twice does nothing."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            snap = self._snapshot() if self.checkpoint_config is not None else None
        if snap is not None:
            self._write(*snap, raise_errors=True)

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- pushes ----------------------------------------------------------------------------
    def _check_contents(self, worker: int, step: int, weight: float, grads: dict, assigns: dict) -> None:
        where = f"job '{self.job}' shard {self.shard_id}: push from worker {worker} step {step}"
        if step < 0:
            raise PushRefused("bad_step", f"{where}: steps count from 0")
        if not 0.0 <= weight <= 1.0:  # NaN fails too
            raise PushRefused(
                "bad_weight", f"{where}: weight {weight!r} is out of range; allowed [0, 1] (the push's share of the "
                "global batch: its examples / the global batch size)"
            )
        for name, g in grads.items():
            self._store._check(name, g, trainable=True)
        for name, a in assigns.items():
            self._store._check(name, a, trainable=False)

    def _is_duplicate(self, worker: int, step: int) -> bool:
        """True for a retry; raises PushRefused for a push that may not be applied."""
        where = f"job '{self.job}' shard {self.shard_id}: push from worker {worker} step {step}"
        if worker not in self._live:
            raise self._refuse(
                "unknown_worker",
                f"{where}: worker {worker} is not live here (live: {sorted(self._live)}); "
                "it was removed after a failure or never registered",
            )
        last_step = self._last_step.get(worker)
        if last_step is not None and step <= last_step:
            return True
        if step > self._store.version + self.step_window:
            raise self._refuse(
                "bad_step",
                f"{where}: step {step} is more than {self.step_window} steps ahead of the shard's version "
                f"{self._store.version}; a worker pushes the step it computed from a pull",
            )
        refusal = self._policy.check_step(step, self._store.version, last_step)
        if refusal is not None and refusal.reason == "out_of_order" and self._restored:
            # This shard restarted from a checkpoint and is behind the worker: it must go
            # back to what the shards hold (the master rolls them back), not fail.
            raise RolledBack(self.job, self.shard_id, self._store.version)
        if refusal is not None:
            raise self._refuse(refusal.reason, f"{where}: {refusal.message}")
        return False

    def _admit(self, worker: int, epoch: int) -> None:
        """Refuse a request from an older owner of the slot; a newer one takes it over.
        Caller holds the lock."""
        current = self._owners.get(worker, 0)
        if epoch < current:
            raise self._fenced(worker, epoch)
        if epoch > current:
            self._owners[worker] = epoch

    def _fenced(self, worker: int, epoch: int) -> Fenced:
        self._rejected["fenced"] += 1
        self._observer.rejected("fenced")
        exc = Fenced(self.job, self.shard_id, worker, epoch, self._owners.get(worker, 0))
        log.warning("%s", exc)
        return exc

    def _refuse(self, reason: str, message: str) -> PushRefused:
        self._rejected[reason] += 1
        self._observer.rejected(reason)
        log.warning("%s", message)
        return PushRefused(reason, message)

    def _complete_barriers(self) -> None:
        """Apply every buffered step whose barrier the policy says is complete (several
        when workers ran ahead); nothing when the policy buffers nothing. Caller holds the lock."""
        while True:
            step = self._store.version
            arrived = self._pending.get(step)
            if arrived is None or not self._policy.barrier_complete(arrived.keys(), self._live):
                return
            del self._pending[step]
            started = time.perf_counter()
            order = sorted(arrived)  # a fixed summation order makes sync results deterministic
            pushes = [arrived[k] for k in order]
            self._apply(self._average(pushes, "grads"), self._average(pushes, "assigns"), step)
            self._applied += len(pushes)
            self._store.version = step + 1
            every = self.checkpoint_config.every_versions if self.checkpoint_config else 0
            marked = step in self._checkpoint_steps
            self._checkpoint_steps.discard(step)
            if (every and self._store.version % every == 0) or marked:
                self._due.append(self._snapshot())
            done = time.perf_counter()
            self._observer.applied(done - started, self._store.version)
            first = self._barrier_start.pop(step, None)
            if first is not None:  # None: the step's first pushes came from a checkpoint
                self._observer.barrier(done - first)

    def _average(self, pushes: list[_Push], field: str) -> dict[str, np.ndarray]:
        """Per variable, the weighted average over the pushes that carry it.

        Accumulates in float64, in ascending worker order, into buffers kept between
        steps (fresh ones each step cost page faults that outweigh the arithmetic). A
        variable only one push carries is that push's value as is: the average of one
        is exact, so one worker gives what an in-process run computes. Integer state
        cannot be averaged; the lowest-numbered worker's value is used.
        """
        out = {}
        names = sorted({name for p in pushes for name in getattr(p, field)})
        for name in names:
            dtype = self._store.params[name].dtype
            carriers = [p for p in pushes if p.weight != 0 and getattr(p, field).get(name) is not None]
            if not carriers:  # all weights 0: nothing to apply for this variable
                continue
            if len(carriers) == 1 or dtype.kind not in "fc":
                out[name] = getattr(carriers[0], field)[name]
                continue
            acc, term, result = self._scratch(name, dtype)
            total = 0.0
            for i, p in enumerate(carriers):
                target = acc if i == 0 else term
                np.multiply(getattr(p, field)[name], p.weight, out=target, dtype=np.float64)
                if i:
                    np.add(acc, term, out=acc)
                total += p.weight
            np.divide(acc, total, out=acc)
            result[...] = acc
            out[name] = result
        return out

    def _scratch(self, name: str, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reusable (float64 accumulator, float64 term, result) buffers for ``name``."""
        bufs = self._scratch_buffers.get(name)
        if bufs is None:
            shape = self._store.params[name].shape
            bufs = (np.empty(shape, np.float64), np.empty(shape, np.float64), np.empty(shape, dtype))
            self._scratch_buffers[name] = bufs
        return bufs

    def _apply(self, grads: Mapping[str, np.ndarray], assigns: Mapping[str, np.ndarray], step: int) -> None:
        # ParameterStore.push would re-run every check; these were checked on arrival.
        # Learning-rate schedules follow the global step, however many pushes it takes.
        for name, g in grads.items():
            self._store.optimizer.apply(name, self._store.params[name], g, step=step)
        for name, a in assigns.items():
            self._backend.copy_into(self._store.params[name], a)

    # ---- pulls and membership ------------------------------------------------------------------
    def _ready(self, step: int, min_version: int):
        # Reads the attributes on every call: membership replaces self._live.
        ready = self._policy.pull_ready
        return lambda: ready(step, min_version, self._store.version, self._live, self._clocks)

    def _wait_message(self, worker: int, step: int, min_version: int, timeout: float | None) -> str:
        head = (
            f"job '{self.job}' shard {self.shard_id}: pull by worker {worker} for step {step} "
            f"timed out after {timeout}s"
        )
        version = self._store.version
        arrived = self._pending.get(version, {}).keys()
        return f"{head} {self._policy.wait_reason(step, min_version, version, self._live, self._clocks, arrived)}"

    def _set_live(self, new: set[int]) -> None:
        """Membership change; caller holds the lock (also used on restore)."""
        removed, added = self._live - new, new - self._live
        for k in removed:
            for step in list(self._pending):
                self._pending[step].pop(k, None)
                if not self._pending[step]:
                    del self._pending[step]
                    self._barrier_start.pop(step, None)
            if k in self._last_step:  # its buffered pushes were just dropped
                self._last_step[k] = self._policy.received_after_removal(self._last_step[k], self._store.version)
        floor = min((self._clocks[k] for k in self._live & new), default=0)
        for k in added:
            self._clocks[k] = max(self._clocks.get(k, 0), floor)
        self._live = set(new)
        if removed or added:
            log.info(
                "job %s shard %d: workers removed %s, added %s; live %s",
                self.job, self.shard_id, sorted(removed), sorted(added), sorted(new),
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ShardClosed(f"job '{self.job}' shard {self.shard_id} is closed (the job ended or the server is stopping)")

    def _host_copy(self, array) -> np.ndarray:
        return self._owned(self._backend.to_host(array), array)

    @staticmethod
    def _owned(host: np.ndarray, variable) -> np.ndarray:
        """``host`` (``to_host(variable)``) as an array nobody else changes: a device
        backend's host copy already is one; the CPU backend's is the variable itself."""
        return host.copy() if host is variable else host

    # ---- checkpoints ---------------------------------------------------------------------------
    def _due_snapshot(self) -> list[tuple[int, CheckpointState]]:
        """Snapshots to write now (caller holds the lock). A sync shard snapshots at every
        multiple of ``every_versions`` as its barriers complete (``_complete_barriers``),
        so all shards of a job hold checkpoints of the same versions to roll back to;
        async and ssp shards when ``every_versions`` have passed since the last one."""
        due, self._due = self._due, []
        every = self.checkpoint_config.every_versions if self.checkpoint_config else 0
        if not self._policy.buffers_pushes and (
                (every and self._store.version - self._snapshot_version >= every) or self._time_due()):
            due.append(self._snapshot())
        return due

    def _time_due(self) -> bool:
        """Whether the time bound passed since the last snapshot, with new versions since
        (caller holds the lock)."""
        seconds = self.checkpoint_config.every_seconds if self.checkpoint_config else 0
        return bool(seconds) and self._store.version > self._snapshot_version and (
            time.monotonic() - self._snapshot_time >= seconds)

    def _snapshot(self) -> tuple[int, CheckpointState]:
        """A consistent copy of everything a restarted shard needs; caller holds the lock."""
        self._snapshot_seq += 1
        self._snapshot_version = self._store.version
        self._snapshot_time = time.monotonic()
        arrays = {f"params/{name}": self._host_copy(p) for name, p in self._store.params.items()}
        optimizer_meta = {}
        for name, st in self._store.optimizer.state_dict().items():
            optimizer_meta[name] = {"t": st.pop("t"), "arrays": sorted(st)}
            arrays.update({f"optimizer/{name}/{k}": a for k, a in st.items()})
        pending_meta = []
        for step, arrived in sorted(self._pending.items()):
            for worker, p in sorted(arrived.items()):
                # Buffered pushes were acknowledged, so they are kept: a retry after a
                # restart is then still a duplicate and the barrier still completes.
                pending_meta.append({
                    "step": step, "worker": worker, "weight": p.weight,
                    "grads": sorted(p.grads), "assigns": sorted(p.assigns),
                })
                arrays.update({f"pending/{step}/{worker}/grads/{n}": g for n, g in p.grads.items()})
                arrays.update({f"pending/{step}/{worker}/assigns/{n}": a for n, a in p.assigns.items()})
        meta = {
            "format": CHECKPOINT_FORMAT,
            "job": self.job,
            "shard_id": self.shard_id,
            "mode": self.mode,
            "version": self._store.version,
            "optimizer": self._store.optimizer.config.get_config(),
            "optimizer_state": optimizer_meta,
            "live_workers": sorted(self._live),
            "clocks": {str(k): c for k, c in self._clocks.items()},
            "last_step": {str(k): s for k, s in self._last_step.items()},
            "owners": {str(k): e for k, e in self._owners.items()},
            "pending": pending_meta,
            "incarnation": self._incarnation,
        }
        return self._snapshot_seq, CheckpointState(arrays, meta)

    def _write(self, seq: int, state: CheckpointState, raise_errors: bool) -> None:
        path = self.checkpoint_config.path
        with self._write_lock:
            if seq <= self._written_seq:
                return  # a newer snapshot is already on disk
            try:
                _keep_previous(path)
                save_checkpoint(path, state)
            except OSError:
                with self._cond:
                    self._checkpoint_errors += 1
                if raise_errors:
                    raise
                # Training goes on; the next due checkpoint tries again.
                log.exception("job %s shard %d: writing checkpoint %s failed", self.job, self.shard_id, path)
                return
            self._written_seq = seq
            with self._cond:
                self._checkpoints_written += 1
                self._checkpoint_version = state.meta["version"]
                self._checkpoint_versions = (self._checkpoint_versions + [int(state.meta["version"])])[-2:]
        log.debug("job %s shard %d: checkpoint at version %d -> %s", self.job, self.shard_id, state.meta["version"], path)

    def _restore(self, state: CheckpointState) -> None:
        """Continue from a checkpoint (constructor only, before any other thread sees us)."""
        meta, arrays, path = state.meta, state.arrays, self.checkpoint_config.path
        fix = f"point CheckpointConfig.path elsewhere or move {path} aside to start over"
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint {path} has format {meta.get('format')!r}; this shard reads {CHECKPOINT_FORMAT}")
        for key, want in (("job", self.job), ("shard_id", self.shard_id), ("mode", self.mode)):
            if meta[key] != want:
                raise ValueError(f"checkpoint {path} is for {key}={meta[key]!r}, not {want!r}; {fix}")
        params = self._store.params
        saved = {k[len("params/"):]: a for k, a in arrays.items() if k.startswith("params/")}
        if saved.keys() != params.keys():
            raise ValueError(
                f"checkpoint {path} holds variables {sorted(saved)} but this shard has {sorted(params)}; {fix}"
            )
        for name, a in saved.items():
            p = params[name]
            if a.shape != tuple(p.shape) or a.dtype != p.dtype:
                raise ValueError(
                    f"checkpoint {path}: variable '{name}' is {a.dtype}{list(a.shape)} there but "
                    f"{p.dtype}{list(p.shape)} here; {fix}"
                )
        optimizer = self._store.optimizer
        saved_config, config = meta["optimizer"], optimizer.config.get_config()
        if saved_config["name"] != config["name"]:
            raise ValueError(f"checkpoint {path} holds {saved_config['name']} state, not {config['name']}; {fix}")
        if saved_config != config:
            log.warning("job %s shard %d: optimizer config changed since the checkpoint: %s -> %s",
                        self.job, self.shard_id, saved_config, config)
        optimizer.load_state_dict({
            name: {"t": entry["t"], **{k: arrays[f"optimizer/{name}/{k}"] for k in entry["arrays"]}}
            for name, entry in meta["optimizer_state"].items()
        })
        for name, a in saved.items():
            self._backend.copy_into(params[name], a)
        self._store.version = self._snapshot_version = int(meta["version"])
        self._clocks = {int(k): int(c) for k, c in meta["clocks"].items()}
        self._last_step = {int(k): int(s) for k, s in meta["last_step"].items()}
        # Ownership only moves forward, even when the parameters go back (a rollback).
        for k, e in meta.get("owners", {}).items():
            self._owners[int(k)] = max(self._owners.get(int(k), 0), int(e))
        self._pending = {}
        for e in meta["pending"]:
            step, worker = int(e["step"]), int(e["worker"])
            prefix = f"pending/{step}/{worker}"
            self._pending.setdefault(step, {})[worker] = _Push(
                float(e["weight"]),
                {n: arrays[f"{prefix}/grads/{n}"] for n in e["grads"]},
                {n: arrays[f"{prefix}/assigns/{n}"] for n in e["assigns"]},
            )
        # Restore the saved membership, then move to the one we were given.
        workers = self._live
        self._live = set(meta["live_workers"])
        self._set_live(workers)
        self._complete_barriers()
        self._restored = True
        log.info("job %s shard %d: restored version %d from %s", self.job, self.shard_id, self._store.version, path)


def _previous(path) -> str:
    return f"{os.fspath(path)}.prev"


def _keep_previous(path) -> None:
    """Before a new checkpoint replaces ``path``, keep it as ``path.prev`` (a hard link
    renamed into place: at every moment both files are whole)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return
    tmp = f"{path}.prev.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.link(path, tmp)
    os.replace(tmp, _previous(path))


def _worker_set(workers: Iterable[int]) -> set[int]:
    out = set()
    for k in workers:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"worker index {k!r} is invalid; workers are integers >= 0")
        out.add(int(k))
    return out
