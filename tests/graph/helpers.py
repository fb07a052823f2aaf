"""One helper that runs an op through pstrain's graph IR and through PyTorch.

``check_op`` builds a tiny graph from NumPy inputs, evaluates it with the NumPy
interpreter, differentiates ``sum(out * w)`` (``w`` a fixed random cotangent) and
compares

* the forward value and the gradients with the same computation in PyTorch
  (float64, autograd), and
* the gradients with central differences of the interpreted forward.

Usage::

    check_op(lambda g, a, b: g.add(a, b), torch.add, [a, b])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from graph import Graph, RunContext, Tensor, gradients
from graph.interpret import evaluate

FD_EPS = 1e-6


@dataclass
class OpCheck:
    """What ``check_op`` computed, for tests that check more."""

    graph: Graph
    out: np.ndarray
    grads: list  # per input: ndarray, or None where pstrain gave no gradient
    cotangent: np.ndarray


def check_op(
    build: Callable[..., Tensor],
    torch_fn: Callable[..., torch.Tensor] | None,
    inputs: Sequence[np.ndarray],
    *,
    grad_inputs: Sequence[int] | None = None,
    feed: bool = False,
    ctx: RunContext | None = None,
    torch_grad: bool = True,
    fd: bool = True,
    rtol: float = 1e-9,
    atol: float = 1e-11,
    fd_rtol: float = 1e-5,
    fd_atol: float = 1e-6,
    seed: int = 0,
    dtype=np.float64,
) -> OpCheck:
    """Check an op's forward and gradients against PyTorch and central differences.

    ``build(g, *tensors)`` adds the op to a graph; ``torch_fn(*torch_tensors)`` is the
    PyTorch computation of the same thing. Float inputs become variables (or
    placeholders with ``feed=True``); integer inputs become placeholders. Gradients
    are checked for ``grad_inputs`` (default: every float input); every other input
    must get ``None``. ``torch_fn=None`` skips the PyTorch comparison and
    ``torch_grad=False`` compares the forward only. ``dtype`` is the graph's float
    dtype; PyTorch always runs in float64 on the same (rounded) values.
    """
    inputs = [np.asarray(a, dtype=dtype) if np.asarray(a).dtype.kind == "f" else np.asarray(a) for a in inputs]
    floats = [i for i, a in enumerate(inputs) if a.dtype.kind == "f"]
    grad_inputs = list(floats if grad_inputs is None else grad_inputs)
    ctx = ctx or RunContext(training=True)

    g = Graph()
    tensors, feeds = [], {}
    for i, a in enumerate(inputs):
        if a.dtype.kind == "f" and not feed:
            tensors.append(g.variable(a, name=f"in{i}"))
        else:
            tensors.append(g.placeholder(a.shape, a.dtype, name=f"in{i}"))
            feeds[f"in{i}"] = a
    out = build(g, *tensors)
    rng = np.random.default_rng(seed + 1234)
    w = np.asarray(rng.standard_normal(out.shape), dtype=out.dtype)
    loss = g.reduce_sum(g.mul(out, g.constant(w)))
    grads = gradients(loss, tensors)

    def run(fetches, values):
        params = {f"in{i}": v for i, v in enumerate(values) if f"in{i}" not in feeds}
        fed = {f"in{i}": v for i, v in enumerate(values) if f"in{i}" in feeds}
        return evaluate(g, fetches, feeds=fed, params=params, ctx=ctx)

    fetched = [t for t in grads if t is not None]
    got_out, *got_grads = run([out, *fetched], inputs)
    it = iter(got_grads)
    got = [None if t is None else next(it) for t in grads]

    for i, gr in enumerate(got):
        if i in grad_inputs:
            assert gr is not None, f"input {i}: pstrain gave no gradient"
            assert gr.shape == inputs[i].shape, f"input {i}: gradient shape {gr.shape} != {inputs[i].shape}"
            assert gr.dtype == inputs[i].dtype, f"input {i}: gradient dtype {gr.dtype} != {inputs[i].dtype}"
        else:
            assert gr is None, f"input {i}: expected no gradient, got {gr}"

    if torch_fn is not None:
        tt = [
            torch.tensor(a, dtype=torch.float64, requires_grad=i in grad_inputs and torch_grad)
            if a.dtype.kind == "f"
            else torch.tensor(a)
            for i, a in enumerate(inputs)
        ]
        want = torch_fn(*tt)
        np.testing.assert_allclose(got_out, want.detach().numpy(), rtol=rtol, atol=atol, err_msg="forward vs torch")
        if torch_grad and grad_inputs:
            (want * torch.tensor(w, dtype=torch.float64)).sum().backward()
            for i in grad_inputs:
                tg = tt[i].grad
                tg = np.zeros_like(inputs[i]) if tg is None else tg.numpy()
                np.testing.assert_allclose(got[i], tg, rtol=rtol, atol=atol, err_msg=f"grad of input {i} vs torch")

    if fd:
        for i in grad_inputs:
            np.testing.assert_allclose(
                got[i],
                central_difference(lambda vals: run([loss], vals)[0], inputs, i),
                rtol=fd_rtol,
                atol=fd_atol,
                err_msg=f"grad of input {i} vs central differences",
            )
    return OpCheck(g, got_out, got, w)


def central_difference(f: Callable[[list], np.ndarray], inputs: Sequence[np.ndarray], i: int, eps: float = FD_EPS):
    """d f / d inputs[i] by central differences; ``f`` maps the list of inputs to a scalar."""
    x = np.array(inputs[i], dtype=np.float64)
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        vals = list(inputs)
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        vals[i] = plus
        fp = float(f(vals))
        vals[i] = minus
        fm = float(f(vals))
        out[idx] = (fp - fm) / (2 * eps)
    return out


def rand(rng: np.random.Generator, shape, low: float | None = None, high: float | None = None, away_from=None, gap=0.1):
    """Random float64 array: normal, or uniform in [low, high); ``away_from`` keeps every
    element at least ``gap`` from that value (for kinks like relu's or abs's at 0)."""
    if low is not None:
        a = rng.uniform(low, high, shape)
    else:
        a = rng.standard_normal(shape)
    if away_from is not None:
        d = a - away_from
        a = np.where(np.abs(d) < gap, away_from + np.where(d >= 0, gap, -gap) + d, a)
    return np.asarray(a, dtype=np.float64)


def random_shapes(seed: int, n: int, max_rank: int = 4, max_dim: int = 4) -> list[tuple]:
    """``n`` random shapes (rank 0..max_rank, dims 1..max_dim) from a seeded RNG."""
    rng = np.random.default_rng(seed)
    return [tuple(int(d) for d in rng.integers(1, max_dim + 1, size=rng.integers(0, max_rank + 1))) for _ in range(n)]
