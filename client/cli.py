"""``psctl``: the pstrain command line.

Usage::

    psctl up --workers 2 --ps 2 [--port 50051] [--device cpu] [--detach] [--state-dir DIR]
    psctl down [--state-dir DIR]
    psctl submit examples/mnist_mlp.py [--mode sync|async|ssp] [--staleness S] [--epochs N]
                 [--batch-size B] [--workers N] [--shards S] [--name NAME] [--wait] [--json]
    psctl status JOB [--json]        psctl list [--json]       psctl logs JOB [-f]
    psctl cancel JOB [--json]        psctl export JOB -o model.npz
    psctl train examples/mnist_mlp.py [--workers 2 --ps 2] [--mode ...] [-o model.npz] [--plot curves.png] [--json]
    psctl plot JOB -o curves.png     (loss and accuracy curves from the job's history)
    psctl plan examples/mnist_mlp.py [--workers N --ps S] [--png plan.png] [--dot plan.dot] [--json]

Global options (before or after the command): ``--master HOST:PORT`` (else
``$PSTRAIN_MASTER``, else ``127.0.0.1:50051``), ``--connect-timeout SECONDS`` (else
``$PSTRAIN_CONNECT_TIMEOUT``, else 5) and ``-v`` (debug logging).

Exit codes: 0 success; 1 the job did not succeed, or the cluster failed; 2 bad input (job
file, flags, values); 3 no master answers; 130 interrupted. Errors are one line on stderr,
``psctl: error: ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping, TextIO

import grpc

from client.job import (
    MODES,
    Job,
    job_to_spec,
    load_job_file,
    model_from_export,
    run_in_process,
    save_export,
    steps_per_epoch,
)
from client.launcher import (
    DEVICES,
    ClusterError,
    ClusterSpec,
    LocalProcessLauncher,
    default_state_dir,
    describe_exit,
    load_handle,
    local_cluster,
)
from client.plot import history_curves, plot_history
from client.progress import ProgressBar, format_metrics, write_epoch_header
from pstrain.transport.master_client import MasterClient, MasterUnavailable, describe_error, master_address

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
SERVICE_MODULES = ("master.__main__", "psserver.__main__", "worker.__main__")
DEFAULT_CONNECT_TIMEOUT = 5.0


class CommandError(Exception):
    """A user-facing failure with its exit code (the message is printed as one line)."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


# ---- helpers shared by the commands ------------------------------------------------------------
def _connect_timeout(args) -> float:
    value = getattr(args, "connect_timeout", None)
    if value is None:
        raw = os.environ.get("PSTRAIN_CONNECT_TIMEOUT")
        try:
            value = float(raw) if raw else DEFAULT_CONNECT_TIMEOUT
        except ValueError:
            raise ValueError(f"PSTRAIN_CONNECT_TIMEOUT={raw!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise ValueError(f"--connect-timeout={value} is out of range; allowed (0, 3600] seconds")
    return value


def _client(args, address: str | None = None) -> MasterClient:
    return MasterClient(address or master_address(getattr(args, "master", None)), connect_timeout=_connect_timeout(args))


def _load_job(args) -> tuple[Job, str]:
    """The job file's job, with the command line's overrides applied (and validated)."""
    changes = {
        name: getattr(args, name)
        for name in ("epochs", "batch_size", "mode", "staleness", "num_workers", "num_shards")
        if getattr(args, name, None) is not None
    }
    job = load_job_file(args.jobfile, **changes)  # job() gets those it takes; Job validates the rest
    name = getattr(args, "name", None) or os.path.splitext(os.path.basename(args.jobfile))[0]
    return job, name


def _print_json(obj: Any, stream: TextIO | None = None) -> None:
    print(json.dumps(obj, sort_keys=True, default=str), file=stream or sys.stdout, flush=True)


def _fmt_number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _fmt_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def format_status(s: Mapping[str, Any]) -> str:
    """A job's status, for people (``psctl status``)."""
    lines = [f"{s['id']}  {s.get('name') or ''}  {s['state']}".rstrip()]
    lines.append(f"  epoch {s['epoch']}  step {s['step']}  loss {_fmt_number(s.get('loss'))}")
    if s.get("metrics"):
        lines.append("  " + format_metrics(dict(sorted(s["metrics"].items()))))
    if s.get("error"):
        lines.append(f"  error: {s['error']}")
    lines.append(f"  created {_fmt_time(s.get('created', 0))}  updated {_fmt_time(s.get('updated', 0))}")
    for worker, info in sorted((s.get("workers") or {}).items(), key=lambda kv: str(kv[0])):
        lines.append(f"  worker {worker}: {json.dumps(info, sort_keys=True)}")
    return "\n".join(lines)


def format_table(jobs: list[Mapping[str, Any]]) -> str:
    """``psctl list``: one row per job."""
    rows = [("ID", "NAME", "STATE", "EPOCH", "STEP", "LOSS", "ACCURACY")]
    for j in jobs:
        acc = j.get("metrics", {}).get("val_accuracy", j.get("metrics", {}).get("accuracy"))
        rows.append((j["id"], j.get("name") or "", j["state"], str(j["epoch"]), str(j["step"]),
                     _fmt_number(j.get("loss")), _fmt_number(acc)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_record(rec: Mapping[str, Any]) -> str:
    """One progress record from the master's history, as a log line."""
    rest = {k: v for k, v in rec.items() if k not in ("time", "worker", "step", "epoch", "final")}
    head = []
    if "time" in rec:
        head.append(_fmt_time(rec["time"]))
    if "worker" in rec:
        head.append(f"worker {rec['worker']}")
    if "epoch" in rec:
        head.append(f"epoch {rec['epoch']}")
    if "step" in rec:
        head.append(f"step {rec['step']}")
    if rec.get("final"):
        head.append("final")
    return " ".join(head) + (" - " + format_metrics(rest) if rest else "")


class WatchView:
    """Draws a job's progress as Keras-style epochs and progress bars, from the progress
    records of WatchJob (every worker report, in order) plus the job's state.

    A record's ``step`` is global (``epoch * steps_per_epoch + i``) and its ``epoch``
    counts completed epochs: the report that ends epoch ``e`` has ``epoch = e + 1`` and
    ``step = (e + 1) * steps_per_epoch``, and the validating worker adds ``val_`` metrics
    to it. An epoch's bar is finished once its ``val_`` metrics arrive (or a later epoch
    completes, or the job ends). Running metrics are averaged over workers, and times
    come from the records, so a bar drawn late (a fast epoch) still shows real step times.
    """

    META = ("time", "worker", "step", "epoch", "final", "steps_per_epoch")

    def __init__(self, epochs: int, steps_per_epoch: int | None, verbose: int = 1, stream: TextIO | None = None):
        self.epochs = int(epochs)
        self.spe = steps_per_epoch
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self._shown = -1  # last epoch whose bar is finished
        self._bar: ProgressBar | None = None
        self._completed = 0  # epochs some worker has finished
        self._steps: dict[int, int] = {}  # epoch -> furthest step into it
        self._running: dict[int, dict] = {}  # epoch -> worker -> running metrics
        self._val: dict[int, dict] = {}  # epoch -> val_ metrics
        self._first: dict[int, float] = {}  # epoch -> time of its first record
        self._last: dict[int, float] = {}  # epoch -> time of its latest record
        self._now = 0.0  # what the open bar's clock reads
        self._started: float | None = None  # the job's last change when first seen (~ its start)
        self._said_pending = False

    def update(self, status: Mapping[str, Any], history: Iterable[Mapping] = ()) -> None:
        for rec in history:
            self._ingest(rec)
        if not self.verbose:
            return
        if status["state"] == "PENDING" and not self._said_pending:
            print(f"{status['id']} is PENDING (waiting for workers and shards)", file=self.stream, flush=True)
            self._said_pending = True
        if status["state"] in ("PENDING", "RUNNING") and self._started is None:
            self._started = float(status.get("updated") or 0.0) or None
        self._draw(ended=status["state"] in TERMINAL)

    def close(self, status: Mapping[str, Any], history: Iterable[Mapping] = ()) -> None:
        """The job ended: finish the open bar."""
        self.update(status, history)
        if self.verbose:
            self._draw(ended=True)

    def _ingest(self, rec: Mapping[str, Any]) -> None:
        metrics = {k: v for k, v in rec.items() if k not in self.META}
        if rec.get("final") or (set(metrics) <= {"loss"} and not metrics.get("loss")):
            return  # the final evaluation, or a worker's "done" report: not epoch progress
        if isinstance(rec.get("steps_per_epoch"), int) and rec["steps_per_epoch"] > 0:
            self.spe = rec["steps_per_epoch"]
        epoch, step = int(rec.get("epoch", 0)), int(rec.get("step", 0))
        if self.spe is None and epoch == 1:
            self.spe = step  # the first record of epoch 1 ends epoch 0, at step 1 * steps_per_epoch
            if self._bar is not None:
                self._bar.total_steps = step
        ends_epoch = self.spe is not None and epoch >= 1 and step == epoch * self.spe
        k = epoch - 1 if ends_epoch else epoch
        in_epoch = step - k * self.spe if self.spe else step
        if self.spe:
            in_epoch = min(max(in_epoch, 0), self.spe)
        self._steps[k] = max(self._steps.get(k, 0), in_epoch)
        t = float(rec.get("time") or time.time())
        self._first.setdefault(k, t)
        self._last[k] = max(self._last.get(k, t), t)
        running = {n: v for n, v in metrics.items() if not n.startswith(("val_", "test_"))}
        if running:
            self._running.setdefault(k, {})[rec.get("worker", 0)] = running
        val = {n: v for n, v in metrics.items() if n.startswith("val_")}
        if val and ends_epoch:
            self._val[k] = val
        self._completed = max(self._completed, epoch)

    def _metrics(self, k: int) -> dict:
        per_worker = list(self._running.get(k, {}).values())
        names = list(dict.fromkeys(n for m in per_worker for n in m))
        return {n: sum(m[n] for m in per_worker if n in m) / sum(1 for m in per_worker if n in m) for n in names}

    def _draw(self, ended: bool) -> None:
        while self._shown + 1 < self.epochs:
            k = self._shown + 1
            if self._bar is None:
                if k not in self._steps and self._completed <= k:
                    return  # nothing to show for epoch k yet
                write_epoch_header(k + 1, self.epochs, self.verbose, self.stream)
                # Epoch k starts when epoch k - 1 ends (epoch 0: at its first report).
                self._now = self._last.get(k - 1) or self._first.get(k) or time.time()
                if k == 0 and self._started is not None:
                    self._now = min(self._now, self._started)
                self._bar = ProgressBar(self.spe or 0, verbose=self.verbose, stream=self.stream,
                                        clock=lambda: self._now)
            done = self._completed > k
            step = self.spe if done and self.spe else self._steps.get(k, 0)
            self._now = max(self._now, self._last.get(k, self._now))
            self._bar.update(step, **self._metrics(k))
            if not (ended or (done and (k in self._val or self._completed > k + 1))):
                return  # epoch k is still running, or its validation metrics are on the way
            self._bar.finish(**self._val.get(k, {}))
            self._bar, self._shown = None, k
            if ended and not done:
                return  # the job stopped in the middle of epoch k


def follow(client: MasterClient, job_id: str, view: WatchView | None = None) -> dict:
    """Watch ``job_id`` until it ends; returns its final status."""
    seen, status = 0, None
    while True:
        for status, history in client.watch(job_id, since=seen):
            seen += len(history)
            if view is not None:
                view.update(status, history)
        if status is None or status["state"] not in TERMINAL:
            # The stream ended early (e.g. the master restarted): look again.
            status = client.get(job_id)
        if status["state"] in TERMINAL:
            if view is not None:
                view.close(status)
            return status
        time.sleep(0.5)


def _job_result(status: Mapping[str, Any], as_json: bool) -> int:
    if as_json:
        _print_json(status)
    else:
        line = f"{status['id']} {status['state']}"
        if status.get("loss") is not None or status.get("metrics"):
            line += " - " + format_metrics({**({"loss": status["loss"]} if status.get("loss") is not None else {}),
                                            **dict(sorted(status.get("metrics", {}).items()))})
        print(line, flush=True)
    if status["state"] != "SUCCEEDED":
        why = f": {status['error']}" if status.get("error") else ""
        print(f"psctl: error: job {status['id']} {status['state']}{why}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM behaves like Ctrl-C, so ``finally`` blocks stop the cluster."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def services_installed() -> bool:
    """Whether this checkout has the master, psserver and worker entry points."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in SERVICE_MODULES)
    except ImportError:
        return False


# ---- cluster commands ----------------------------------------------------------------------------------
def _up(args) -> int:
    spec = ClusterSpec(workers=args.workers, ps=args.ps, port=args.port, device=args.device,
                       state_dir=args.state_dir or "", heartbeat_timeout=args.heartbeat_timeout)
    launcher = LocalProcessLauncher(start_timeout=args.start_timeout)
    with _sigterm_interrupts():
        handle = launcher.start(spec)
        print(f"pstrain cluster up: master at {handle.master_address} ({spec.ps} ps shards, "
              f"{spec.workers} workers, device {spec.device}); state and logs in {spec.state_dir}", flush=True)
        if args.detach:
            down = "psctl down" + ("" if args.state_dir is None else f" --state-dir {spec.state_dir}")
            print(f"export PSTRAIN_MASTER={handle.master_address}   # for psctl submit/status/...; "
                  f"stop the cluster with: {down}", flush=True)
            return EXIT_OK
        print("press Ctrl-C to stop the cluster", flush=True)
        try:
            _supervise(launcher, handle)
        except KeyboardInterrupt:
            print("stopping the cluster ...", file=sys.stderr, flush=True)
        finally:
            launcher.stop(handle)
    print("cluster stopped", flush=True)
    return EXIT_OK


def _supervise(launcher: LocalProcessLauncher, handle, interval: float = 1.0) -> None:
    """Stay in the foreground; warn when a service dies, give up when the master does."""
    reported: set[int] = set()
    while True:
        time.sleep(interval)
        for p in launcher.status(handle):
            if p.alive or p.pid in reported:
                continue
            reported.add(p.pid)
            message = describe_exit(p.role, p.index, p.pid, launcher.exit_code(p.pid), p.log, lines=10)
            if p.role == "master":
                raise ClusterError(f"the master died, stopping the cluster: {message}")
            print(f"psctl: warning: {message}", file=sys.stderr, flush=True)


def _down(args) -> int:
    handle = load_handle(args.state_dir)
    state_dir = os.path.abspath(os.path.expanduser(args.state_dir or default_state_dir()))
    if handle is None:
        print(f"no cluster is running (no state file in {state_dir})", file=sys.stderr)
        return EXIT_OK
    LocalProcessLauncher().stop(handle, timeout=args.timeout)
    print(f"stopped the cluster at {handle.master_address}")
    return EXIT_OK


# ---- job commands ----------------------------------------------------------------------------------------
def _submit(args) -> int:
    job, name = _load_job(args)
    spec = job_to_spec(job, name)
    # Before submitting: reading the dataset takes a moment, and the bars time from the start.
    view = WatchView(job.epochs, steps_per_epoch(job)) if args.wait and not args.json else None
    client = _client(args)
    try:
        status = client.submit(spec)
        if not args.wait:
            if args.json:
                _print_json(status)
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
        return _job_result(final, args.json)
    finally:
        client.close()


def _status(args) -> int:
    client = _client(args)
    try:
        s = client.get(args.job)
    finally:
        client.close()
    if args.json:
        _print_json(s)
    else:
        print(format_status(s))
    return EXIT_OK


def _list(args) -> int:
    client = _client(args)
    try:
        jobs = client.list()
    finally:
        client.close()
    if args.json:
        _print_json(jobs)
    elif jobs:
        print(format_table(jobs))
    else:
        print("no jobs")
    return EXIT_OK


def _logs(args) -> int:
    """Events and progress records; ``-f`` keeps following until the job ends."""
    client = _client(args)
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


def _plot(args) -> int:
    client = _client(args)
    try:
        status, history = fetch_history(client, args.job)
    finally:
        client.close()
    write_plot(status, history, args.output)
    print(f"wrote {args.output}")
    return EXIT_OK


def _cancel(args) -> int:
    client = _client(args)
    try:
        s = client.cancel(args.job)
    finally:
        client.close()
    if args.json:
        _print_json(s)
    else:
        print(f"{s['id']}: {s['state']}")
    return EXIT_OK


def _export(args) -> int:
    client = _client(args)
    try:
        config, names, weights = client.export(args.job)
    finally:
        client.close()
    save_export(args.output, config, names, weights)
    print(f"saved {args.output} ({len(weights)} weight arrays of {args.job}); load it with nn.load_model")
    return EXIT_OK


# ---- train: a local cluster, end to end --------------------------------------------------------------
def _test_metrics(job: Job, config: dict, names, weights) -> dict:
    """Test-split metrics of the exported model, computed here (as nn.load_model would)."""
    from pstrain.runtime import datasets

    try:
        data = datasets.load(job.dataset)
    except (OSError, ValueError) as exc:
        log.info("not evaluating the exported model here: %s", exc)
        return {}
    model = model_from_export(config, names, weights)
    return {f"test_{k}": v for k, v in model.evaluate(data.x_test, data.y_test, return_dict=True).items()}


def _train(args) -> int:
    job, name = _load_job(args)
    if args.in_process or not services_installed():
        if not args.in_process:
            print("psctl: note: the distributed runtime (master, psserver, worker) is not installed; "
                  "training in this process", file=sys.stderr)
        return _train_in_process(job, args)
    device = args.device or (job.model.device if job.model.device in DEVICES else "cpu")
    spec = job_to_spec(job, name, device=device)
    view = None if args.json else WatchView(job.epochs, steps_per_epoch(job))
    state_dir = tempfile.mkdtemp(prefix="pstrain-train-")
    cluster = ClusterSpec(workers=args.workers, ps=args.ps, port=0, state_dir=state_dir, device=device)
    keep_logs = True
    try:
        with _sigterm_interrupts(), local_cluster(cluster, LocalProcessLauncher(start_timeout=args.start_timeout)) as handle:
            if not args.json:
                print(f"local cluster: master at {handle.master_address}, {args.ps} ps shards, {args.workers} workers",
                      flush=True)
            client = MasterClient(handle.master_address, connect_timeout=_connect_timeout(args))
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
        return _job_result(final, args.json)
    finally:
        if keep_logs:
            print(f"psctl: the cluster's logs are kept in {os.path.join(state_dir, 'logs')}", file=sys.stderr)
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


def _train_in_process(job: Job, args) -> int:
    if args.device:
        if job.model.built:
            raise ValueError("--device must be chosen before the job's model is built; set device= in the job file")
        job.model.device = args.device
    history, test = run_in_process(job, verbose=0 if args.json else 1)
    if args.output:
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
        _print_json({"id": None, "state": "SUCCEEDED", "step": job.model._step, "epoch": job.epochs,
                     "loss": last.get("loss"), "metrics": metrics, "error": None})
    return EXIT_OK


# ---- plan ---------------------------------------------------------------------------------------------------
SHARD_COLORS = ("#fdd49e", "#c7e9c0", "#d4b9da", "#fcbba1", "#fee391", "#ccebc5", "#fbb4ae", "#decbe4")
WORKER_COLOR = "#c6dbef"


def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _shape(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plan_to_dot(graph, plan: Mapping[str, Any], grads: Mapping[str, str] | None = None,
                num_workers: int = 0) -> str:
    """Graphviz DOT of a training plan: the worker subgraph in one cluster (it runs on
    every worker), one cluster per parameter-server shard holding its variable slices (a
    variable cut across shards appears once per slice), folded constants dashed, and
    ``grads`` (variable -> gradient node) drawn as red dashed "push" edges.

    ``plan`` is ``JobPlan.to_dict()`` (or the master's GetPlan ``plan_json``): its
    ``slices`` say where each variable lives and ``*_passes.folded`` what was folded.
    """
    slices: dict[str, list[Mapping]] = {}
    for sl in plan.get("slices", []):
        slices.setdefault(sl["variable"], []).append(sl)
    folded = set(plan.get("forward_passes", {}).get("folded", [])) | set(plan.get("train_passes", {}).get("folded", []))
    ids = {name: f"n{i}" for i, name in enumerate(graph.nodes)}
    sources: dict[str, list[str]] = {}  # node -> the DOT ids its value comes from (slices of a variable)
    by_shard: dict[int, list[str]] = {}
    worker_lines: list[str] = []
    for node in graph.nodes.values():
        label = f"{node.name}\n{node.op} {_shape(node.shape)}"
        if node.op == "variable" and node.name in slices:
            parts = slices[node.name]
            sources[node.name] = []
            for j, sl in enumerate(parts):
                sid = f"{ids[node.name]}s{j}"
                sources[node.name].append(sid)
                shape = node.shape
                if len(parts) > 1 and shape:
                    shape = (int(sl["stop"]) - int(sl["start"]),) + tuple(shape[1:])
                text = f"{sl.get('key', node.name) if len(parts) > 1 else node.name}\nvariable {_shape(shape)}"
                color = SHARD_COLORS[int(sl["shard"]) % len(SHARD_COLORS)]
                by_shard.setdefault(int(sl["shard"]), []).append(
                    f"    {sid} [label={_q(text)} shape=cylinder style=filled fillcolor=\"{color}\"];")
            continue
        sources[node.name] = [ids[node.name]]
        if node.op == "placeholder":
            attrs = 'shape=invhouse style=filled fillcolor="#ffffff"'
        elif node.op == "constant" and node.name in folded:
            attrs = 'shape=note style="filled,dashed" fillcolor="#eeeeee"'
            label += "\nfolded constant"
        elif node.op == "constant":
            attrs = 'shape=note style=filled fillcolor="#f7f7f7"'
        elif node.op == "variable":  # on no shard: local to each worker
            attrs = 'shape=cylinder style=filled fillcolor="#ffffff"'
            label += "\nworker-local"
        else:
            attrs = f'shape=box style="rounded,filled" fillcolor="{WORKER_COLOR}"'
        worker_lines.append(f"    {ids[node.name]} [label={_q(label)} {attrs}];")
    shard_bytes = list(plan.get("shard_bytes", []))
    n_shards = max([len(shard_bytes)] + [k + 1 for k in by_shard])
    where = f"each of {num_workers} workers" if num_workers else "every worker"
    title = (f"pstrain plan: {plan.get('mode', '?')} mode, {n_shards} ps shards. Blue: worker ops; colored "
             "cylinders: variable slices by shard; dashed: folded constants; red: gradient pushes")
    out = ["digraph plan {", f"  label={_q(title)}; labelloc=t; rankdir=TB; fontname=Helvetica;",
           '  node [fontname=Helvetica fontsize=10]; edge [color="#555555"];',
           "  subgraph cluster_workers {",
           f'    label={_q(f"worker subgraph (runs on {where})")}; style=dashed; color="#3182bd";']
    out += worker_lines
    out.append("  }")
    for shard in sorted(by_shard):
        size = f" - {_bytes(shard_bytes[shard])}" if shard < len(shard_bytes) else ""
        out += [f"  subgraph cluster_ps{shard} {{",
                f'    label={_q(f"ps shard {shard}{size}")}; style=filled; color="#999999"; fillcolor="#fafafa";']
        out += by_shard[shard]
        out.append("  }")
    for node in graph.nodes.values():
        for src in node.inputs:
            for sid in sources.get(src, []):
                out.append(f"  {sid} -> {ids[node.name]};")
    for var, grad in (grads or {}).items():
        if grad in ids:
            for sid in sources.get(var, []) if var in slices else []:
                out.append(f'  {ids[grad]} -> {sid} [style=dashed color="#de2d26" fontcolor="#de2d26" label="push"];')
    out.append("}")
    return "\n".join(out) + "\n"


def render_png(dot_text: str, path: str) -> None:
    """Run Graphviz's ``dot -Tpng`` on ``dot_text``, writing ``path``."""
    exe = shutil.which("dot")
    if exe is None:
        raise CommandError("cannot render the plan: Graphviz's `dot` is not installed; install graphviz "
                           "(apt-get install graphviz), or write the DOT source with --dot FILE")
    result = subprocess.run([exe, "-Tpng", "-o", path], input=dot_text, capture_output=True, text=True)
    if result.returncode != 0:
        raise CommandError(f"dot -Tpng failed (exit {result.returncode}): {result.stderr.strip()}")


def _plan_locally(spec, num_shards: int):
    try:
        from master.planner import plan_job
    except ImportError as exc:
        raise CommandError(f"cannot plan locally: master.planner is not available ({exc}); start a master "
                           "(psctl up) and point --master at it") from None
    return plan_job(spec, num_shards)


def _plan(args) -> int:
    job, name = _load_job(args)
    spec = job_to_spec(job, name)
    num_shards = args.num_shards or ClusterSpec.ps
    address = master_address(getattr(args, "master", None))
    local = None
    client = MasterClient(address, connect_timeout=min(_connect_timeout(args), 2.0))
    try:
        text, data, graph = client.plan(spec)
    except MasterUnavailable:
        print(f"psctl: note: no master at {address}; planning locally for {num_shards} ps shards", file=sys.stderr)
        local = _plan_locally(spec, num_shards)
        text, data, graph = local.text, local.to_dict(), local.graph
    finally:
        client.close()
    if args.png or args.dot:
        grads = dict(local.train.grads) if local is not None else None
        dot = plan_to_dot(graph, data, grads=grads, num_workers=job.num_workers)
        if args.dot:
            with open(args.dot, "w") as f:
                f.write(dot)
        if args.png:
            render_png(dot, args.png)
    if args.json:
        _print_json(data)
    else:
        print(text)
        for path in (args.dot, args.png):
            if path:
                print(f"wrote {path}")
    return EXIT_OK


# ---- the parser ----------------------------------------------------------------------------------------------
def _positive(kind):
    def parse(text):
        value = kind(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
        return value
    parse.__name__ = kind.__name__
    return parse


def _non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _global_options(p: argparse.ArgumentParser, defaults) -> None:
    # On the main parser and on every command, so they may come before or after it;
    # SUPPRESS keeps a command's parser from overwriting a value given before it.
    p.add_argument("--master", metavar="HOST:PORT", default=defaults,
                   help="the master (else $PSTRAIN_MASTER, else 127.0.0.1:50051)")
    p.add_argument("--connect-timeout", type=float, metavar="SECONDS", default=defaults,
                   help="how long to wait for the master to answer (else $PSTRAIN_CONNECT_TIMEOUT, else 5)")
    p.add_argument("-v", "--verbose", action="store_true", default=defaults, help="debug logging")


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, help="how shards apply gradients (default: the job file's)")
    p.add_argument("--staleness", type=_non_negative, help="ssp: how many versions a worker may run ahead")
    p.add_argument("--epochs", type=_non_negative, help="override the job's epochs")
    p.add_argument("--batch-size", type=_positive(int), help="override the job's (global) batch size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psctl", description="pstrain: train neural networks on a parameter-server cluster")
    _global_options(p, None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help):
        c = sub.add_parser(name, help=help, description=help)
        _global_options(c, argparse.SUPPRESS)
        c.set_defaults(func=func)
        return c

    c = command("up", _up, "start a local cluster (master, ps shards, workers)")
    c.add_argument("--workers", type=_positive(int), default=2, help="worker processes (default 2)")
    c.add_argument("--ps", type=_positive(int), default=2, help="parameter-server shards (default 2)")
    c.add_argument("--port", type=int, default=50051, help="the master's port (default 50051; 0 picks a free one)")
    c.add_argument("--device", choices=DEVICES, default="cpu", help="workers' kernel backend (default cpu)")
    c.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds before a silent node counts as dead")
    c.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the cluster to come up")
    c.add_argument("--detach", action="store_true", help="return once the cluster is up; stop it with psctl down")
    c.add_argument("--state-dir", help="state file, logs and job database (default $PSTRAIN_HOME or ~/.pstrain/cluster)")

    c = command("down", _down, "stop the cluster started by psctl up")
    c.add_argument("--state-dir", help="as given to psctl up")
    c.add_argument("--timeout", type=float, default=10.0, help="seconds per role before SIGKILL (default 10)")

    c = command("submit", _submit, "submit a job file to the master")
    c.add_argument("jobfile", help="a Python file defining job()")
    _job_options(c)
    c.add_argument("--workers", dest="num_workers", type=_non_negative, help="workers to use (0: all registered)")
    c.add_argument("--shards", dest="num_shards", type=_non_negative, help="ps shards to use (0: all registered)")
    c.add_argument("--name", help="the job's name (default: the job file's name)")
    c.add_argument("--wait", action="store_true", help="follow the job to its end; exit 0 only if it SUCCEEDED")
    c.add_argument("--json", action="store_true", help="print the job's status as JSON")

    for name, func, help in (("status", _status, "show a job's status"), ("cancel", _cancel, "cancel a job")):
        c = command(name, func, help)
        c.add_argument("job", help="the job id (see psctl list)")
        c.add_argument("--json", action="store_true", help="print JSON")

    c = command("list", _list, "list the master's jobs")
    c.add_argument("--json", action="store_true", help="print JSON (a list of job statuses)")

    c = command("logs", _logs, "print a job's events and progress records")
    c.add_argument("job", help="the job id")
    c.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")

    c = command("export", _export, "write a finished job's model (.npz, for nn.load_model)")
    c.add_argument("job", help="the job id")
    c.add_argument("-o", "--output", required=True, help="the model file to write")

    c = command("train", _train, "train a job file end to end on a temporary local cluster")
    c.add_argument("jobfile", help="a Python file defining job()")
    _job_options(c)
    c.add_argument("--workers", type=_positive(int), default=2, help="worker processes (default 2)")
    c.add_argument("--ps", type=_positive(int), default=2, help="parameter-server shards (default 2)")
    c.add_argument("--device", choices=DEVICES, help="workers' kernel backend (default: the model's)")
    c.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the cluster to come up")
    c.add_argument("--in-process", action="store_true", help="train in this process, without a cluster")
    c.add_argument("-o", "--output", help="write the trained model (.npz) here")
    c.add_argument("--plot", metavar="FILE", help="write the loss and accuracy curves (PNG) here")
    c.add_argument("--json", action="store_true", help="print the result as JSON")

    c = command("plot", _plot, "draw a job's loss and accuracy curves (PNG) from its history so far")
    c.add_argument("job", help="the job id")
    c.add_argument("-o", "--output", required=True, help="the PNG to write")

    c = command("plan", _plan, "show the optimised, partitioned training graph")
    c.add_argument("jobfile", help="a Python file defining job()")
    c.add_argument("--workers", dest="num_workers", type=_non_negative, help="workers (0: all registered)")
    c.add_argument("--ps", dest="num_shards", type=_non_negative, help="ps shards (default 2 when planning locally)")
    c.add_argument("--png", help="render the plan graph to this PNG (needs Graphviz)")
    c.add_argument("--dot", help="write the plan graph's Graphviz DOT source here")
    c.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _error(message: str) -> None:
    print(f"psctl: error: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("psctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CommandError as exc:
        _error(str(exc))
        return exc.code
    except MasterUnavailable as exc:
        _error(str(exc))
        return EXIT_UNAVAILABLE
    except grpc.RpcError as exc:
        _error(describe_error(exc))
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return EXIT_UNAVAILABLE if code == grpc.StatusCode.UNAVAILABLE else EXIT_FAILED
    except ClusterError as exc:
        _error(str(exc))
        return EXIT_FAILED
    except (FileNotFoundError, ValueError, TypeError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:  # `psctl list --json | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        _error(str(exc))
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - one line for users; -v shows the traceback
        log.debug("unexpected error", exc_info=True)
        _error(f"{type(exc).__name__}: {exc}" + ("" if args.verbose else " (run with -v for the traceback)"))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
