"""``psctl``: the pstrain command line.

Usage::

    psctl train examples/mnist_mlp.py [--epochs N] [-o model.npz] [--device cpu|cuda|auto]

``train`` runs a job file end to end. Until the distributed runtime lands it trains
in this process (the same code path the cluster will run, minus the transport);
``up``, ``submit``, ``status`` and the other cluster commands arrive with it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from client.job import load_job_file, run_in_process


def _train(args) -> int:
    job = load_job_file(args.jobfile)
    if args.epochs is not None:
        job.epochs = args.epochs
    if args.device:
        if job.model.built:
            raise SystemExit("psctl: --device must be chosen before the job's model is built; set device= in the job file")
        job.model.device = args.device
    history, test = run_in_process(job, verbose=0 if args.json else 1)
    if args.output:
        job.model.save(args.output)
        if not args.json:
            print(f"saved {args.output}")
    if args.json:
        last = {k: v[-1] for k, v in history.history.items()}
        print(json.dumps({
            "state": "SUCCEEDED", "epoch": job.epochs, "loss": last.get("loss"),
            "metrics": {k: v for k, v in {**last, **{f"test_{k}": v for k, v in test.items()}}.items() if k != "loss"},
            "error": None,
        }))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psctl", description="pstrain command line")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a job file end to end (in-process for now)")
    t.add_argument("jobfile", help="a Python file defining job()")
    t.add_argument("--epochs", type=int, help="override the job's epochs")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="kernel backend")
    t.add_argument("-o", "--output", help="write the trained model (.npz) here")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=_train)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"psctl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
