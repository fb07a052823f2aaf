"""``python -m worker``: run a worker node that registers with the master and trains
the tasks it is given. Prints ``PSTRAIN_READY worker`` once registered."""
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
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (stop.set(), node.cancel_all()))
    print(f"PSTRAIN_READY worker {node.membership.node_id}", flush=True)
    node.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
