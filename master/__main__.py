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
    p.add_argument("--metrics-host", dest="metrics_host",
                   help="interface /metrics listens on (default 127.0.0.1; 0.0.0.0 for a Prometheus elsewhere)")
    p.add_argument("--tokens-file", dest="tokens_file",
                   help="users' tokens (psctl token create; default: tokens.json beside the database)")
    # Limits on what one job may ask for (master/limits.py; defaults and why in master/config.py).
    p.add_argument("--max-graph-nodes", dest="max_graph_nodes", type=int,
                   help="most nodes in a job's graph (default 200000)")
    p.add_argument("--max-graph-depth", dest="max_graph_depth", type=int,
                   help="longest path through a job's graph, in nodes (default 20000)")
    p.add_argument("--max-variable-bytes", dest="max_variable_bytes", type=int,
                   help="most bytes of a job's variables' initial values, all together (default 2 GiB)")
    p.add_argument("--max-request-bytes", dest="max_request_bytes", type=int,
                   help="largest SubmitJob / GetPlan request (default 0: the gRPC message limit, never above it)")
    p.add_argument("--max-epochs", dest="max_epochs", type=int, help="most epochs of a job (default 1000000)")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int,
                   help="largest global batch of a job (default 10000000)")
    p.add_argument("--max-job-workers", dest="max_job_workers", type=int,
                   help="most workers a job may ask for (default 1024)")
    p.add_argument("--max-job-shards", dest="max_job_shards", type=int,
                   help="most shards a job may ask for (default 256)")
    p.add_argument("--pending-timeout", dest="pending_timeout", type=float,
                   help="seconds a job waits for the workers / shards it asked for to register, then fails "
                        "(default 600; 0: for ever)")
    p.add_argument("--data-root", dest="data_root",
                   help="dataset paths must lie inside this directory of the workers (default: any path)")
    add_security_flags(p)
    try:
        config = from_sources(MasterConfig, parse_service_args(p, argv, "master"))
        server, port, coordinator = serve(config)
    except ValueError as exc:  # a bad flag, missing credentials, plaintext on a reachable address
        raise ServiceStartError(f"master: error: {exc}") from None
    metrics_address = ""
    if config.metrics_port >= 0:
        try:
            metrics_address = coordinator.metrics.serve(config.metrics_host, config.metrics_port)
        except OSError as exc:
            server.stop(grace=None)
            coordinator.close()
            raise ServiceStartError(metrics_port_error("master", config.metrics_host, config.metrics_port, exc)) from None

    def stop() -> None:
        server.stop(grace=2).wait()
        coordinator.close()

    return Service("master", f"{config.host}:{port}", metrics_address, stop)


def main(argv=None) -> int:
    return run_service(start, argv)


if __name__ == "__main__":
    sys.exit(main())
