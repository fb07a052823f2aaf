"""``python -m psserver``: run a parameter-server process and register it with the master.

Prints ``PSTRAIN_METRICS ps HOST:PORT`` (where /metrics is served, unless
``--metrics-port -1``) and then ``PSTRAIN_READY ps HOST:PORT`` once serving.
``start(argv)`` starts the same shard in this process and returns (a Ray actor hosts it so).
"""
from __future__ import annotations

import argparse
import sys

from protos.settings import (
    Service,
    ServiceStartError,
    add_security_flags,
    from_sources,
    metrics_port_error,
    parse_service_args,
    run_service,
)
from psserver.config import PSConfig
from psserver.service import serve
from pstrain.transport.security import is_loopback, service_credentials


def start(argv=None) -> Service:
    """Start a shard in this process from its command-line flags and register it with its
    master (if one is given); raises ServiceStartError."""
    p = argparse.ArgumentParser(prog="python -m psserver", description=__doc__.splitlines()[0])
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--advertise-host", dest="advertise_host")
    p.add_argument("--master")
    p.add_argument("--checkpoint-dir", dest="checkpoint_dir")
    p.add_argument("--metrics-port", dest="metrics_port", type=int,
                   help="port of /metrics (0 picks a free one, -1 serves none; default 0)")
    p.add_argument("--metrics-host", dest="metrics_host",
                   help="interface /metrics listens on (default 127.0.0.1; 0.0.0.0 for a Prometheus elsewhere)")
    add_security_flags(p)
    try:
        config = from_sources(PSConfig, parse_service_args(p, argv, "ps"))
        credentials = service_credentials("ps", config.tls_dir)
        server, port, servicer = serve(config, credentials)
    except ValueError as exc:  # a bad flag, missing credentials, plaintext on a reachable address
        raise ServiceStartError(f"psserver: error: {exc}") from None
    address = f"{config.advertise_host or config.host}:{port}"
    metrics_address = ""
    if config.metrics_port >= 0:
        try:
            metrics_address = servicer.metrics.serve(config.metrics_host, config.metrics_port,
                                                     "" if is_loopback(config.metrics_host) else config.advertise_host)
        except OSError as exc:
            server.stop(grace=None)
            raise ServiceStartError(metrics_port_error("psserver", config.metrics_host, config.metrics_port, exc)) from None
    heart = None
    if config.master:
        from pstrain.transport.membership import NodeMembership

        heart = NodeMembership(config.master, "ps", address=address, interval=config.heartbeat_interval,
                               metrics_address=metrics_address, credentials=credentials)
        try:
            heart.start()
        except (ConnectionError, RuntimeError) as exc:
            server.stop(grace=None)
            servicer.close()
            raise ServiceStartError(f"psserver: error: {exc}") from None

    def stop() -> None:
        if heart is not None:
            heart.stop()
        server.stop(grace=2).wait()
        servicer.close()

    return Service("ps", address, metrics_address, stop)


def main(argv=None) -> int:
    return run_service(start, argv)


if __name__ == "__main__":
    sys.exit(main())
