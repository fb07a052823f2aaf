"""Consistency policies: what each mode (sync, async, ssp) lets a shard do, as pure objects.

A ``Shard`` holds the state (versions, clocks, buffered pushes, locks) and asks its
policy the questions that differ between modes; the policy answers from plain
values only (ints and sets of worker indices), never touching arrays, locks or the
network, so every rule is testable on its own.

- ``SyncPolicy``: pushes for step t wait at a barrier until every live worker has
  pushed step t, then their weighted average is applied once; a pull waits for
  ``version >= min_version``; pushes must come in step order.
- ``AsyncPolicy``: each push is applied on arrival, its gradient scaled by its
  weight; pulls never wait.
- ``SspPolicy(staleness)``: applied as in async, but a pull for step t waits until
  the slowest live worker has pushed step t - staleness - 1 (its clock, the number
  of steps it has pushed, is at least t - staleness).

Usage::

    policy = policy_for("ssp", staleness=2)            # SspPolicy(staleness=2)
    policy.buffers_pushes                              # False: applied on arrival
    policy.pull_ready(step=5, min_version=0, version=9, live={0, 1}, clocks={0: 5, 1: 3})   # True
    policy_for(Mode.SYNC).barrier_complete(arrived={0, 1}, live={0, 1, 2})               # False
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import ClassVar

from pstrain.runtime.modes import Mode


@dataclass(frozen=True)
class Refusal:
    """Why a new push may not be taken: ``reason`` is ``PushRefused.reason``
    (stale_step, out_of_order); ``message`` says what was wrong and how to fix it."""

    reason: str
    message: str


def slowest(live: Set[int], clocks: Mapping[int, int]) -> tuple[int | None, float]:
    """(worker, clock) of the slowest live worker, ties to the lowest index;
    (None, inf) when no worker is live (then nobody holds anyone back).

    Usage::

        slowest({0, 1, 2}, {0: 4, 1: 2, 2: 2})   # (1, 2)
    """
    if not live:
        return None, math.inf
    worker = min(live, key=lambda k: (clocks[k], k))
    return worker, clocks[worker]


class ConsistencyPolicy(ABC):
    """The rules of one consistency mode; see the module docstring. Subclasses are
    frozen dataclasses, so two policies with the same settings compare equal."""

    mode: ClassVar[Mode]
    buffers_pushes: ClassVar[bool] = False
    """True: a push waits at its step's barrier (see ``barrier_complete``); False: it is
    applied on arrival, its gradient multiplied by ``gradient_scale(weight)``."""

    @property
    def staleness(self) -> int:
        """How many steps a worker may run ahead of the slowest (SSP only; 0 otherwise)."""
        return 0

    def check_step(self, step: int, version: int, last_step: int | None) -> Refusal | None:
        """Whether a new (not retried) push for ``step`` may be taken from a worker whose
        highest received step is ``last_step`` (None: none yet), at shard ``version``.
        None: it may."""
        return None

    def barrier_complete(self, arrived: Set[int], live: Set[int]) -> bool:
        """Whether the barrier of a step at which ``arrived`` workers have pushed is
        complete, given the ``live`` workers. Never true for a policy that does not
        buffer pushes."""
        return False

    def gradient_scale(self, weight: float) -> float:
        """The factor a push's gradient counts with: its weight, its share of the global
        batch, so K workers each pushing 1/K of a batch move the parameters as one full
        batch would. Applied on arrival it multiplies the gradient (0: nothing is applied);
        at a barrier it weights the average."""
        return weight

    def received_after_removal(self, last_step: int, version: int) -> int:
        """A removed worker's highest step that still counts as received (for retries)
        once its buffered pushes are dropped, at shard ``version``."""
        return last_step

    @abstractmethod
    def pull_ready(self, step: int, min_version: int, version: int, live: Set[int], clocks: Mapping[int, int]) -> bool:
        """Whether a pull for ``step`` asking for ``min_version`` may be answered now, at
        shard ``version``, with ``clocks`` (worker -> steps pushed) of the ``live`` workers."""

    @abstractmethod
    def wait_reason(
        self, step: int, min_version: int, version: int, live: Set[int], clocks: Mapping[int, int], arrived: Set[int]
    ) -> str:
        """What a pull that is not ready waits for, in words (``arrived``: the workers that
        pushed the step at ``version``), for timeout errors."""


@dataclass(frozen=True)
class SyncPolicy(ConsistencyPolicy):
    """Bulk-synchronous: one weighted average per step over every live worker's push."""

    mode: ClassVar[Mode] = Mode.SYNC
    buffers_pushes: ClassVar[bool] = True

    def check_step(self, step: int, version: int, last_step: int | None) -> Refusal | None:
        if step < version:
            return Refusal(
                "stale_step",
                f"step {step} was already completed without it (version is {version}); "
                f"pull version {version} and push step {version}",
            )
        if step > version and last_step != step - 1:
            return Refusal(
                "out_of_order", f"step {step - 1} has not arrived from this worker; sync pushes come in step order"
            )
        return None

    def barrier_complete(self, arrived: Set[int], live: Set[int]) -> bool:
        # Pushes from workers removed since they arrived do not hold the barrier open.
        return bool(live) and live <= arrived

    def received_after_removal(self, last_step: int, version: int) -> int:
        # Its buffered steps were dropped, so only applied ones still count as received.
        return min(last_step, version - 1)

    def pull_ready(self, step: int, min_version: int, version: int, live: Set[int], clocks: Mapping[int, int]) -> bool:
        return version >= min_version

    def wait_reason(
        self, step: int, min_version: int, version: int, live: Set[int], clocks: Mapping[int, int], arrived: Set[int]
    ) -> str:
        return (
            f"waiting for version >= {min_version} (now {version}); "
            f"the barrier for step {version} still waits for worker(s) {sorted(live - arrived)}"
        )


@dataclass(frozen=True)
class AsyncPolicy(ConsistencyPolicy):
    """Fully asynchronous: every push applied on arrival; pulls never wait."""

    mode: ClassVar[Mode] = Mode.ASYNC

    def pull_ready(self, step: int, min_version: int, version: int, live: Set[int], clocks: Mapping[int, int]) -> bool:
        return True

    def wait_reason(
        self, step: int, min_version: int, version: int, live: Set[int], clocks: Mapping[int, int], arrived: Set[int]
    ) -> str:
        return "waiting for nothing (async pulls never wait); the shard was busy for the whole timeout"


@dataclass(frozen=True)
class SspPolicy(AsyncPolicy):
    """Stale synchronous parallel: async, but no worker runs more than ``staleness``
    steps ahead of the slowest live worker."""

    mode: ClassVar[Mode] = Mode.SSP
    staleness: int = 0  # overrides the base property: here it is a setting

    def __post_init__(self):
        _check_staleness(self.staleness, "SspPolicy.staleness")

    def pull_ready(self, step: int, min_version: int, version: int, live: Set[int], clocks: Mapping[int, int]) -> bool:
        return slowest(live, clocks)[1] >= step - self.staleness

    def wait_reason(
        self, step: int, min_version: int, version: int, live: Set[int], clocks: Mapping[int, int], arrived: Set[int]
    ) -> str:
        slow, clock = slowest(live, clocks)
        return (
            f"waiting for the slowest worker to reach clock {step - self.staleness} "
            f"(staleness {self.staleness}); slowest is worker {slow} at clock {clock}"
        )


_POLICIES: dict[Mode, type[ConsistencyPolicy]] = {Mode.SYNC: SyncPolicy, Mode.ASYNC: AsyncPolicy, Mode.SSP: SspPolicy}


def policy_for(mode: Mode | str, staleness: int = 0) -> ConsistencyPolicy:
    """The policy for ``mode`` ("sync", "async", "ssp" or a ``Mode``). ``staleness`` is
    validated whatever the mode (a job may carry one) but only SSP uses it.

    Usage::

        policy_for("sync")              # SyncPolicy()
        policy_for(Mode.SSP, 3)         # SspPolicy(staleness=3)
    """
    mode = Mode.parse(mode)
    _check_staleness(staleness, "staleness")
    return SspPolicy(staleness) if mode is Mode.SSP else _POLICIES[mode]()


def _check_staleness(staleness: int, field: str) -> None:
    if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
        raise ValueError(f"{field}={staleness!r} is out of range; allowed integers [0, inf)")
