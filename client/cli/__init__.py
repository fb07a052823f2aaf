"""``psctl``: the pstrain command line.

Usage::

    psctl up --workers 2 --ps 2 [--port 50051] [--device cpu] [--launcher local] [--detach] [--state-dir DIR]
    psctl down [--state-dir DIR]
    psctl submit examples/mnist_mlp.py [--mode sync|async|ssp] [--staleness S] [--epochs N]
                 [--batch-size B] [--workers N] [--shards S] [--name NAME] [--wait] [--json]
    psctl status JOB [--json]        psctl list [--json]       psctl logs JOB [-f]
    psctl cancel JOB [--json]        psctl export JOB -o model.npz
    psctl scale JOB --workers N [--json]   (worker processes serving a running job)
    psctl nodes [--json]             (shards and workers: alive, last heartbeat, restarts)
    psctl train examples/mnist_mlp.py [--workers 2 --ps 2] [--launcher local] [--mode ...] [-o model.npz]
                [--plot curves.png] [--json]
    psctl plot JOB -o curves.png     (loss and accuracy curves from the job's history)
    psctl plan examples/mnist_mlp.py [--workers N --ps S] [--png plan.png] [--dot plan.dot] [--json]

Global options (before or after the command): ``--master HOST:PORT`` (else
``$PSTRAIN_MASTER``, else ``127.0.0.1:50051``), ``--connect-timeout SECONDS`` (else
``$PSTRAIN_CONNECT_TIMEOUT``, else 5) and ``-v`` (debug logging).

Exit codes: 0 success; 1 the job did not succeed, or the cluster failed; 2 bad input (job
file, flags, values); 3 no master answers; 130 interrupted. Errors are one line on stderr,
``psctl: error: ...``.

One module per command group: :mod:`~client.cli.parser` (flags), :mod:`~client.cli.cluster`
(up, down), :mod:`~client.cli.jobs` (submit, status, list, logs, cancel, scale, nodes, export, plot),
:mod:`~client.cli.train`, :mod:`~client.cli.plan`; this module maps errors to exit codes.
"""
from __future__ import annotations

import logging
import os
import sys

import grpc

from client.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CommandError,
)
from client.cli.parser import build_parser
from client.launchers import ClusterError
from pstrain.transport.master_client import MasterUnavailable, describe_error

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


def _error(message: str) -> None:
    print(f"psctl: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run ``psctl`` with ``argv`` (default: the command line); returns the exit code.

    >>> main(["list", "--json"])  # doctest: +SKIP
    0
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("psctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CommandError as exc:
        _error(str(exc))
        return exc.code
    except MasterUnavailable as exc:
        _error(str(exc))
        return EXIT_UNAVAILABLE
    except grpc.RpcError as exc:
        _error(describe_error(exc))
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return EXIT_UNAVAILABLE if code == grpc.StatusCode.UNAVAILABLE else EXIT_FAILED
    except ClusterError as exc:
        _error(str(exc))
        return EXIT_FAILED
    except (FileNotFoundError, ValueError, TypeError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:  # `psctl list --json | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        _error(str(exc))
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - one line for users; -v shows the traceback
        log.debug("unexpected error", exc_info=True)
        _error(f"{type(exc).__name__}: {exc}" + ("" if args.verbose else " (run with -v for the traceback)"))
        return EXIT_FAILED

