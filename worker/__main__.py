"""``python -m worker``: run a worker node that registers with the master and trains
the tasks it is given. Prints ``PSTRAIN_METRICS worker HOST:PORT`` (where /metrics is
served, unless ``--metrics-port -1``) and ``PSTRAIN_READY worker NODE_ID`` once registered."""
from __future__ import annotations

import argparse
import sys

from protos.settings import from_sources, metrics_port_error, parse_service_args, stop_event
from worker.config import WorkerConfig
from worker.node import WorkerNode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    p.add_argument("--master")
    p.add_argument("--device")
    p.add_argument("--name")
    p.add_argument("--host", help="interface /metrics listens on (default 127.0.0.1)")
    p.add_argument("--advertise-host", dest="advertise_host", help="host others scrape /metrics at")
    p.add_argument("--metrics-port", dest="metrics_port", type=int,
                   help="port of /metrics (0 picks a free one, -1 serves none; default 0)")
    try:
        config = from_sources(WorkerConfig, parse_service_args(p, argv, "worker"))
        node = WorkerNode(config)
        node.start()
    except (ValueError, RuntimeError, ConnectionError) as exc:
        print(f"worker: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the metrics port is taken
        print(metrics_port_error("worker", config.host, config.metrics_port, exc), file=sys.stderr)
        return 2
    stop = stop_event(on_stop=node.cancel_all)
    if node.membership.metrics_address:
        print(f"PSTRAIN_METRICS worker {node.membership.metrics_address}", flush=True)
    print(f"PSTRAIN_READY worker {node.membership.node_id}", flush=True)
    node.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
