"""Launching a pstrain cluster (one master, S parameter-server shards, N workers).

One interface (:class:`Launcher`, in :mod:`client.launchers.base`), one backend per
module, chosen by name from a registry: ``local`` (:class:`LocalProcessLauncher`, every
service a process of this machine) is the default. ``psctl up|train --launcher NAME``
takes any registered name, and the state file remembers it for ``psctl down``; a new
backend is one module whose class is registered here, with no change to the CLI.

Usage::

    from client.launchers import ClusterSpec, get_launcher, local_cluster

    with local_cluster(ClusterSpec(workers=2, ps=2, port=0, state_dir="/tmp/c")) as handle:
        MasterClient(handle.master_address).submit(spec)

    launcher = get_launcher("local", start_timeout=60)   # what `psctl up` does
    handle = launcher.start(ClusterSpec())

    @register_launcher                                     # a backend of your own
    class MyLauncher(Launcher):
        name = "mine"
        ...
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator, TypeVar

from client.launchers.base import (
    DEFAULT_LAUNCHER,
    DEVICES,
    MAX_PROCESSES,
    ROLES,
    STATE_FILE,
    STOP_ORDER,
    ClusterError,
    ClusterHandle,
    ClusterSpec,
    Launcher,
    ProcessStatus,
    default_state_dir,
    describe_exit,
    load_handle,
    remove_handle,
    scale_job,
    tail,
    user_credentials,
    write_handle,
    write_scrape_targets,
)
from client.launchers.local import (
    READY_PREFIX,
    LocalProcessLauncher,
    connectable,
    parse_metrics_line,
    parse_ready_line,
    pid_alive,
    thread_env,
)
from client.launchers.ray_cluster import RayLauncher

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LAUNCHER", "DEVICES", "LAUNCHERS", "MAX_PROCESSES", "READY_PREFIX", "ROLES", "STATE_FILE", "STOP_ORDER",
    "ClusterError", "ClusterHandle", "ClusterSpec", "Launcher", "LocalProcessLauncher", "ProcessStatus", "RayLauncher",
    "connectable", "default_state_dir", "describe_exit", "get_launcher", "launcher_class", "load_handle",
    "local_cluster", "parse_metrics_line", "parse_ready_line", "pid_alive", "register_launcher", "remove_handle",
    "scale_job", "tail", "thread_env", "user_credentials", "write_handle", "write_scrape_targets",
]

LAUNCHERS: dict[str, type[Launcher]] = {}  # name -> backend; fill it with register_launcher

L = TypeVar("L", bound=type[Launcher])


def register_launcher(cls: L) -> L:
    """Make the backend ``cls`` available as ``--launcher <cls.name>``; returns ``cls``,
    so it also serves as a class decorator.

    >>> @register_launcher                     # doctest: +SKIP
    ... class RayLauncher(Launcher):
    ...     name = "ray"
    """
    if not (isinstance(cls, type) and issubclass(cls, Launcher)):
        raise TypeError(f"register_launcher takes a subclass of client.launchers.Launcher, not {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"{cls.__qualname__}.name={name!r} must be a non-empty name without spaces, "
                         "e.g. name = \"ray\"; it is what --launcher takes")
    current = LAUNCHERS.get(name)
    if current is not None and current is not cls:
        raise ValueError(f"a launcher named {name!r} is already registered ({current.__module__}.{current.__qualname__}); "
                         f"give {cls.__qualname__} another name")
    LAUNCHERS[name] = cls
    return cls


def launcher_class(name: str) -> type[Launcher]:
    """The backend registered as ``name``; a ValueError listing the known names if none is."""
    try:
        return LAUNCHERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown launcher {name!r}; known launchers: {', '.join(sorted(LAUNCHERS))}") from None


def get_launcher(name: str = DEFAULT_LAUNCHER, **options: Any) -> Launcher:
    """A new launcher of the backend registered as ``name``, built with ``options``
    (every backend takes ``start_timeout``).

    >>> get_launcher("local", start_timeout=60)  # doctest: +SKIP
    """
    return launcher_class(name)(**options)


@contextlib.contextmanager
def local_cluster(spec: ClusterSpec, launcher: Launcher | None = None, stop_timeout: float = 10.0,
                  supervise: bool = True) -> Iterator[ClusterHandle]:
    """Start a cluster for the ``with`` block and always stop it afterwards (with
    ``launcher``, else the default, local one). ``supervise``: restart services that die
    meanwhile (``Supervisor``, in a thread)."""
    from client.launchers.supervisor import Supervisor

    launcher = launcher or get_launcher(DEFAULT_LAUNCHER)
    handle = launcher.start(spec)
    stop = threading.Event()
    watcher = None
    if supervise and launcher.restartable:
        watcher = threading.Thread(target=_supervise_quietly, args=(Supervisor(launcher, handle), stop),
                                   name="pstrain-supervisor", daemon=True)
        watcher.start()
    try:
        yield handle
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(5)
        launcher.stop(handle, timeout=stop_timeout)


def _supervise_quietly(supervisor, stop: threading.Event) -> None:
    try:
        supervisor.run(stop)
    except ClusterError as exc:  # the master is down for good: the job's client will say so
        log.error("%s", exc)


register_launcher(LocalProcessLauncher)
register_launcher(RayLauncher)  # imports Ray only when used
