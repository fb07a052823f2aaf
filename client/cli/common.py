"""What every ``psctl`` command shares: exit codes, :class:`CommandError`, the master
connection from the global flags, job files with the command line's overrides, JSON
output and a job's final line.

Usage (inside a command)::

    def status_command(args) -> int:
        client = master_client(args)
        try:
            print_json(client.get(args.job))
        finally:
            client.close()
        return EXIT_OK
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from typing import Any, Iterator, Mapping, TextIO

from client.job import Job, load_job_file
from client.launchers import user_credentials
from client.progress import format_metrics
from pstrain.transport.master_client import MasterClient, master_address

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
SERVICE_MODULES = ("master.__main__", "psserver.__main__", "worker.__main__")
DEFAULT_CONNECT_TIMEOUT = 5.0


class CommandError(Exception):
    """A user-facing failure with its exit code (the message is printed as one line)."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def connect_timeout(args) -> float:
    """``--connect-timeout``, else ``$PSTRAIN_CONNECT_TIMEOUT``, else 5 seconds."""
    value = getattr(args, "connect_timeout", None)
    if value is None:
        raw = os.environ.get("PSTRAIN_CONNECT_TIMEOUT")
        try:
            value = float(raw) if raw else DEFAULT_CONNECT_TIMEOUT
        except ValueError:
            raise ValueError(f"PSTRAIN_CONNECT_TIMEOUT={raw!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise ValueError(f"--connect-timeout={value} is out of range; allowed (0, 3600] seconds")
    return value


def master_client(args, address: str | None = None) -> MasterClient:
    """A client of ``address``, else of the master the flags name (``--master``, else
    ``$PSTRAIN_MASTER``, else 127.0.0.1:50051)."""
    address = address or master_address(getattr(args, "master", None))
    return MasterClient(address, connect_timeout=connect_timeout(args),
                        credentials=user_credentials(address, getattr(args, "state_dir", None)))


def load_job(args) -> tuple[Job, str]:
    """The job file's job, with the command line's overrides applied (and validated)."""
    changes = {
        name: getattr(args, name)
        for name in ("epochs", "batch_size", "mode", "staleness", "num_workers", "num_shards")
        if getattr(args, name, None) is not None
    }
    job = load_job_file(args.jobfile, **changes)  # job() gets those it takes; Job validates the rest
    name = getattr(args, "name", None) or os.path.splitext(os.path.basename(args.jobfile))[0]
    return job, name


def print_json(obj: Any, stream: TextIO | None = None) -> None:
    print(json.dumps(obj, sort_keys=True, default=str), file=stream or sys.stdout, flush=True)


def job_result(status: Mapping[str, Any], as_json: bool) -> int:
    """Print a finished job's final line (or JSON); the exit code says whether it SUCCEEDED."""
    if as_json:
        print_json(status)
    else:
        line = f"{status['id']} {status['state']}"
        if status.get("loss") is not None or status.get("metrics"):
            line += " - " + format_metrics({**({"loss": status["loss"]} if status.get("loss") is not None else {}),
                                            **dict(sorted(status.get("metrics", {}).items()))})
        print(line, flush=True)
    if status["state"] != "SUCCEEDED":
        why = f": {status['error']}" if status.get("error") else ""
        print(f"psctl: error: job {status['id']} {status['state']}{why}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so ``finally`` blocks stop the cluster."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def services_installed() -> bool:
    """Whether this checkout has the master, psserver and worker entry points."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in SERVICE_MODULES)
    except ImportError:
        return False
