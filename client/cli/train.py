"""``psctl train JOBFILE``: a job end to end on a temporary cluster (started with the
launcher ``--launcher`` names, default ``local``, and stopped when the job ends), or in
this process (``--in-process``, or when the services are not installed). Usage::

    psctl train examples/mnist_mlp.py --workers 2 --ps 2 -o model.npz --plot curves.png
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

from client.cli.cluster import launcher_from_args
from client.cli.common import EXIT_OK, connect_timeout, job_result, load_job, print_json, services_installed, sigterm_interrupts
from client.cli.jobs import fetch_history, write_plot
from client.graphjob import GRAPH_FORMAT, GraphModel, save_graph_export
from client.job import Job, job_to_spec, model_from_export, run_in_process, save_export, steps_per_epoch
from client.launchers import DEVICES, ClusterSpec, local_cluster
from client.plot import plot_history
from client.progress import WatchView, follow, format_metrics
from pstrain.transport.master_client import MasterClient

log = logging.getLogger(__name__)


def _test_metrics(job: Job, config: dict, names, weights) -> dict:
    """Test-split metrics of the exported model, computed here (as nn.load_model would);
    none for a graph job (its validation metrics come from the cluster)."""
    from pstrain.runtime import datasets

    if config.get("format") == GRAPH_FORMAT:
        return {}
    try:
        data = datasets.load(job.dataset)
    except (OSError, ValueError) as exc:
        log.info("not evaluating the exported model here: %s", exc)
        return {}
    model = model_from_export(config, names, weights)
    return {f"test_{k}": v for k, v in model.evaluate(data.x_test, data.y_test, return_dict=True).items()}


def train_command(args) -> int:
    job, name = load_job(args)
    if args.in_process or not services_installed():
        if not args.in_process:
            print("psctl: note: the distributed runtime (master, psserver, worker) is not installed; "
                  "training in this process", file=sys.stderr)
        return train_in_process(job, args)
    device = args.device or (job.model.device if job.model.device in DEVICES else "cpu")
    spec = job_to_spec(job, name, device=device)
    view = None if args.json else WatchView(job.epochs, steps_per_epoch(job))
    state_dir = tempfile.mkdtemp(prefix="pstrain-train-")
    cluster = ClusterSpec(workers=args.workers, ps=args.ps, port=0, state_dir=state_dir, device=device,
                          tls_dir=args.tls_dir or os.environ.get("PSTRAIN_TLS_DIR", ""), insecure=args.insecure)
    keep_logs = True
    try:
        with sigterm_interrupts(), local_cluster(cluster, launcher_from_args(args)) as handle:
            if not args.json:
                print(f"{handle.launcher} cluster: master at {handle.master_address}, {args.ps} ps shards, {args.workers} workers",
                      flush=True)
            client = MasterClient(handle.master_address, connect_timeout=connect_timeout(args),
                                  credentials=handle.user_credentials())
            try:
                status = client.submit(spec)
                final = follow(client, status["id"], view)
                if final["state"] == "SUCCEEDED":
                    config, names, weights = client.export(final["id"])
                    if args.plot:  # the history lives on the master: read it before the cluster stops
                        plot_status, plot_records = fetch_history(client, final["id"])
            finally:
                client.close()
        if final["state"] == "SUCCEEDED":
            keep_logs = False
            if args.output:
                save_export(args.output, config, names, weights)
            if args.plot:  # after the model is saved, so a bad plot path cannot lose it
                write_plot(plot_status, plot_records, args.plot)
            test = _test_metrics(job, config, names, weights)
            final = {**final, "metrics": {**final["metrics"], **{k: v for k, v in test.items()
                                                                  if k not in final["metrics"]}}}
            if args.output:
                final["model"] = os.path.abspath(args.output)
            if args.plot:
                final["plot"] = os.path.abspath(args.plot)
            if not args.json:
                if test:
                    print("test: " + format_metrics({k[len("test_"):]: v for k, v in test.items()}))
                if args.output:
                    print(f"saved {args.output}")
                if args.plot:
                    print(f"wrote {args.plot}")
        return job_result(final, args.json)
    finally:
        if keep_logs:
            print(f"psctl: the cluster's logs are kept in {os.path.join(state_dir, 'logs')}", file=sys.stderr)
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


def train_in_process(job: Job, args) -> int:
    graph_job = isinstance(job.model, GraphModel)
    if args.device:
        if job.model.built and not graph_job:
            raise ValueError("--device must be chosen before the job's model is built; set device= in the job file")
        job.model.device = args.device
    history, test = run_in_process(job, verbose=0 if args.json else 1)
    if args.output:
        if graph_job:
            weights = job.model.get_weights()
            save_graph_export(args.output, list(weights), list(weights.values()))
        else:
            job.model.save(args.output)
        if not args.json:
            print(f"saved {args.output}")
    if args.plot:
        spe = steps_per_epoch(job) or 1
        records = [{"worker": 0, "epoch": e + 1, "step": (e + 1) * spe,
                    **{k: v[e] for k, v in history.history.items() if e < len(v)}} for e in range(len(history.epoch))]
        name = os.path.splitext(os.path.basename(args.jobfile))[0]
        plot_history(records, args.plot, title=f"{name} (in process): {len(history.epoch)} epochs")
        if not args.json:
            print(f"wrote {args.plot}")
    last = {k: v[-1] for k, v in history.history.items()}
    metrics = {k: v for k, v in {**last, **{f"test_{k}": v for k, v in test.items()}}.items() if k != "loss"}
    if args.json:
        steps = len(history.epoch) * (steps_per_epoch(job) or 0) if graph_job else job.model._step
        print_json({"id": None, "state": "SUCCEEDED", "step": steps, "epoch": job.epochs,
                     "loss": last.get("loss"), "metrics": metrics, "error": None})
    return EXIT_OK
