"""``python -m master``: run the pstrain master.

Flags override PSTRAIN_* environment variables, which override defaults (see
master/config.py). Prints ``PSTRAIN_METRICS master HOST:PORT`` (where /metrics is served,
unless ``--metrics-port -1``), then ``PSTRAIN_READY master HOST:PORT`` once serving.
``start(argv)`` starts the same master in this process and returns (a Ray actor hosts it so).
"""
from __future__ import annotations

import argparse
import sys

from master.config import MasterConfig
from master.service import serve
from protos.settings import (
    Service,
    ServiceStartError,
    add_security_flags,
    from_sources,
    metrics_port_error,
    parse_service_args,
    run_service,
)


def start(argv=None) -> Service:
    """Start a master in this process from its command-line flags; raises ServiceStartError."""
    p = argparse.ArgumentParser(prog="python -m master", description=__doc__.splitlines()[0])
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--db")
    p.add_argument("--export-dir", dest="export_dir")
    p.add_argument("--heartbeat-timeout", dest="heartbeat_timeout", type=float)
    p.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=float)
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="versions between the shards' checkpoints (default 100; 0: only at the end)")
    p.add_argument("--checkpoint-seconds", dest="checkpoint_seconds", type=float,
                   help="and at least this often while a job trains (default 30; 0: versions only)")
    p.add_argument("--recovery-timeout", dest="recovery_timeout", type=float,
                   help="seconds a job waits for a restarted shard, or after a master restart for its nodes (default 30)")
    p.add_argument("--max-watchers", dest="max_watchers", type=int,
                   help="most WatchJob streams open at once (default: half of the RPC threads)")
    p.add_argument("--metrics-port", dest="metrics_port", type=int,
                   help="port of /metrics (0 picks a free one, -1 serves none; default 9464)")
    p.add_argument("--tokens-file", dest="tokens_file",
                   help="users' tokens (psctl token create; default: tokens.json beside the database)")
    add_security_flags(p)
    try:
        config = from_sources(MasterConfig, parse_service_args(p, argv, "master"))
        server, port, coordinator = serve(config)
    except ValueError as exc:  # a bad flag, missing credentials, plaintext on a reachable address
        raise ServiceStartError(f"master: error: {exc}") from None
    metrics_address = ""
    if config.metrics_port >= 0:
        try:
            metrics_address = f"{config.host}:{coordinator.metrics.serve(config.host, config.metrics_port).rsplit(':', 1)[1]}"
        except OSError as exc:
            server.stop(grace=None)
            coordinator.close()
            raise ServiceStartError(metrics_port_error("master", config.host, config.metrics_port, exc)) from None

    def stop() -> None:
        server.stop(grace=2).wait()
        coordinator.close()

    return Service("master", f"{config.host}:{port}", metrics_address, stop)


def main(argv=None) -> int:
    return run_service(start, argv)


if __name__ == "__main__":
    sys.exit(main())
