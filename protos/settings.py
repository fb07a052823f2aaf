"""Service configuration: CLI flags over ``PSTRAIN_*`` environment variables over
defaults, into one frozen dataclass per service, validated on construction.

Usage::

    @dataclass(frozen=True)
    class PSConfig:
        port: int = 0
        ...
    cfg = from_sources(PSConfig, args, prefix="PSTRAIN_PS_")   # args: argparse.Namespace

Each field ``f`` reads the flag ``--f`` (argparse dest ``f``) when given, else the
variable ``PSTRAIN_<F>`` (or ``prefix + F``), else the dataclass default.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any


def _cast(field: dataclasses.Field, raw: str, env: str) -> Any:
    """Parse ``raw`` as the type of the field's default (str when the default is None)."""
    kind = type(field.default) if field.default is not None else str
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a valid {kind.__name__} for '{field.name}'") from None


def env_name(field: str, prefix: str = "PSTRAIN_") -> str:
    return prefix + field.upper()


def from_sources(cls, args: argparse.Namespace | None = None, prefix: str = "PSTRAIN_", environ=None):
    """Build ``cls`` from flags, then environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(cls):
        flag = getattr(args, f.name, None) if args is not None else None
        if flag is not None:
            values[f.name] = flag
            continue
        env = env_name(f.name, prefix)
        if env in environ:
            values[f.name] = _cast(f, environ[env], env)
    return cls(**values)


def env_variables(cls, prefix: str = "PSTRAIN_") -> list[str]:
    """Every environment variable ``cls`` reads (for checking deploy files)."""
    return [env_name(f.name, prefix) for f in dataclasses.fields(cls)]


def check_port(cls_name: str, field: str, value: int) -> None:
    if not 0 <= int(value) <= 65535:
        raise ValueError(f"{cls_name}.{field}={value!r} is out of range; allowed [0, 65535] (0 picks a free port)")


def check_positive(cls_name: str, field: str, value: float) -> None:
    if not float(value) > 0:
        raise ValueError(f"{cls_name}.{field}={value!r} must be > 0")


# ---- entry points (python -m master | psserver | worker) ---------------------------------
def parse_service_args(parser: argparse.ArgumentParser, argv, role: str) -> argparse.Namespace:
    """Parse a service's command line (adding --log-level) and configure logging for ``role``."""
    import logging

    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s")
    return args


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """--tls-dir and --insecure, shared by every service (the node token comes from the
    environment only: a flag would show it to every user of ps)."""
    parser.add_argument("--tls-dir", dest="tls_dir",
                        help="mutual TLS: ca.crt and this role's certificate and key (psctl certs init; "
                             "else $PSTRAIN_TLS_DIR; default: plaintext, loopback only)")
    parser.add_argument("--insecure", action="store_const", const=True, default=None,
                        help="serve plaintext on an address other machines can reach (only on a network you trust)")


def stop_event(on_stop=None):
    """An Event set by SIGTERM or SIGINT (after calling ``on_stop``, if given)."""
    import signal
    import threading

    stop = threading.Event()

    def handler(*_):
        if on_stop is not None:
            on_stop()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def metrics_port_error(role: str, host: str, port: int, exc: OSError) -> str:
    return (f"{role}: error: cannot serve /metrics on {host}:{port} ({exc}); choose another --metrics-port / "
            "PSTRAIN_METRICS_PORT (0 picks a free one, -1 none)")


# ---- a service started in this process ------------------------------------------------------
class ServiceStartError(RuntimeError):
    """A service could not start; the message (``<role>: error: ...``) is for the user."""


class Service:
    """A master, shard or worker started in this process by its package's ``start(argv)``
    (``python -m <role>`` runs one until SIGTERM; a Ray actor hosts one in its own
    process). ``address``: where it serves gRPC (a worker: its node id);
    ``metrics_address``: where it serves /metrics ("" for none)."""

    def __init__(self, role: str, address: str, metrics_address: str, stop, interrupt=None):
        self.role, self.address, self.metrics_address = role, address, metrics_address
        self._stop, self._interrupt = stop, interrupt
        self._stopped = False

    def announce(self) -> None:
        """Print the lines launchers wait for: ``PSTRAIN_METRICS`` then ``PSTRAIN_READY``."""
        if self.metrics_address:
            print(f"PSTRAIN_METRICS {self.role} {self.metrics_address}", flush=True)
        print(f"PSTRAIN_READY {self.role} {self.address}", flush=True)

    def interrupt(self) -> None:
        """Ask running work to wind down now (a worker's tasks); :meth:`stop` follows."""
        if self._interrupt is not None:
            self._interrupt()

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if not self._stopped:
            self._stopped = True
            self.interrupt()
            self._stop()


def run_service(start, argv) -> int:
    """The body of ``python -m <role>``: ``start(argv)``, announce, serve until SIGTERM or
    SIGINT, stop. Returns the exit status (2: the service could not start)."""
    import sys

    try:
        service = start(argv)
    except ServiceStartError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    stop = stop_event(on_stop=service.interrupt)
    service.announce()
    stop.wait()
    service.stop()
    return 0
