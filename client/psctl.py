"""The ``psctl`` console script (``python -m client.cli`` is the same without this).

gRPC's own INFO lines ("Handshake failed ...") would come before psctl's one-line error,
which already names the cause. gRPC reads its verbosity once, when it is imported, so it
is set for that moment only: this process is quiet, and the services psctl starts keep
their logs as they are. A ``GRPC_VERBOSITY`` the user set is left alone.
"""
from __future__ import annotations

import os


def main() -> int:
    quiet = "GRPC_VERBOSITY" not in os.environ
    if quiet:
        os.environ["GRPC_VERBOSITY"] = "ERROR"
    try:
        from client.cli import main as run
    finally:
        if quiet:
            os.environ.pop("GRPC_VERBOSITY", None)
    return run()
