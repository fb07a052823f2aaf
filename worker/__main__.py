"""``python -m worker``: run a worker node that registers with the master and trains
the tasks it is given. Prints ``PSTRAIN_METRICS worker HOST:PORT`` (where /metrics is
served, unless ``--metrics-port -1``) and ``PSTRAIN_READY worker NODE_ID`` once registered.
``start(argv)`` starts the same node in this process, its task loop in a thread (a Ray
actor hosts it so)."""
from __future__ import annotations

import argparse
import sys
import threading

from protos.settings import (
    Service,
    ServiceStartError,
    add_security_flags,
    from_sources,
    metrics_port_error,
    parse_service_args,
    run_service,
)
from worker.config import WorkerConfig
from worker.node import WorkerNode


def start(argv=None) -> Service:
    """Start a worker node in this process from its command-line flags; raises ServiceStartError."""
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    p.add_argument("--master")
    p.add_argument("--device")
    p.add_argument("--name")
    p.add_argument("--host", help="interface /metrics listens on (default 127.0.0.1)")
    p.add_argument("--advertise-host", dest="advertise_host", help="host others scrape /metrics at")
    p.add_argument("--metrics-port", dest="metrics_port", type=int,
                   help="port of /metrics (0 picks a free one, -1 serves none; default 0)")
    add_security_flags(p)
    try:
        config = from_sources(WorkerConfig, parse_service_args(p, argv, "worker"))
        node = WorkerNode(config)
        node.start()
    except (ValueError, RuntimeError, ConnectionError) as exc:
        raise ServiceStartError(f"worker: error: {exc}") from None
    except OSError as exc:  # the metrics port is taken
        raise ServiceStartError(metrics_port_error("worker", config.host, config.metrics_port, exc)) from None
    stopped = threading.Event()
    loop = threading.Thread(target=node.run, args=(stopped,), name="worker-tasks", daemon=True)
    loop.start()

    def stop() -> None:
        stopped.set()
        loop.join(timeout=30)

    return Service("worker", node.membership.node_id, node.membership.metrics_address, stop, interrupt=node.cancel_all)


def main(argv=None) -> int:
    return run_service(start, argv)


if __name__ == "__main__":
    sys.exit(main())
