"""The consistency modes a job's shards can run in, as one enum every layer shares.

``Mode`` is a ``str`` enum, so ``Mode.SYNC == "sync"`` and it goes into JSON,
protobuf string fields and checkpoints as the plain string. The rules each mode
stands for live in ``psserver.consistency`` (one policy object per mode).

Usage::

    mode = Mode.parse("ssp")          # Mode.SSP; raises ValueError naming the bad value
    if mode is Mode.SYNC: ...
    str(mode)                         # "ssp"
"""
from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """How parameter-server shards apply the workers' gradients.

    - ``SYNC``: one gradient per live worker per step, averaged, applied once;
    - ``ASYNC``: each gradient applied as it arrives;
    - ``SSP``: async, but no worker runs more than ``staleness`` steps ahead of the slowest.
    """

    SYNC = "sync"
    ASYNC = "async"
    SSP = "ssp"

    # A str-mixin Enum prints as "Mode.SYNC" by default (and its format() differs between
    # Python versions); users and files should only ever see the plain value.
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: Mode | str, field: str = "mode") -> Mode:
        """``value`` as a ``Mode``; ``field`` names it in the error.

        Usage::

            Mode.parse("async")                        # Mode.ASYNC
            Mode.parse("bsp", field="Job.mode")        # ValueError: Job.mode='bsp' is not ...
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"{field}={value!r} is not a consistency mode; use one of {[m.value for m in cls]}"
            ) from None


MODES: tuple[str, ...] = tuple(m.value for m in Mode)
"""The mode names, in the order CLIs and error messages list them."""
