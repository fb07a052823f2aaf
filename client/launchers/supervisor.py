"""Supervision: restart a cluster's processes when they die, a bounded number of times
with backoff, through the launcher that started them (``Launcher.restart``).

A restarted master resumes its running jobs from its database once their nodes
register again; a restarted shard or worker registers again and serves new work.
``psctl up`` (in the foreground) and ``psctl train`` supervise their cluster in
process; ``psctl up --detach`` starts ``python -m client.launchers.supervisor`` beside
it, which ``psctl down`` stops first.

Usage::

    sup = Supervisor(launcher, handle, RestartPolicy(max_restarts=5))
    for line in sup.poll():          # call every second or so
        print(line)
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from client.launchers.base import ClusterError, ClusterHandle, Launcher, describe_exit, load_handle, open_log, write_handle
from client.launchers.local import process_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """At most ``max_restarts`` restarts of one process within ``window`` seconds; the
    n-th restart in a row waits ``backoff * 2**(n-1)`` seconds, at most ``max_backoff``."""

    max_restarts: int = 5
    window: float = 300.0
    backoff: float = 0.5
    max_backoff: float = 10.0

    def __post_init__(self):
        if self.max_restarts < 0:
            raise ValueError(f"RestartPolicy.max_restarts={self.max_restarts!r} must be >= 0")
        for name in ("window", "backoff", "max_backoff"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RestartPolicy.{name}={getattr(self, name)!r} must be >= 0")

    def delay(self, restarts: Sequence[float], now: float) -> float | None:
        """Seconds to wait before restarting a process that has been restarted at times
        ``restarts`` (monotonic), or None: too many within the window, give up."""
        recent = [t for t in restarts if now - t < self.window]
        if len(recent) >= self.max_restarts:
            return None
        return min(self.backoff * 2 ** (len(recent) - 1), self.max_backoff) if recent else 0.0


@dataclass
class _Pending:
    due: float  # when to restart it
    pid: int  # the pid that died


@dataclass
class Supervisor:
    """Watches ``handle``'s processes and restarts the dead ones per ``policy``. ``poll``
    is one round; it raises ClusterError once the master is dead for good."""

    launcher: Launcher
    handle: ClusterHandle
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    _history: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    _pending: dict[tuple[str, int], _Pending] = field(default_factory=dict)
    _given_up: set[tuple[str, int]] = field(default_factory=set)

    def poll(self) -> list[str]:
        """Restart what is due; returns what happened, one line each."""
        lines, now = [], self.clock()
        for p in self.launcher.status(self.handle):
            key = (p.role, p.index)
            if p.alive or key in self._given_up:
                continue
            if key not in self._pending:
                why = describe_exit(p.role, p.index, p.pid, self.launcher.exit_code(p.pid), p.log, lines=5)
                delay = self.policy.delay(self._history.get(key, []), now)
                if delay is None:
                    self._given_up.add(key)
                    lines.append(f"{why}; not restarting it: {self.policy.max_restarts} restarts within "
                                 f"{self.policy.window:.0f}s")
                    if p.role == "master":
                        raise ClusterError("\n".join(lines + ["the master is down for good; stop the cluster"]))
                    continue
                self._pending[key] = _Pending(now + delay, p.pid)
                lines.append(f"{why}; restarting it" + (f" in {delay:.1f}s" if delay else ""))
            pending = self._pending[key]
            if now < pending.due:
                continue
            del self._pending[key]
            try:
                pid = self.launcher.restart(self.handle, p.role, p.index)
            except (ClusterError, OSError) as exc:
                self._given_up.add(key)
                lines.append(f"could not restart {p.role}-{p.index}: {exc}")
                if p.role == "master":
                    raise ClusterError("\n".join(lines)) from None
                continue
            self._history.setdefault(key, []).append(now)
            lines.append(f"restarted {p.role}-{p.index} (pid {pending.pid} -> {pid})")
        for line in lines:
            log.warning("%s", line)
        return lines

    def run(self, stop: threading.Event, interval: float = 0.5, echo: Callable[[str], None] | None = None) -> None:
        """``poll`` every ``interval`` seconds until ``stop`` is set (or the master is gone for good)."""
        while not stop.wait(interval):
            for line in self.poll():
                if echo is not None:
                    echo(line)


def start_supervisor(handle: ClusterHandle) -> int:
    """Start ``python -m client.launchers.supervisor`` for a detached cluster; its pid goes
    into the state file so that ``psctl down`` stops it first."""
    os.makedirs(os.path.join(handle.state_dir, "logs"), mode=0o700, exist_ok=True)
    log_path = os.path.join(handle.state_dir, "logs", "supervisor.log")
    with open_log(log_path) as out:
        proc = subprocess.Popen([sys.executable, "-m", "client.launchers.supervisor", "--state-dir", handle.state_dir],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=process_env(),
                                start_new_session=True)
    handle.supervisor_pid = proc.pid
    write_handle(handle)
    return proc.pid


# ---- the detached supervisor process -----------------------------------------------------------
def main(argv=None) -> int:
    """``python -m client.launchers.supervisor --state-dir DIR``: supervise the cluster whose
    state file is in DIR until it is stopped (SIGTERM, or the state file goes away)."""
    p = argparse.ArgumentParser(prog="python -m client.launchers.supervisor", description=main.__doc__.splitlines()[0])
    p.add_argument("--state-dir", required=True)
    p.add_argument("--interval", type=float, default=0.5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from client.launchers import get_launcher

    handle = load_handle(args.state_dir)
    if handle is None:
        print(f"supervisor: no cluster state in {args.state_dir}", file=sys.stderr)
        return 2
    supervisor = Supervisor(get_launcher(handle.launcher), handle)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    state_file = os.path.join(handle.state_dir, "cluster.json")
    print(f"PSTRAIN_READY supervisor {os.getpid()}", flush=True)
    while not stop.wait(args.interval):
        if not os.path.exists(state_file):  # psctl down removed it
            break
        try:
            supervisor.poll()
        except ClusterError as exc:
            log.error("%s", exc)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
