"""``psctl up`` and ``psctl down``: a cluster that outlives one job.

``up`` starts the services with the launcher named by ``--launcher`` (default
``local``) and either stays in the foreground, supervising them until Ctrl-C, or
returns (``--detach``); ``down`` reads the state file and stops the cluster with the
launcher that started it. Usage::

    psctl up --workers 2 --ps 2 --detach --state-dir /tmp/c
    psctl down --state-dir /tmp/c
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from client.cli.common import EXIT_OK, sigterm_interrupts
from client.launchers import (
    ClusterHandle,
    ClusterSpec,
    Launcher,
    default_state_dir,
    get_launcher,
    launcher_class,
    load_handle,
)
from client.launchers.supervisor import RestartPolicy, Supervisor, start_supervisor


def launcher_from_args(args: argparse.Namespace) -> Launcher:
    """The launcher ``--launcher`` names, built from its flags (``--start-timeout`` and its own)."""
    cls = launcher_class(args.launcher)
    return cls(**cls.options_from_args(args))


def up_command(args) -> int:
    spec = ClusterSpec(workers=args.workers, ps=args.ps, port=args.port, device=args.device,
                       state_dir=args.state_dir or "", heartbeat_timeout=args.heartbeat_timeout,
                       tls_dir=args.tls_dir or os.environ.get("PSTRAIN_TLS_DIR", ""), insecure=args.insecure)
    launcher = launcher_from_args(args)
    with sigterm_interrupts():
        handle = launcher.start(spec)
        print(f"pstrain cluster up: master at {handle.master_address} ({spec.ps} ps shards, "
              f"{spec.workers} workers, device {spec.device}); state and logs in {spec.state_dir}", flush=True)
        if args.detach:
            if launcher.restartable:
                start_supervisor(handle)
            down = "psctl down" + ("" if args.state_dir is None else f" --state-dir {spec.state_dir}")
            print(f"export PSTRAIN_MASTER={handle.master_address}   # for psctl submit/status/...; "
                  f"stop the cluster with: {down}", flush=True)
            return EXIT_OK
        print("press Ctrl-C to stop the cluster", flush=True)
        try:
            supervise(launcher, handle)
        except KeyboardInterrupt:
            print("stopping the cluster ...", file=sys.stderr, flush=True)
        finally:
            launcher.stop(handle)
    print("cluster stopped", flush=True)
    return EXIT_OK


def supervise(launcher: Launcher, handle: ClusterHandle, interval: float = 0.5) -> None:
    """Stay in the foreground, restarting services that die (``Supervisor``'s policy; a
    launcher that cannot restart only has them reported); raises ClusterError when the
    master is down for good."""
    supervisor = Supervisor(launcher, handle, RestartPolicy() if launcher.restartable else RestartPolicy(max_restarts=0))
    while True:
        time.sleep(interval)
        for line in supervisor.poll():
            print(f"psctl: warning: {line}", file=sys.stderr, flush=True)


def down_command(args) -> int:
    handle = load_handle(args.state_dir)
    state_dir = os.path.abspath(os.path.expanduser(args.state_dir or default_state_dir()))
    if handle is None:
        print(f"no cluster is running (no state file in {state_dir})", file=sys.stderr)
        return EXIT_OK
    get_launcher(handle.launcher).stop(handle, timeout=args.timeout)
    print(f"stopped the cluster at {handle.master_address}")
    return EXIT_OK
