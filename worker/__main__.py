"""``python -m worker``: run a worker node that registers with the master and trains
the tasks it is given. Prints ``PSTRAIN_METRICS worker HOST:PORT`` (where /metrics is
served, unless ``--metrics-port -1``) and ``PSTRAIN_READY worker NODE_ID`` once registered."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from protos.settings import from_sources
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
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    try:
        config = from_sources(WorkerConfig, args)
        node = WorkerNode(config)
        node.start()
    except (ValueError, RuntimeError, ConnectionError) as exc:
        print(f"worker: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the metrics port is taken
        print(f"worker: error: cannot serve /metrics on {config.host}:{config.metrics_port} ({exc}); "
              "choose another --metrics-port / PSTRAIN_METRICS_PORT (0 picks a free one)", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (stop.set(), node.cancel_all()))
    if node.membership.metrics_address:
        print(f"PSTRAIN_METRICS worker {node.membership.metrics_address}", flush=True)
    print(f"PSTRAIN_READY worker {node.membership.node_id}", flush=True)
    node.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
