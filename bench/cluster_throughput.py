"""Training throughput of a local pstrain cluster on the MNIST MLP, and the cost of one
push+pull, beside the in-process trainer, PyTorch and a raw gRPC echo, in one run.

    python bench/cluster_throughput.py [--quick] [--skip-torch]

Part 1 trains the MNIST MLP (784-256-128-10, ReLU, softmax cross-entropy, SGD with
momentum, global batch 512) on a fresh local cluster (``LocalProcessLauncher``, port 0,
a temporary state directory, always stopped) as 1 worker x 1 shard, 2 x 1 and 2 x 2, in
sync and async mode. Throughput comes from the master's WatchJob history: every worker
reports at the end of each epoch, so each epoch after the first is timed from the first
worker's report ending the epoch before to the last worker's report ending it (epoch 1
compiles kernels and opens connections). Worker 0 evaluates the test split at every
epoch end; the in-process trainer (``model.fit`` with ``validation_data``) and PyTorch
(a ``no_grad`` pass) do the same, two epochs after each cluster job, so every figure
carries the same work and the baselines sample the same stretch of machine load.
Ratios compare best epochs, as train_throughput.py does: other processes on a shared
machine only ever slow an epoch down.

Part 2 times one worker's step exchange against one shard (sync mode, one worker), as
workers do it: frame the gradients (``push_frame``: protos/tensorwire.py), then the
``PushRaw`` call with pull, whose reply carries the whole parameter set;
beside ``Echo`` of the same number of bytes both ways on the same server, iterations
interleaved so machine noise hits both alike. The breakdown runs each piece of the
exchange in this process, without transport.
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
BASELINE_EPOCHS = 2  # timed baseline epochs after each cluster job
TARGET_CLUSTER = 0.6  # 1 x 1 sync >= 0.6x in-process samples/s
TARGET_PUSH_PULL = 1.2  # push+pull <= 1.2x echo of the same bytes


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


def bench_cluster(workers: int, shards: int, mode: str, epochs: int, n: int) -> list[float]:
    """samples/s of each epoch after the first, for one job on a fresh local cluster."""
    from client.job import Job, job_to_spec
    from client.launcher import ClusterSpec, local_cluster
    from master.client import MasterClient

    steps_per_epoch = math.ceil(n / BATCH)
    spec = job_to_spec(Job(mlp(), "mnist", batch_size=BATCH, epochs=epochs, mode=mode), name=f"bench-{workers}x{shards}-{mode}")
    with tempfile.TemporaryDirectory(prefix="pstrain-bench-") as state_dir:
        with local_cluster(ClusterSpec(workers=workers, ps=shards, port=0, state_dir=state_dir)) as handle:
            master = MasterClient(handle.master_address)
            try:
                job = master.submit(spec)
                history, status = [], job
                for status, records in master.watch(job["id"]):
                    history += records
            finally:
                master.close()
    if status["state"] != "SUCCEEDED":
        raise RuntimeError(f"{workers}x{shards} {mode}: the job ended {status['state']}: {status['error']}")
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


def bench_push_pull(warmup: int, iters: int) -> dict:
    """Median ms of a worker's push+pull (a raw-frame PushRaw with pull, as workers send
    it) and of Echo (same bytes both ways), on a real shard process of a local cluster."""
    from client.launcher import ClusterSpec, local_cluster
    from master.client import MasterClient
    from psserver.service import ParameterServerClient

    job = "bench-push-pull"
    variables, trainable, optimizer = shard_init(job)
    grads = fake_grads(variables)
    nbytes = sum(v.nbytes for v in variables.values())
    payload = os.urandom(nbytes)
    push_pull, echo = [], []
    with tempfile.TemporaryDirectory(prefix="pstrain-bench-") as state_dir:
        with local_cluster(ClusterSpec(workers=1, ps=1, port=0, state_dir=state_dir)) as handle:
            master = MasterClient(handle.master_address)
            try:
                address = next(n["address"] for n in master.nodes() if n["role"] == "ps")
            finally:
                master.close()
            client = ParameterServerClient(address)
            try:
                # The shard is ours alone: the master knows nothing of this job.
                client.init_shard(job, 0, variables, trainable, json.dumps(optimizer), "sync", 0, [0])
                for i in range(warmup + iters):
                    t0 = time.perf_counter()
                    frame = client.push_frame(job, 0, i, grads, pull=True, min_version=i + 1)
                    version, _, params = client.read_reply(client.raw_push(frame))
                    t2 = time.perf_counter()
                    back = client.echo(payload)
                    t3 = time.perf_counter()
                    if version != i + 1 or len(back) != nbytes or sum(p.nbytes for p in params.values()) != nbytes:
                        raise RuntimeError(f"iteration {i}: version {version}, echo {len(back)} bytes, expected {nbytes}")
                    if i >= warmup:
                        push_pull.append(t2 - t0)
                        echo.append(t3 - t2)
                # CPU time and page faults per call of each side, one kind of call at a time.
                step = warmup + iters
                costs = {}
                for kind in ("push+pull", "echo"):
                    before = process_counters(handle.pids["ps"][0]), process_counters(os.getpid())
                    for _ in range(iters):
                        if kind == "echo":
                            client.echo(payload)
                        else:
                            client.raw_push(client.push_frame(job, 0, step, grads, pull=True, min_version=step + 1))
                            step += 1
                    after = process_counters(handle.pids["ps"][0]), process_counters(os.getpid())
                    costs[kind] = [tuple((a - b) / iters for a, b in zip(x, y)) if x and y else None for x, y in zip(after, before)]
                client.end_job(job)
            finally:
                client.close()
    return {
        "bytes": nbytes, "tensors": len(variables), "push_pull_ms": median_ms(push_pull),
        "echo_ms": median_ms(echo), "push_pull_deciles": statistics.quantiles(push_pull, n=10),
        "echo_deciles": statistics.quantiles(echo, n=10), "costs": costs,
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
    from protos import codec
    from psserver.config import PSConfig
    from psserver.service import ParameterServerClient, ParameterServerServicer
    from psserver.shard import Shard

    job = "bench-breakdown"
    variables, trainable, optimizer = shard_init(job)
    grads = fake_grads(variables)
    # push_request only builds a message; the channel is never used.
    client = ParameterServerClient("127.0.0.1:1")
    try:
        def request(i):
            return client.push_request(job, 0, i, grads, pull=True, min_version=i + 1)

        def make_shard():
            return Shard(job, 0, {k: v.copy() for k, v in variables.items()}, set(trainable), optimizer, "sync", workers=[0])

        rows = [("client: build request (codec.write_named -> tobytes)", timed(request, warmup, iters))]
        req = request(0)
        rows.append(("client: serialize request (SerializeToString)", timed(lambda i: req.SerializeToString(), warmup, iters)))
        wire = req.SerializeToString()
        request_type = type(req)
        rows.append(("server: parse request (FromString)", timed(lambda i: request_type.FromString(wire), warmup, iters)))
        rows.append(("server: decode grads (read_named; upb copies the bytes)", timed(lambda i: codec.read_named(req.grads), warmup, iters)))

        shard = make_shard()
        decoded = codec.read_named(req.grads)

        def apply(i):
            shard.push(0, i, decoded, {}, 1.0)
            shard.pull(0, i + 1, i + 1, 1.0)

        rows.append(("server: shard push + pull (copy, average, SGD, copy out)", timed(apply, warmup, iters)))
        shard.close()
        with make_shard() as fresh:
            _, params = fresh.pull(0, 0, 0, 1.0)

        servicer = ParameterServerServicer(PSConfig())
        servicer.shards[job] = make_shard()
        parsed = request_type.FromString(wire)

        def handle(i):
            parsed.step, parsed.min_version = i, i + 1  # the next step, without re-parsing ~1 MB
            return servicer.Push(parsed, None)

        handler_ms = timed(handle, warmup, iters)
        response = handle(warmup + iters)
        response_type = type(response)

        def encode(i):
            codec.write_named(response_type().params, params)

        rows.append(("server: encode params (codec.write_named -> tobytes)", timed(encode, warmup, iters)))
        rows.append(("server: the whole Push handler (decode + shard + encode)", handler_ms))
        servicer.close()
        rows.append(("server: serialize response (SerializeToString)", timed(lambda i: response.SerializeToString(), warmup, iters)))
        reply = response.SerializeToString()
        rows.append(("client: parse response (FromString)", timed(lambda i: response_type.FromString(reply), warmup, iters)))
        rows.append(("client: decode params (read_named; upb copies the bytes)", timed(lambda i: codec.read_named(response.params), warmup, iters)))
    finally:
        client.close()
    return rows


# ---- output ---------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 epochs per cluster job (1 timed), 50 push+pull iterations")
    p.add_argument("--skip-torch", action="store_true", help="skip PyTorch (not installed)")
    args = p.parse_args(argv)
    # The services must run the real kernels, not numba's CUDA simulator a test shell may have set.
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    epochs = 2 if args.quick else 6
    warmup, iters = (10, 50) if args.quick else (20, 200)

    from client import datasets
    from client.launcher import thread_env

    # A lone worker's thread count: what the launcher gives a 1-worker cluster, and what
    # this process's OpenBLAS/Numba pools already use (both follow the same environment).
    threads = int(thread_env("worker", 1)["OMP_NUM_THREADS"])
    data = datasets.load("mnist")
    n = len(data.x_train)

    in_process = in_process_epoch(data)
    torch_run = None if args.skip_torch else torch_epoch(data, threads)
    rows = {f"cluster {w}w x {s}ps {m}": [] for w, s, m in CONFIGS}
    baselines = {"in-process model.fit": [], "pytorch (same threads)": [], "in-process, no validation": []}
    for workers, shards, mode in CONFIGS:
        progress(f"cluster {workers} worker(s) x {shards} shard(s), {mode}, {epochs} epochs ...")
        rows[f"cluster {workers}w x {shards}ps {mode}"] = bench_cluster(workers, shards, mode, epochs, n)
        # Baseline epochs between cluster jobs: load on a shared machine drifts, and this
        # spreads the baselines over the same stretch of time as the cluster runs.
        for _ in range(BASELINE_EPOCHS):
            baselines["in-process model.fit"].append(epoch_rate(lambda: in_process(True), n))
            baselines["in-process, no validation"].append(epoch_rate(lambda: in_process(False), n))
            if torch_run is not None:
                baselines["pytorch (same threads)"].append(epoch_rate(torch_run, n))
        progress(f"  epochs {', '.join(f'{r:,.0f}' for r in rows[f'cluster {workers}w x {shards}ps {mode}'])}; baselines "
                 + "; ".join(f"{k} {', '.join(f'{r:,.0f}' for r in v[-BASELINE_EPOCHS:])}" for k, v in baselines.items() if v)
                 + f" samples/s; load {os.getloadavg()[0]:.1f}")
    progress("push+pull vs echo ...")
    exchange = bench_push_pull(warmup, iters)
    progress("push+pull breakdown ...")
    breakdown = push_pull_breakdown(warmup, iters)
    rows.update((k, v) for k, v in baselines.items() if v)
    reference = max(rows["in-process model.fit"])

    print(f"== 1. training throughput: MNIST MLP 784-256-128-10, global batch {BATCH}, SGD(0.05, momentum 0.9), "
          f"{os.cpu_count()} cores ==")
    print(f"Each cluster job trains {epochs} epochs of {n:,} samples on a fresh local cluster. An epoch's samples/s = "
          f"{n:,} / (master time from the first worker's end-of-epoch report before it to the last worker's "
          "end-of-epoch report for it), from the WatchJob history; epoch 1 (kernel compilation, connections) is left "
          "out. Worker 0 evaluates the 10,000 test samples at every epoch end, and so do the baselines, which run "
          f"{BASELINE_EPOCHS} epochs after each cluster job ({BASELINE_EPOCHS * len(CONFIGS)} epochs each, after a warm-up). "
          "Ratios compare best epochs (as train_throughput.py does): load from other processes only ever slows an "
          f"epoch, so the best is the least disturbed; median and worst show the spread. Baselines use {threads} "
          f"threads (a lone worker's); each of 2 workers gets {thread_env('worker', 2)['OMP_NUM_THREADS']}, shards and "
          "the master 1.")
    header = f"{'configuration':<28} {'best/s':>10} {'median/s':>10} {'worst/s':>10} {'epochs':>7} {'vs in-process':>14}"
    print(header)
    print("-" * len(header))
    for label, rates in rows.items():
        print(f"{label:<28} {max(rates):>10,.0f} {statistics.median(rates):>10,.0f} {min(rates):>10,.0f} {len(rates):>7} "
              f"{max(rates) / reference:>13.2f}x")

    print()
    print(f"== 2. one push+pull: {exchange['tensors']} tensors, {exchange['bytes']:,} bytes each way, 1 worker x 1 shard, "
          f"sync; median of {iters} after {warmup} warm-up ==")
    ratio = exchange["push_pull_ms"] / exchange["echo_ms"]
    pp10, pp90 = exchange["push_pull_deciles"][0] * 1e3, exchange["push_pull_deciles"][-1] * 1e3
    ec10, ec90 = exchange["echo_deciles"][0] * 1e3, exchange["echo_deciles"][-1] * 1e3
    print(f"{'':<46} {'median':>8} {'p10':>8} {'p90':>8}")
    print(f"{'push+pull (raw-frame PushRaw with pull)':<46} {exchange['push_pull_ms']:>8.3f} {pp10:>8.3f} {pp90:>8.3f} ms")
    print(f"{'raw gRPC Echo, same bytes both ways':<46} {exchange['echo_ms']:>8.3f} {ec10:>8.3f} {ec90:>8.3f} ms")
    print(f"{'ratio push+pull / echo':<46} {ratio:>7.2f}x {pp10 / ec10:>7.2f}x {pp90 / ec90:>7.2f}x")
    for side, index in (("shard process", 0), ("client (this process)", 1)):
        pp, ec = exchange["costs"]["push+pull"][index], exchange["costs"]["echo"][index]
        if pp and ec:
            print(f"{'per call, ' + side + ' (/proc, ' + str(iters) + ' calls)':<46} push+pull {pp[0] * 1e3:.2f} ms CPU, "
                  f"{pp[1]:.0f} page faults; echo {ec[0] * 1e3:.2f} ms CPU, {ec[1]:.0f} page faults")
    print("breakdown of the protobuf Push RPC (kept for compatibility; workers use PushRaw),")
    print("each piece in this process without transport (median ms):")
    accounted = 0.0
    for label, ms in breakdown:
        whole = label.startswith("server: the whole")
        print(f"  {label:<56} {ms:>8.3f}" + ("   (= the three rows above, measured together)" if whole else ""))
        if not whole and not label.startswith(("server: decode grads", "server: shard push", "server: encode params")):
            accounted += ms
    accounted += dict(breakdown)["server: the whole Push handler (decode + shard + encode)"]
    print(f"  {'sum (build + serialize/parse both ways + handler + decode)':<56} {accounted:>8.3f}")

    print(f"  {'echo, for comparison (transport + bytes copies)':<56} {exchange['echo_ms']:>8.3f}")

    print()
    print("== 3. targets ==")
    one_sync = max(rows["cluster 1w x 1ps sync"]) / reference
    print(f"{verdict(one_sync >= TARGET_CLUSTER)}  1w x 1ps sync at batch {BATCH}: {one_sync:.2f}x in-process samples/s, best epochs "
          f"(target >= {TARGET_CLUSTER}x)")
    print(f"{verdict(ratio <= TARGET_PUSH_PULL)}  push+pull: {ratio:.2f}x the raw echo of the same bytes, medians "
          f"(target <= {TARGET_PUSH_PULL}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
