"""The job commands: ``psctl submit``, ``status``, ``list``, ``logs``, ``cancel``,
``scale``, ``export`` and ``plot``, and ``nodes`` (the cluster's workers and shards),
each one call to the master. Usage::

    psctl submit examples/mnist_mlp.py --mode ssp --staleness 2 --wait
    psctl status job-000001 --json
    psctl logs -f job-000001
    psctl scale job-000001 --workers 1
    psctl nodes
    psctl export job-000001 -o model.npz
    psctl plot job-000001 -o curves.png
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

from client.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    CommandError,
    job_result,
    load_job,
    master_client,
    print_json,
)
from client.cli.formatting import format_nodes, format_record, format_status, format_table
from client.job import job_to_spec, save_export, steps_per_epoch
from client.launchers import get_launcher, load_handle, scale_job
from client.plot import history_curves, plot_history
from client.progress import TERMINAL, WatchView, follow, format_metrics
from pstrain.transport.master_client import MasterClient, master_address


def submit_command(args) -> int:
    job, name = load_job(args)
    spec = job_to_spec(job, name)
    # Before submitting: reading the dataset takes a moment, and the bars time from the start.
    view = WatchView(job.epochs, steps_per_epoch(job)) if args.wait and not args.json else None
    client = master_client(args)
    try:
        status = client.submit(spec)
        if not args.wait:
            if args.json:
                print_json(status)
            else:
                print(f"submitted {status['id']} ({name}): {status['state']}; follow it with: psctl logs -f {status['id']}")
            return EXIT_OK
        if not args.json:
            print(f"submitted {status['id']} ({name})", flush=True)
        try:
            final = follow(client, status["id"], view)
        except KeyboardInterrupt:
            print(f"\npsctl: stopped watching {status['id']}; it keeps running (psctl cancel {status['id']} stops it)",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        return job_result(final, args.json)
    finally:
        client.close()


def _answer(args, call, text) -> int:
    """One call to the master (``call(client)``), its answer printed as JSON with
    ``--json``, else as ``text(answer)``."""
    client = master_client(args)
    try:
        answer = call(client)
    finally:
        client.close()
    if args.json:
        print_json(answer)
    else:
        print(text(answer))
    return EXIT_OK


def status_command(args) -> int:
    return _answer(args, lambda c: c.get(args.job), format_status)


def list_command(args) -> int:
    return _answer(args, lambda c: c.list(), lambda jobs: format_table(jobs) if jobs else "no jobs")


def logs_command(args) -> int:
    """Events and progress records; ``-f`` keeps following until the job ends."""
    client = master_client(args)
    events = 0
    try:
        for status, history in client.watch(args.job):
            for e in status["events"][events:]:
                print(e)
            events = len(status["events"])
            for rec in history:
                print(format_record(rec))
            sys.stdout.flush()
            if not args.follow:
                break
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        client.close()
    return EXIT_OK


def fetch_history(client: MasterClient, job_id: str) -> tuple[dict, list[dict]]:
    """A job's status and its history so far. The master's first watch event replays the
    whole history (since=0), so this does not wait for a running job to end."""
    stream = client.watch(job_id, since=0)
    try:
        status, history = next(stream)
    except StopIteration:
        raise CommandError(f"the master closed the watch stream of {job_id} before sending its history; "
                           "try again") from None
    finally:
        stream.close()
    return status, history


def _plot_title(status: Mapping[str, Any]) -> str:
    title = f"{status.get('name') or 'job'} ({status['id']}): {status['state']}, epoch {status['epoch']}, step {status['step']}"
    final = {k: v for k, v in (status.get("metrics") or {}).items() if k in ("val_loss", "val_accuracy")}
    return title + (" - final " + format_metrics(dict(sorted(final.items()))) if final and status["state"] == "SUCCEEDED" else "")


def write_plot(status: Mapping[str, Any], history: list[dict], path: str) -> None:
    """Draw ``history`` to the PNG ``path``; a CommandError when there is nothing to draw yet."""
    curves = history_curves(history)
    if not any(c["step"] for c in curves.values()):
        raise CommandError(f"nothing to plot: job {status['id']} is {status['state']} and has recorded no loss or "
                           "accuracy yet" + ("; try again once it has trained a few steps"
                                             if status["state"] not in TERMINAL else ""))
    plot_history(history, path, title=_plot_title(status))


def plot_command(args) -> int:
    client = master_client(args)
    try:
        status, history = fetch_history(client, args.job)
    finally:
        client.close()
    write_plot(status, history, args.output)
    print(f"wrote {args.output}")
    return EXIT_OK


def cancel_command(args) -> int:
    return _answer(args, lambda c: c.cancel(args.job), lambda s: f"{s['id']}: {s['state']}")


def scale_command(args) -> int:
    """ScaleJob; on a cluster whose launcher can add and remove workers (the state file
    of --state-dir records one, with this master), also start the processes it lacks
    and stop those left idle."""
    processes = f"{args.workers} worker process{'es' if args.workers != 1 else ''}"
    handle = _cluster_of(args)
    launcher = get_launcher(handle.launcher) if handle is not None else None

    def call(client):
        status, lines = scale_job(client, args.job, args.workers, launcher, handle)
        for line in lines:
            print(f"psctl: {line}", file=sys.stderr, flush=True)
        return status

    return _answer(args, call, lambda s: f"{s['id']}: {s['state']}; moving its worker slots to {processes} "
                                         f"(each after its current step; see psctl status {s['id']})")


def _cluster_of(args):
    """The cluster ``psctl up`` started (the state file of --state-dir, else the default
    one) if it is the master this command talks to; with --state-dir and no --master,
    that cluster's master becomes the one talked to."""
    try:
        handle = load_handle(args.state_dir)
    except ValueError:
        return None
    if handle is None:
        return None
    if args.state_dir and not args.master:
        args.master = handle.master_address
    return handle if handle.master_address == master_address(args.master) else None


def nodes_command(args) -> int:
    return _answer(args, lambda c: c.nodes(), format_nodes)


def export_command(args) -> int:
    client = master_client(args)
    try:
        config, names, weights = client.export(args.job)
    finally:
        client.close()
    save_export(args.output, config, names, weights)
    print(f"saved {args.output} ({len(weights)} weight arrays of {args.job}); load it with nn.load_model")
    return EXIT_OK
