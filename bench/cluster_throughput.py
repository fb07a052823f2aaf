"""Training throughput of a pstrain cluster on this machine (local and Ray launchers) on the
MNIST MLP, and the cost of one push+pull, beside the in-process trainer, PyTorch and a
raw gRPC echo, in one run.

    python bench/cluster_throughput.py [--quick] [--skip-torch] [--launchers local,ray] [--configs 1x1-sync,...]

Part 1 trains the MNIST MLP (784-256-128-10, ReLU, softmax cross-entropy, SGD with
momentum, global batch 512) on a fresh local cluster (``LocalProcessLauncher``, port 0,
a temporary state directory, always stopped) as 1 worker x 1 shard, 2 x 1 and 2 x 2, in
sync and async mode. Throughput comes from the master's WatchJob history: every worker
reports at the end of each epoch, so each epoch after the first is timed from the first
worker's report ending the epoch before to the last worker's report ending it (epoch 1
compiles kernels and opens connections). Worker 0 evaluates the test split at every
epoch end; the in-process trainer (``model.fit`` with ``validation_data``) and PyTorch
(a ``no_grad`` pass) do the same, two epochs after each configuration's cluster jobs,
so every figure carries the same work and the baselines sample the same stretch of
machine load.
1 x 1 sync and 2 x 2 sync also run on a cluster the Ray launcher starts (``RayLauncher``:
a private Ray head on this machine, its services on 127.0.0.1 with the local launcher's
thread counts), each right after the local run of the same configuration, so the two
see the same stretch of load; starting and stopping the head falls outside the timed
epochs, Ray's own processes (raylet, GCS) running beside the job do not. Without Ray
installed (or with ``--launchers local``) those rows are skipped. Ratios compare best
epochs, as train_throughput.py does: other processes on a shared machine only ever
slow an epoch down.

Part 2 times one worker's step exchange against one shard process (sync mode, one
worker), both ways a worker sends it: a raw frame over gRPC (protos/tensorwire.py; what
a worker on another host sends) and through shared memory (protos/shm.py; what a
worker on the shard's host sends, gRPC carrying only the call), beside an Echo of the
same bytes both ways on the same server (the protobuf Echo RPC, and a bytes-only one).
The breakdown runs each piece of the exchange in this process, without transport.
The same calls then run against a cluster with mutual TLS. The bytes-only echo over TLS
is the floor there: gRPC's secure endpoint encrypts a whole write before it sends any of
it, and decrypts on the other side after, so each direction pays its AES-GCM passes and
copies in series (about 1.5-2 ms per megabyte each way and back on a 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH = 512
CONFIGS = [(1, 1, "sync"), (1, 1, "async"), (2, 1, "sync"), (2, 1, "async"), (2, 2, "sync"), (2, 2, "async")]
RAY_CONFIGS = [(1, 1, "sync"), (2, 2, "sync")]  # also run with the Ray launcher, right after the local one
LAUNCHERS = ("local", "ray")
RAY_START_TIMEOUT = 180.0  # a private Ray head, then the actors, on a loaded machine
BASELINE_EPOCHS = 2  # timed baseline epochs after each configuration's cluster jobs
TARGET_CLUSTER = 0.6  # 1 x 1 sync >= 0.6x in-process samples/s
TARGET_RAY = 0.9  # Ray launcher >= 0.9x the local launcher's samples/s, same configuration
TARGET_PUSH_PULL = 1.2  # push+pull <= 1.2x echo of the same bytes
TARGET_TLS = 1.3  # push+pull over mutual TLS <= 1.3x plaintext


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def mlp(seed: int = 0):
    """The model train_throughput.py measures: constant learning rate, so every run does the same work."""
    from client import nn

    model = nn.Sequential(
        [nn.Dense(256, activation="relu", input_dim=784), nn.Dense(128, activation="relu"), nn.Dense(10, activation="softmax")],
        seed=seed,
    )
    model.compile(nn.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


# ---- part 1: cluster training throughput ----------------------------------------------------------
def epoch_end_times(history: list[dict], steps_per_epoch: int) -> dict[int, dict[int, float]]:
    """{epoch: {worker: master time of its end-of-epoch report}}.

    A worker's end-of-epoch-e report has step == e * steps_per_epoch and epoch == e; its
    reports inside epoch e-1 have epoch == e-1, so they never match."""
    out: dict[int, dict[int, float]] = {}
    for r in history:
        if r.get("final") or r["epoch"] < 1 or r["step"] != r["epoch"] * steps_per_epoch:
            continue
        out.setdefault(r["epoch"], {})[r["worker"]] = r["time"]
    return out


def per_epoch_rates(ends: dict[int, dict[int, float]], epochs: int, n: int) -> list[float]:
    """samples/s of epochs 2..E, each from the first worker's end of the epoch before to
    the last worker's end of this one (so a straggler counts against the cluster)."""
    missing = sorted(set(range(1, epochs + 1)) - set(ends))
    if missing:
        raise RuntimeError(f"the job history lacks end-of-epoch reports for epochs {missing}")
    return [n / (max(ends[e].values()) - min(ends[e - 1].values())) for e in range(2, epochs + 1)]


def config_name(workers: int, shards: int, mode: str) -> str:
    """``1x1-sync``: how --configs names a configuration."""
    return f"{workers}x{shards}-{mode}"


def row_label(workers: int, shards: int, mode: str, launcher: str = "local") -> str:
    return f"cluster {workers}w x {shards}ps {mode}" + ("" if launcher == "local" else f" ({launcher})")


def ray_missing() -> str | None:
    """Why the Ray launcher cannot run here (Ray does not import), or None."""
    try:
        import ray  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install: the Ray rows are skipped either way
        return f"import ray failed ({type(exc).__name__}: {exc})"
    return None


def bench_cluster(workers: int, shards: int, mode: str, epochs: int, n: int, launcher: str = "local") -> list[float]:
    """samples/s of each epoch after the first, for one job on a fresh cluster on this
    machine, started by the launcher registered as ``launcher`` (``local`` or ``ray``,
    whose private head starts and stops with the cluster)."""
    from client.job import Job, job_to_spec
    from client.launchers import ClusterSpec, get_launcher, local_cluster
    from pstrain.transport.master_client import MasterClient

    steps_per_epoch = math.ceil(n / BATCH)
    spec = job_to_spec(Job(mlp(), "mnist", batch_size=BATCH, epochs=epochs, mode=mode),
                       name=f"bench-{workers}x{shards}-{mode}-{launcher}")
    options = {"start_timeout": RAY_START_TIMEOUT} if launcher == "ray" else {}
    with tempfile.TemporaryDirectory(prefix="pstrain-bench-") as state_dir:
        cluster = ClusterSpec(workers=workers, ps=shards, port=0, state_dir=state_dir)
        with local_cluster(cluster, get_launcher(launcher, **options)) as handle:
            master = MasterClient(handle.master_address, credentials=handle.user_credentials())
            try:
                job = master.submit(spec)
                history, status = [], job
                for status, records in master.watch(job["id"]):
                    history += records
            finally:
                master.close()
    if status["state"] != "SUCCEEDED":
        raise RuntimeError(f"{workers}x{shards} {mode} ({launcher}): the job ended {status['state']}: {status['error']}")
    return per_epoch_rates(epoch_end_times(history, steps_per_epoch), epochs, n)


def in_process_epoch(data):
    """A warmed-up ``run(validation: bool)`` training one in-process epoch."""
    model = mlp()
    val = (data.x_test, data.y_test)

    def run(validation: bool) -> None:
        model.fit(data.x_train, data.y_train, batch_size=BATCH, epochs=1, validation_data=val if validation else None, verbose=0)

    run(True)  # compiles the kernels
    return run


def torch_epoch(data, threads: int):
    """A warmed-up ``run()`` training one PyTorch epoch, with the same validation pass."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    xv, yv = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    n = len(xt)

    def run() -> None:
        order = torch.randperm(n)
        for s in range(0, n, BATCH):
            idx = order[s : s + BATCH]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        with torch.no_grad():  # the validation pass the cluster's worker 0 runs every epoch
            for s in range(0, len(xv), 1000):
                torch.nn.functional.cross_entropy(model(xv[s : s + 1000]), yv[s : s + 1000])

    run()  # warm-up
    return run


def epoch_rate(run, n: int) -> float:
    t = time.perf_counter()
    run()
    return n / (time.perf_counter() - t)


# ---- part 2: one push+pull against one shard -------------------------------------------------------
def shard_init(job_name: str):
    """The variables, trainable keys and optimizer the master would give shard 0 of 1."""
    from client.job import Job, job_to_spec
    from master.planner import plan_job

    plan = plan_job(job_to_spec(Job(mlp(), "mnist", batch_size=BATCH, mode="sync"), name=job_name), 1)
    return plan.shard_tensors(0), plan.trainable_keys(), plan.optimizer


def fake_grads(variables: dict, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * 1e-4).astype(v.dtype) for k, v in variables.items()}


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def bench_push_pull(warmup: int, iters: int, tls_dir: str = "") -> dict:
    """Median seconds of one push+pull against a real shard process of a local cluster,
    each way a worker can send it, beside echoes of the same bytes; every kind of call
    in turn within each iteration, so machine noise hits them alike. ``tls_dir``: the
    cluster runs mutual TLS with those certificates."""
    from client.launchers import ClusterSpec, local_cluster
    from pstrain.transport.master_client import MasterClient
    from pstrain.transport.ps_client import ParameterServerClient

    job = "bench-push-pull"
    variables, trainable, optimizer = shard_init(job)
    grads = fake_grads(variables)
    nbytes = sum(v.nbytes for v in variables.values())
    payload = os.urandom(nbytes)
    samples = {kind: [] for kind in KINDS}
    costs = {}
    with tempfile.TemporaryDirectory(prefix="pstrain-bench-") as state_dir:
        with local_cluster(ClusterSpec(workers=1, ps=1, port=0, state_dir=state_dir, tls_dir=tls_dir)) as handle:
            master = MasterClient(handle.master_address, credentials=handle.user_credentials())
            try:
                address = next(n["address"] for n in master.nodes() if n["role"] == "ps")
            finally:
                master.close()
            node = handle.node_credentials()  # this process acts as the cluster's worker
            frames, shared = ParameterServerClient(address, credentials=node), ParameterServerClient(address, credentials=node)
            try:
                # The shard is ours alone: the master knows nothing of this job.
                frames.init_shard(job, 0, variables, trainable, json.dumps(optimizer), "sync", 0, [0])
                room = 2 * nbytes + 65536
                if not shared.use_shared_memory(job, f"pstrain-bench-{os.getpid()}", room, room):
                    raise RuntimeError("the shard could not map this process's shared memory")
                step = 0

                def push_pull(client):
                    nonlocal step
                    version, params = client.start_push_pull(job, 0, step, grads, min_version=step + 1).result()
                    step += 1
                    if version != step or sum(p.nbytes for p in params.values()) != nbytes:
                        raise RuntimeError(f"push+pull {step}: version {version}, expected {step}")

                calls = {
                    "frames": lambda: push_pull(frames),
                    "shm": lambda: push_pull(shared),
                    "echo": lambda: frames.echo(payload),
                    "raw_echo": lambda: frames.raw_echo(payload),
                }
                for i in range(warmup + iters):
                    for kind, call in calls.items():
                        t = time.perf_counter()
                        call()
                        if i >= warmup:
                            samples[kind].append(time.perf_counter() - t)
                # CPU time and page faults per call on each side, one kind of call at a time.
                for kind, call in calls.items():
                    before = process_counters(handle.pids["ps"][0]), process_counters(os.getpid())
                    for _ in range(iters):
                        call()
                    after = process_counters(handle.pids["ps"][0]), process_counters(os.getpid())
                    costs[kind] = [tuple((a - b) / iters for a, b in zip(x, y)) if x and y else None
                                   for x, y in zip(after, before)]
                frames.end_job(job)
            finally:
                frames.close()
                shared.close()
    return {"bytes": nbytes, "tensors": len(variables), "samples": samples, "costs": costs}


# What bench_push_pull times, in the order it prints them.
KINDS = {
    "frames": "push+pull, raw frame over gRPC",
    "shm": "push+pull, through shared memory",
    "echo": "Echo RPC (protobuf bytes field)",
    "raw_echo": "raw echo (bytes in, bytes out)",
}


def process_counters(pid: int) -> tuple[float, float] | None:
    """(CPU seconds, minor page faults) of a process so far, from /proc (None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command name: state is fields[0], so minflt (10th in man proc) is fields[7],
    # utime and stime (14th, 15th) are fields[11] and fields[12], in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), float(fields[7])


def timed(fn, warmup: int, iters: int) -> float:
    """Median ms of ``fn(i)`` over ``iters`` calls after ``warmup``."""
    samples = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        fn(i)
        if i >= warmup:
            samples.append(time.perf_counter() - t)
    return median_ms(samples)


def push_pull_breakdown(warmup: int, iters: int) -> list[tuple[str, float]]:
    """Each piece of one push+pull, run in this process without transport, in the order
    the exchange runs them; the servicer and shard are the ones a PS process uses."""
    from protos import tensorwire
    from protos.shm import Segment
    from psserver.config import PSConfig
    from psserver.service import ParameterServerServicer
    from psserver.shard import Shard
    from pstrain.transport.ps_client import ParameterServerClient, push_meta, push_tensors

    job = "bench-breakdown"
    variables, trainable, optimizer = shard_init(job)
    grads = fake_grads(variables)
    nbytes = sum(v.nbytes for v in variables.values())
    servicer = ParameterServerServicer(PSConfig())
    servicer.shards[job] = Shard(job, 0, {k: v.copy() for k, v in variables.items()}, set(trainable), optimizer,
                                 "sync", workers=[0])
    mine = Segment.create(f"pstrain-bench-breakdown-{os.getpid()}", 2 * nbytes + 65536, 2 * nbytes + 65536)
    theirs = Segment.attach(mine.name, mine.token, mine.request_capacity)
    servicer.segments[job] = {theirs.name: theirs}
    step = 0
    try:
        def frame(i):
            return ParameterServerClient.push_frame(job, 0, step, grads, pull=True, min_version=step + 1)

        def handle_frame(i):
            nonlocal step
            out = servicer.PushRaw(frame(i), None)
            step += 1
            return out

        def into_shm(i):
            meta = push_meta(job, 0, step, grads, None, 1.0, True, step + 1, 0.0)
            size = tensorwire.pack_into(mine.request, meta, push_tensors(grads, None))
            return tensorwire.pack({"job": job, "shm": {"name": mine.name, "size": size}}, {})

        def handle_shm(i):
            nonlocal step
            out = servicer.PushRaw(into_shm(i), None)
            step += 1
            return out

        rows = [("worker: frame the gradients (tensorwire.pack)", timed(frame, warmup, iters))]
        rows.append(("shard: PushRaw on a frame (unpack, check, SGD, frame params)",
                     timed(handle_frame, warmup, iters) - rows[0][1]))
        reply = handle_frame(0)
        rows.append(("worker: read the reply (tensorwire.unpack)", timed(lambda i: tensorwire.unpack(reply), warmup, iters)))
        rows.append(("worker: write the gradients into shared memory", timed(into_shm, warmup, iters)))
        rows.append(("shard: PushRaw through shared memory (same work, copies in place)",
                     timed(handle_shm, warmup, iters) - rows[-1][1]))
        size = tensorwire.unpack(handle_shm(0))[0]["shm_reply"]
        rows.append(("worker: read the reply from shared memory", timed(lambda i: tensorwire.unpack(mine.reply[:size]), warmup, iters)))
    finally:
        servicer.close()
        mine.close()
    return rows


# ---- output ---------------------------------------------------------------------------------------
def print_training(rows: dict, configs: list, epochs: int, n: int, threads: int) -> dict:
    """Part 1's table; returns {configuration: Ray / local (best, median, worst)}."""
    from client.launchers import thread_env

    reference = max(rows["in-process model.fit"])

    print(f"== 1. training throughput: MNIST MLP 784-256-128-10, global batch {BATCH}, SGD(0.05, momentum 0.9), "
          f"{os.cpu_count()} cores ==")
    print(f"Each cluster job trains {epochs} epochs of {n:,} samples on a fresh cluster on this machine. An epoch's samples/s = "
          f"{n:,} / (master time from the first worker's end-of-epoch report before it to the last worker's "
          "end-of-epoch report for it), from the WatchJob history; epoch 1 (kernel compilation, connections) is left "
          "out. Worker 0 evaluates the 10,000 test samples at every epoch end, and so do the baselines, which run "
          f"{BASELINE_EPOCHS} epochs after each configuration ({BASELINE_EPOCHS * len(configs)} epochs each, after a warm-up). "
          "Ratios compare best epochs (as train_throughput.py does): load from other processes only ever slows an "
          f"epoch, so the best is the least disturbed; median and worst show the spread. Baselines use {threads} "
          f"threads (a lone worker's); each of 2 workers gets {thread_env('worker', 2)['OMP_NUM_THREADS']}, shards and "
          "the master 1. Rows marked (ray) ran on a cluster the Ray launcher started (a private Ray head here, "
          "services on 127.0.0.1, the same threads), right after the local row above them; ray / local divides "
          "the Ray row's best, median and worst epoch by the local row's.")
    header = f"{'configuration':<28} {'best/s':>10} {'median/s':>10} {'worst/s':>10} {'epochs':>7} {'vs in-process':>14}"
    print(header)
    print("-" * len(header))
    for label, rates in rows.items():
        print(f"{label:<28} {max(rates):>10,.0f} {statistics.median(rates):>10,.0f} {min(rates):>10,.0f} {len(rates):>7} "
              f"{max(rates) / reference:>13.2f}x")
    # Ray launcher / local launcher, per configuration both measured: {config: (best, median, worst)}.
    ray_vs_local = {}
    for workers, shards, mode in configs:
        local, ray = rows.get(row_label(workers, shards, mode)), rows.get(row_label(workers, shards, mode, "ray"))
        if local and ray:
            ray_vs_local[f"{workers}w x {shards}ps {mode}"] = (
                max(ray) / max(local), statistics.median(ray) / statistics.median(local), min(ray) / min(local))
    if ray_vs_local:
        print("-" * len(header))
        for config, (best, median, worst) in ray_vs_local.items():
            print(f"{'ray / local, ' + config:<28} {best:>9.2f}x {median:>9.2f}x {worst:>9.2f}x")
    return ray_vs_local


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 epochs per cluster job (1 timed), 50 push+pull iterations")
    p.add_argument("--exchange-only", action="store_true", help="only part 2: one push+pull, plaintext and TLS")
    p.add_argument("--skip-torch", action="store_true", help="skip PyTorch (not installed)")
    p.add_argument("--launchers", default=",".join(LAUNCHERS), metavar="NAMES",
                   help="launchers to measure, comma-separated (default local,ray; ray runs "
                        f"{', '.join(config_name(*c) for c in RAY_CONFIGS)} only; local alone skips the Ray rows)")
    p.add_argument("--configs", default=",".join(config_name(*c) for c in CONFIGS), metavar="NAMES",
                   help="cluster configurations to run, comma-separated (default all: "
                        f"{', '.join(config_name(*c) for c in CONFIGS)})")
    args = p.parse_args(argv)
    launchers = [name.strip() for name in args.launchers.split(",") if name.strip()]
    if not launchers or set(launchers) - set(LAUNCHERS):
        p.error(f"--launchers={args.launchers!r}; allowed: a comma-separated subset of {', '.join(LAUNCHERS)}")
    by_name = {config_name(*c): c for c in CONFIGS}
    wanted = {name.strip() for name in args.configs.split(",") if name.strip()}
    if not wanted or wanted - set(by_name):
        p.error(f"--configs={args.configs!r}; allowed: a comma-separated subset of {', '.join(by_name)}")
    configs = [] if args.exchange_only else [c for c in CONFIGS if config_name(*c) in wanted]
    # The services must run the real kernels, not numba's CUDA simulator a test shell may have set.
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    ray_note = None
    if "ray" in launchers:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60's token auth would refuse the private head
        ray_note = ray_missing()
        if ray_note:
            progress(f"skipping the Ray launcher rows: {ray_note}")
            launchers.remove("ray")
    epochs = 2 if args.quick else 6
    warmup, iters = (10, 50) if args.quick else (20, 200)

    from client import datasets
    from client.launchers import ClusterError, thread_env

    # A lone worker's thread count: what the launcher gives a 1-worker cluster, and what
    # this process's OpenBLAS/Numba pools already use (both follow the same environment).
    threads = int(thread_env("worker", 1)["OMP_NUM_THREADS"])
    data = datasets.load("mnist")
    n = len(data.x_train)

    in_process = in_process_epoch(data)
    torch_run = None if args.skip_torch or not configs else torch_epoch(data, threads)
    rows: dict[str, list[float]] = {}  # table order: each configuration's local row, then its Ray row
    ray_failed: dict[str, str] = {}  # configuration -> why its Ray cluster did not start
    baselines = {"in-process model.fit": [], "pytorch (same threads)": [], "in-process, no validation": []}
    for workers, shards, mode in configs:
        # The Ray launcher right after the local one: both see the same stretch of load.
        for launcher in [name for name in LAUNCHERS if name in launchers
                         and (name == "local" or (workers, shards, mode) in RAY_CONFIGS)]:
            progress(f"cluster {workers} worker(s) x {shards} shard(s), {mode}, {launcher} launcher, {epochs} epochs ...")
            label = row_label(workers, shards, mode, launcher)
            try:
                rows[label] = bench_cluster(workers, shards, mode, epochs, n, launcher)
            except ClusterError as exc:
                if launcher == "local":
                    raise
                # The Ray cluster did not start (no `ray` command, head or actors too slow):
                # report it and keep the rest of the run.
                ray_failed[config_name(workers, shards, mode)] = str(exc).splitlines()[0]
                progress(f"  the Ray cluster did not start: {exc}")
                continue
            progress(f"  {launcher}: epochs {', '.join(f'{r:,.0f}' for r in rows[label])} samples/s")
        # Baseline epochs between cluster jobs: load on a shared machine drifts, and this
        # spreads the baselines over the same stretch of time as the cluster runs.
        for _ in range(BASELINE_EPOCHS):
            baselines["in-process model.fit"].append(epoch_rate(lambda: in_process(True), n))
            baselines["in-process, no validation"].append(epoch_rate(lambda: in_process(False), n))
            if torch_run is not None:
                baselines["pytorch (same threads)"].append(epoch_rate(torch_run, n))
        progress("  baselines "
                 + "; ".join(f"{k} {', '.join(f'{r:,.0f}' for r in v[-BASELINE_EPOCHS:])}" for k, v in baselines.items() if v)
                 + f" samples/s; load {os.getloadavg()[0]:.1f}")
    progress("push+pull vs echo ...")
    exchange = bench_push_pull(warmup, iters)
    progress("push+pull vs echo, mutual TLS ...")
    from pstrain.transport.security import make_certificates

    with tempfile.TemporaryDirectory(prefix="pstrain-bench-tls-") as tls_dir:
        make_certificates(tls_dir)
        secured = bench_push_pull(warmup, iters, tls_dir=tls_dir)
    progress("push+pull breakdown ...")
    breakdown = push_pull_breakdown(warmup, iters)
    rows.update((k, v) for k, v in baselines.items() if v)
    ray_vs_local = print_training(rows, configs, epochs, n, threads) if configs else {}
    print()
    print(f"== 2. one push+pull: {exchange['tensors']} tensors, {exchange['bytes']:,} bytes each way, 1 worker x 1 shard, "
          f"sync; median of {iters} after {warmup} warm-up, every kind in turn each iteration ==")
    med = {k: median_ms(v) for k, v in exchange["samples"].items()}
    dec = {k: statistics.quantiles(v, n=10) for k, v in exchange["samples"].items()}
    print(f"{'':<42} {'median':>8} {'p10':>8} {'p90':>8}   {'shard CPU':>9} {'this CPU':>9} (ms per call)")
    for kind, label in KINDS.items():
        shard_cost, own_cost = exchange["costs"][kind]
        cpu = f"{shard_cost[0] * 1e3:>9.2f} {own_cost[0] * 1e3:>9.2f}" if shard_cost and own_cost else ""
        print(f"{label:<42} {med[kind]:>8.3f} {dec[kind][0] * 1e3:>8.3f} {dec[kind][-1] * 1e3:>8.3f}   {cpu}")
    ratio = med["frames"] / med["echo"]
    print(f"{'frames / Echo RPC':<42} {ratio:>7.2f}x {dec['frames'][0] / dec['echo'][0]:>7.2f}x "
          f"{dec['frames'][-1] / dec['echo'][-1]:>7.2f}x")
    print(f"{'frames / raw echo':<42} {med['frames'] / med['raw_echo']:>7.2f}x")
    print(f"{'shared memory / raw echo':<42} {med['shm'] / med['raw_echo']:>7.2f}x")
    print("Workers use shared memory with shards on their host (the local cluster) and frames otherwise.")
    tls_med = {k: median_ms(v) for k, v in secured["samples"].items()}
    print("The same on a cluster running mutual TLS (psctl certs init; every call also carries the node token check):")
    for kind, label in KINDS.items():
        print(f"{label + ', TLS':<42} {tls_med[kind]:>8.3f}   {tls_med[kind] / med[kind]:>5.2f}x plaintext")
    tls_ratio = tls_med["frames"] / med["frames"]
    print(f"TLS floor: the bytes-only echo of the same bytes costs {tls_med['raw_echo'] - med['raw_echo']:+.3f} ms with TLS "
          f"({tls_med['raw_echo'] / med['raw_echo']:.2f}x), before any pstrain code runs; push+pull "
          f"{tls_med['frames'] - med['frames']:+.3f} ms")
    print("Pieces of one push+pull in this process, without transport (median ms):")
    for label, ms in breakdown:
        print(f"  {label:<68} {ms:>8.3f}")

    print()
    print("== 3. targets ==")
    if row_label(1, 1, "sync") in rows:
        one_sync = max(rows[row_label(1, 1, "sync")]) / max(rows["in-process model.fit"])
        print(f"{verdict(one_sync >= TARGET_CLUSTER)}  1w x 1ps sync at batch {BATCH}: {one_sync:.2f}x in-process samples/s, "
              f"best epochs (target >= {TARGET_CLUSTER}x)")
    for config, (best, _, _) in ray_vs_local.items():
        print(f"{verdict(best >= TARGET_RAY)}  Ray launcher, {config}: {best:.2f}x the local launcher's samples/s, best epochs "
              f"(target >= {TARGET_RAY}x: within 10%)")
    for config, why in ray_failed.items():
        print(f"{verdict(False)}  Ray launcher, {config}: the Ray cluster did not start: {why}")
    if ray_note:
        print(f"skipped  Ray launcher within 10% of the local launcher: {ray_note}")
    print(f"{verdict(ratio <= TARGET_PUSH_PULL)}  push+pull over gRPC (raw frames): {ratio:.2f}x the Echo RPC of the same "
          f"bytes, medians (target <= {TARGET_PUSH_PULL}x; against a bytes-only echo {med['frames'] / med['raw_echo']:.2f}x)")
    print(f"{verdict(tls_ratio <= TARGET_TLS)}  push+pull over gRPC with mutual TLS: {tls_ratio:.2f}x plaintext, medians "
          f"(target <= {TARGET_TLS}x; shared memory {tls_med['shm'] / med['shm']:.2f}x)")
    return 0


if __name__ == "__main__":
    from client.cli.common import sigterm_interrupts

    with sigterm_interrupts():  # killed (e.g. by timeout): the local cluster is stopped, not left running
        sys.exit(main())
