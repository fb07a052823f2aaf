"""The CUDA backend: Numba-CUDA kernels on device arrays.

Same interface as ``pstrain.kernels.reference``: ``kernel(node)`` returns
``k(ctx, out, *inputs)`` that writes ``node``'s result into the preallocated device
array ``out``, or ``None`` for ops (or attrs) without a CUDA kernel, which the
executor then runs through the NumPy reference on the host. The same code runs on
a GPU and, with ``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported, in Numba's
simulator (how CI tests it).

Usage::

    backend = CudaBackend()
    k = backend.kernel(node)                  # e.g. node.op == "relu"
    x = backend.asarray(host_x)
    out = backend.empty(host_x.shape, host_x.dtype)
    k(ctx, out, x)
    y = backend.to_host(out)

Kernels compute in the inputs' dtype where it matters for speed (matmul tiles and
accumulator); elementwise, row-wise and reduction kernels may round through
float64 (Numba types Python float literals as float64, and reductions accumulate
in float64 on purpose). Results match the reference to the dtype's precision.
"""
from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import cuda

from pstrain.kernels.reference import reference_kernel

TPB = 256  # threads per block of 1-D launches
TILE = 16  # matmul tile edge: TILE x TILE threads per block
TILE_ROW = TILE + 1  # shared tile row, padded (a shared-array shape must be a constant)
SUM_CHUNK = 16 * TPB  # elements one block sums when a reduction is split over blocks
ENOUGH_BLOCKS = 128  # blocks that already keep a large GPU busy (an H100 has 132 SMs)
MAX_RANK = 4  # broadcasting binary kernels index 4-D views


def _blocks(n: int) -> int:
    return (n + TPB - 1) // TPB


def _flat(a):
    """1-D view of a C-contiguous device array (0-d arrays become one element)."""
    return a.reshape(max(a.size, 1)) if a.ndim != 1 else a


def _as4d(a):
    """4-D view with leading size-1 axes, as NumPy broadcasting aligns shapes."""
    return a.reshape((1,) * (MAX_RANK - a.ndim) + tuple(a.shape))


def _is_float(dtype) -> bool:
    return np.dtype(dtype) in (np.float32, np.float64)


# ---- elementwise: device functions f(x, p) and f(a, b, p); p is an op attr (alpha) or 0 -----------
@cuda.jit(device=True)
def _neg(x, p):
    return -x


@cuda.jit(device=True)
def _exp(x, p):
    return math.exp(x)


@cuda.jit(device=True)
def _log(x, p):
    return math.log(x)


@cuda.jit(device=True)
def _sqrt(x, p):
    return math.sqrt(x)


@cuda.jit(device=True)
def _square(x, p):
    return x * x


@cuda.jit(device=True)
def _abs(x, p):
    return abs(x)


@cuda.jit(device=True)
def _sign(x, p):
    if x > 0:
        return 1.0
    if x < 0:
        return -1.0
    return x  # 0 stays 0, NaN stays NaN, as np.sign


@cuda.jit(device=True)
def _step(x, p):
    return 1.0 if x > 0 else 0.0


@cuda.jit(device=True)
def _sigmoid(x, p):
    # Stable for large |x|: exp of a non-positive number only.
    e = math.exp(-abs(x))
    return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)


@cuda.jit(device=True)
def _tanh(x, p):
    return math.tanh(x)


@cuda.jit(device=True)
def _relu(x, p):
    return 0.0 if x < 0 else x  # NaN passes through, as np.maximum(x, 0)


@cuda.jit(device=True)
def _leaky_relu(x, p):
    return x if x > 0 else x * p


@cuda.jit(device=True)
def _identity(x, p):
    return x


@cuda.jit(device=True)
def _add(a, b, p):
    return a + b


@cuda.jit(device=True)
def _sub(a, b, p):
    return a - b


@cuda.jit(device=True)
def _mul(a, b, p):
    return a * b


@cuda.jit(device=True)
def _div(a, b, p):
    return a / b


@cuda.jit(device=True)
def _maximum(a, b, p):
    return a if a > b or a != a else b  # NaN wins, as np.maximum


@cuda.jit(device=True)
def _relu_grad(dy, y, p):
    return dy if y > 0 else 0.0


@cuda.jit(device=True)
def _sigmoid_grad(dy, y, p):
    return dy * y * (1 - y)


@cuda.jit(device=True)
def _tanh_grad(dy, y, p):
    return dy * (1 - y * y)


@cuda.jit(device=True)
def _leaky_relu_grad(dy, x, p):
    return dy if x > 0 else dy * p


# (Kernels avoid the builtins min and max: Numba 0.68 fails to compile them for CUDA.)
@cuda.jit(device=True)
def _bi(i, n):
    return i if n > 1 else 0  # a size-1 axis broadcasts


@cuda.jit(device=True)
def _bcast(x, i0, i1, i2, i3):
    return x[_bi(i0, x.shape[0]), _bi(i1, x.shape[1]), _bi(i2, x.shape[2]), _bi(i3, x.shape[3])]


def _map_kernel(f):
    """Kernel applying unary ``f`` to 1-D ``x`` into ``out``, one thread per element."""

    @cuda.jit
    def k(x, out, p):
        i = cuda.grid(1)
        if i < out.size:
            out[i] = f(x[i], p)

    return k


def _zip_kernel(f):
    """Kernel applying binary ``f`` to broadcast 4-D views ``a``, ``b`` into 4-D ``out``."""

    @cuda.jit
    def k(a, b, out, p):
        i = cuda.grid(1)
        n0, n1, n2, n3 = out.shape
        if i < n0 * n1 * n2 * n3:
            i3 = i % n3
            r = i // n3
            i2 = r % n2
            r //= n2
            i1 = r % n1
            i0 = r // n1
            out[i0, i1, i2, i3] = f(_bcast(a, i0, i1, i2, i3), _bcast(b, i0, i1, i2, i3), p)

    return k


_UNARY = {
    "neg": _neg,
    "exp": _exp,
    "log": _log,
    "sqrt": _sqrt,
    "square": _square,
    "abs": _abs,
    "sign": _sign,
    "step": _step,
    "sigmoid": _sigmoid,
    "tanh": _tanh,
    "relu": _relu,
    "leaky_relu": _leaky_relu,
}
_BINARY = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "div": _div,
    "maximum": _maximum,
    "relu_grad": _relu_grad,
    "sigmoid_grad": _sigmoid_grad,
    "tanh_grad": _tanh_grad,
    "leaky_relu_grad": _leaky_relu_grad,
}
# One kernel object per op, built once: Numba compiles it per dtype signature on first launch.
_MAP_KERNELS = {op: _map_kernel(f) for op, f in _UNARY.items()}
_ZIP_KERNELS = {op: _zip_kernel(f) for op, f in _BINARY.items()}


def _param(node, out):
    """The op's scalar attr (only alpha, for now) in the output's dtype, or 0."""
    return out.dtype.type(node.attrs.get("alpha", 0))


def _unary(node):
    if np.dtype(node.dtype).kind not in "fiu":
        return None
    kern = _MAP_KERNELS[node.op]

    def k(ctx, out, x):
        if out.size:
            kern[_blocks(out.size), TPB](_flat(x), _flat(out), _param(node, out))

    return k


def _binary(node):
    if np.dtype(node.dtype).kind not in "fiu" or len(node.shape) > MAX_RANK:
        return None
    kern = _ZIP_KERNELS[node.op]

    def k(ctx, out, a, b):
        if out.size:
            kern[_blocks(out.size), TPB](_as4d(a), _as4d(b), _as4d(out), _param(node, out))

    return k


# ---- matmul (and the fused dense layer): shared-memory tiles, bias + activation epilogue --------
_ACTIVATIONS = {"linear": _identity, "relu": _relu, "sigmoid": _sigmoid, "tanh": _tanh}


@functools.cache
def _matmul_kernel(dtype: np.dtype, act: str = "linear", has_bias: bool = False):
    """``out = act(op(a) @ op(b) [+ bias])`` for 2-D ``a``, ``b``; ``op`` transposes when
    ``ta`` / ``tb`` is set. One TILE x TILE block per output tile."""
    tile_type = numba.from_dtype(dtype)
    zero = dtype.type(0)  # a constant of the tile dtype keeps the accumulator in it
    activate = _ACTIVATIONS[act]

    @cuda.jit
    def k(a, b, bias_vec, out, ta, tb):
        # +1 column: the transposed stores below write columns, and padding puts each
        # element of a column in a different shared-memory bank.
        sa = cuda.shared.array((TILE, TILE_ROW), tile_type)
        sb = cuda.shared.array((TILE, TILE_ROW), tile_type)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row0 = cuda.blockIdx.y * TILE
        col0 = cuda.blockIdx.x * TILE
        m, n = out.shape
        kdim = a.shape[0] if ta else a.shape[1]
        acc = zero
        for k0 in range(0, kdim, TILE):
            # Stage op(a)[row0:+TILE, k0:+TILE] as sa[row, k] and op(b)[k0:+TILE, col0:+TILE]
            # as sb[k, col]. Neighbouring threads (tx) read neighbouring addresses whether or
            # not the input is transposed, so global loads stay coalesced.
            if ta:
                r = row0 + tx
                kk = k0 + ty
                sa[tx, ty] = a[kk, r] if r < m and kk < kdim else zero
            else:
                r = row0 + ty
                kk = k0 + tx
                sa[ty, tx] = a[r, kk] if r < m and kk < kdim else zero
            if tb:
                c = col0 + ty
                kk = k0 + tx
                sb[tx, ty] = b[c, kk] if c < n and kk < kdim else zero
            else:
                c = col0 + tx
                kk = k0 + ty
                sb[ty, tx] = b[kk, c] if c < n and kk < kdim else zero
            cuda.syncthreads()
            for j in range(TILE):
                acc += sa[ty, j] * sb[j, tx]
            cuda.syncthreads()
        row = row0 + ty
        col = col0 + tx
        if row < m and col < n:
            if has_bias:
                acc += bias_vec[col]
            out[row, col] = activate(acc, zero)

    return k


def _launch_matmul(out, a, b, ta=False, tb=False, bias=None, act="linear"):
    if out.size == 0:
        return
    kern = _matmul_kernel(np.dtype(out.dtype), act, bias is not None)
    m, n = out.shape
    grid = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
    # Without a bias, ``out`` stands in for the unused bias argument.
    kern[grid, (TILE, TILE)](a, b, out if bias is None else _flat(bias), out, bool(ta), bool(tb))


def _matmul(node):
    if len(node.shape) != 2 or not _is_float(node.dtype):
        return None  # batched matmul runs on the host
    ta, tb = node.attrs["transpose_a"], node.attrs["transpose_b"]

    def k(ctx, out, a, b):
        _launch_matmul(out, a, b, ta, tb)

    return k


def _fused_dense(act):
    def k(ctx, out, x, w, b):
        _launch_matmul(out, x, w, bias=b, act=act)

    return k


# ---- reductions: any contiguous run of axes, as the middle axis of an (A, R, B) view ------------
@cuda.jit
def _sum_walk_kernel(x, out, scale):
    """``out[a, 0, b] = scale * sum(x[a, :, b])``, one thread per output. Neighbouring
    threads read neighbouring ``b``, so column sums (the bias gradient) load coalesced."""
    i = cuda.grid(1)
    nb = x.shape[2]
    if i < x.shape[0] * nb:
        ia = i // nb
        ib = i % nb
        acc = 0.0
        for r in range(x.shape[1]):
            acc += x[ia, r, ib]
        out[ia, 0, ib] = acc * scale


@cuda.jit
def _sum_tree_kernel(x, out, chunk, scale):
    """``out[a, s, b] = scale * sum(x[a, s*chunk : (s+1)*chunk, b])``: block (a*B + b, s)
    strides over its chunk, then halves a shared buffer until one sum is left."""
    buf = cuda.shared.array(TPB, numba.float64)
    tid = cuda.threadIdx.x
    nb = x.shape[2]
    ia = cuda.blockIdx.x // nb
    ib = cuda.blockIdx.x % nb
    s = cuda.blockIdx.y
    start = s * chunk
    stop = start + chunk
    if stop > x.shape[1]:
        stop = x.shape[1]
    acc = 0.0
    for r in range(start + tid, stop, TPB):
        acc += x[ia, r, ib]
    buf[tid] = acc
    cuda.syncthreads()
    half = TPB // 2
    while half > 0:
        if tid < half:
            buf[tid] += buf[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        out[ia, s, ib] = buf[0] * scale


def _sum_middle(x3, out3, scale=1.0):
    """``out3 (A, 1, B) = scale * x3 (A, R, B).sum(axis=1)``, accumulated in float64."""
    a, r, b = x3.shape
    if a * b == 0:
        return
    if r == 1 and scale == 1.0:
        out3.copy_to_device(x3)
    elif r <= TPB or a * b >= ENOUGH_BLOCKS * TPB:
        # Short sums, or enough of them to fill the GPU with one thread each.
        _sum_walk_kernel[_blocks(a * b), TPB](x3, out3, scale)
    elif a * b >= ENOUGH_BLOCKS or r <= SUM_CHUNK:
        _sum_tree_kernel[(a * b, 1), TPB](x3, out3, r, scale)
    else:
        # Few long sums (a total, say): split each over blocks, then sum the parts.
        parts = (r + SUM_CHUNK - 1) // SUM_CHUNK
        partial = cuda.device_array((a, parts, b), np.float64)
        _sum_tree_kernel[(a * b, parts), TPB](x3, partial, SUM_CHUNK, 1.0)
        _sum_walk_kernel[_blocks(a * b), TPB](partial, out3, scale)


def _split_reduced(shape, axes):
    """``(A, R, B)`` such that summing ``axes`` of a C-contiguous array of ``shape`` is
    summing axis 1 of its ``(A, R, B)`` view; None when the reduced axes are not one
    contiguous run (size-1 axes don't count either way)."""
    kept = [i for i, d in enumerate(shape) if d != 1]
    dims = [shape[i] for i in kept]
    reduced = [j for j, i in enumerate(kept) if i in axes]
    if not reduced:
        return math.prod(dims), 1, 1
    lo, hi = reduced[0], reduced[-1] + 1
    if hi - lo != len(reduced):
        return None
    return math.prod(dims[:lo]), math.prod(dims[lo:hi]), math.prod(dims[hi:])


def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = [axis] if isinstance(axis, (int, np.integer)) else axis
    return tuple(int(a) % ndim for a in axes)


def _reduce(mean):
    def factory(node):
        if not _is_float(node.dtype):
            return None
        axis = node.attrs["axis"]
        on_host = reference_kernel(node)

        def k(ctx, out, x):
            plan = _split_reduced(x.shape, _norm_axes(axis, x.ndim))
            if plan is None:  # e.g. axes (0, 2) of a 3-D tensor: rare, so the host does it
                return _via_host(on_host, ctx, out, x)
            a, r, b = plan
            scale = (1.0 / r if r else math.nan) if mean else 1.0
            _sum_middle(x.reshape(a, r, b), out.reshape(a, 1, b), scale)

        return k

    return factory


def _sum_to(node):
    if not _is_float(node.dtype):
        return None
    on_host = reference_kernel(node)

    def k(ctx, out, dy, x):
        lead = dy.ndim - out.ndim
        axes = set(range(lead)) | {
            lead + i for i, d in enumerate(out.shape) if d == 1 and dy.shape[lead + i] != 1
        }
        plan = _split_reduced(dy.shape, axes)
        if plan is None:
            return _via_host(on_host, ctx, out, dy, x)
        a, r, b = plan
        _sum_middle(dy.reshape(a, r, b), out.reshape(a, 1, b))

    return k


def _via_host(host_kernel, ctx, out, *inputs):
    result = np.empty(out.shape, out.dtype)
    host_kernel(ctx, result, *(x.copy_to_host() for x in inputs))
    out.copy_to_device(result)


# ---- softmax and the fused softmax cross-entropy: one thread per row ------------------------------
# Rows are short in practice (the classes of a classifier head), so a thread walks a whole row.
@cuda.jit(device=True)
def _row_max_sumexp(z, r):
    mx = z[r, 0]
    for j in range(1, z.shape[1]):
        v = z[r, j]
        if v > mx or v != v:  # NaN wins, as np.max
            mx = v
    s = 0.0
    for j in range(z.shape[1]):
        s += math.exp(z[r, j] - mx)
    return mx, s


@cuda.jit
def _softmax_kernel(z, out):
    r = cuda.grid(1)
    if r < z.shape[0]:
        mx, s = _row_max_sumexp(z, r)
        for j in range(z.shape[1]):
            out[r, j] = math.exp(z[r, j] - mx) / s


@cuda.jit
def _xent_rows_kernel(z, labels, loss):
    """``loss[r] = -log softmax(z[r])[labels[r]]``; an out-of-range label gives NaN
    rather than a read out of bounds."""
    r = cuda.grid(1)
    if r < z.shape[0]:
        t = labels[r]
        if 0 <= t < z.shape[1]:
            mx, s = _row_max_sumexp(z, r)
            loss[r] = math.log(s) - (z[r, t] - mx)
        else:
            loss[r] = math.nan


@cuda.jit
def _xent_grad_kernel(dloss, z, labels, inv_rows, out):
    """``out = (softmax(z) - onehot(labels)) * dloss / rows``."""
    r = cuda.grid(1)
    if r < z.shape[0]:
        g = dloss[0] * inv_rows
        t = labels[r]
        mx, s = _row_max_sumexp(z, r)
        for j in range(z.shape[1]):
            p = math.exp(z[r, j] - mx) / s
            out[r, j] = (p - 1.0 if j == t else p) * g


def _rows(z):
    """``z`` as a 2-D (rows, classes) view: every axis but the last is a row."""
    k = z.shape[z.ndim - 1]  # (the simulator's shapes take no negative index)
    return z.reshape(z.size // k if k else 0, k)


def _softmax(node):
    if not _is_float(node.dtype) or node.attrs["axis"] not in (-1, len(node.shape) - 1) or not node.shape:
        return None

    def k(ctx, out, x):
        if out.size:
            z = _rows(x)
            _softmax_kernel[_blocks(z.shape[0]), TPB](z, _rows(out))

    return k


def _sparse_xent(node):
    if not node.attrs["from_logits"] or not _is_float(node.dtype):
        return None  # the probability form clips like Keras; the host does it

    def k(ctx, out, logits, labels):
        z = _rows(logits)
        n = z.shape[0]
        loss = cuda.device_array(n, np.float64)
        if n:
            _xent_rows_kernel[_blocks(n), TPB](z, _flat(labels), loss)
        _sum_middle(loss.reshape(1, n, 1), out.reshape(1, 1, 1), 1.0 / max(n, 1))

    return k


def _sparse_xent_grad(node):
    if not node.attrs["from_logits"] or not _is_float(node.dtype):
        return None

    def k(ctx, out, dloss, logits, labels):
        z = _rows(logits)
        n = z.shape[0]
        if n and z.shape[1]:
            inv_rows = out.dtype.type(1.0 / n)
            _xent_grad_kernel[_blocks(n), TPB](_flat(dloss), z, _flat(labels), inv_rows, _rows(out))

    return k


# ---- optimizers: in place, one thread per parameter ------------------------------------------------
@cuda.jit
def _sgd_kernel(p, g, lr):
    i = cuda.grid(1)
    if i < p.size:
        p[i] -= lr * g[i]


@cuda.jit
def _sgd_momentum_kernel(p, g, v, lr, momentum):
    i = cuda.grid(1)
    if i < p.size:
        v[i] = momentum * v[i] + g[i]
        p[i] -= lr * v[i]


@cuda.jit
def _adam_kernel(p, g, m, v, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, corr1, corr2):
    i = cuda.grid(1)
    if i < p.size:
        m[i] = beta1 * m[i] + one_minus_beta1 * g[i]
        v[i] = beta2 * v[i] + one_minus_beta2 * g[i] * g[i]
        p[i] -= lr * (m[i] / corr1) / (math.sqrt(v[i] / corr2) + eps)


def sgd_update(param, grad, velocity, lr, momentum):
    """PyTorch's rule: v = momentum * v + g; p -= lr * v (plain SGD when momentum == 0)."""
    if param.size == 0:
        return
    # Scalars in the parameter dtype keep float32 updates in float32, as NumPy's are.
    dt = param.dtype.type
    if momentum:
        _sgd_momentum_kernel[_blocks(param.size), TPB](
            _flat(param), _flat(grad), _flat(velocity), dt(lr), dt(momentum)
        )
    else:
        _sgd_kernel[_blocks(param.size), TPB](_flat(param), _flat(grad), dt(lr))


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, t):
    """Adam (Kingma & Ba, PyTorch's placement of eps) at step t (1-based)."""
    if param.size == 0:
        return
    dt = param.dtype.type
    _adam_kernel[_blocks(param.size), TPB](
        _flat(param), _flat(grad), _flat(m), _flat(v),
        dt(lr), dt(beta1), dt(1 - beta1), dt(beta2), dt(1 - beta2), dt(eps),
        dt(1 - beta1**t), dt(1 - beta2**t),
    )  # fmt: skip


# ---- dispatch ----------------------------------------------------------------------------------------
# op -> factory(node) -> k(ctx, out, *inputs), or None when these attrs/dtypes have no kernel
_KERNELS = {
    **{op: _unary for op in _UNARY},
    **{op: _binary for op in _BINARY},
    "matmul": _matmul,
    "reduce_sum": _reduce(mean=False),
    "reduce_mean": _reduce(mean=True),
    "sum_to": _sum_to,
    "softmax": _softmax,
    "sparse_categorical_crossentropy": _sparse_xent,
    "sparse_categorical_crossentropy_grad": _sparse_xent_grad,
}


class CudaBackend:
    name = "cuda"

    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype)

    def asarray(self, a):
        if cuda.devicearray.is_cuda_ndarray(a):
            return a
        return cuda.to_device(np.asarray(a, order="C"))

    def to_host(self, a):
        return a.copy_to_host() if cuda.devicearray.is_cuda_ndarray(a) else np.asarray(a)

    def zeros(self, shape, dtype):
        return cuda.to_device(np.zeros(shape, dtype))

    def all_finite(self, a) -> bool:
        """True when ``a`` holds no NaN or Inf (checked on a host copy)."""
        host = self.to_host(a)
        return host.size == 0 or bool(np.isfinite(np.max(host)) and np.isfinite(np.min(host)))

    def copy_into(self, dst, src):
        """Overwrite device array ``dst`` with ``src`` (host or device, same shape)."""
        if cuda.devicearray.is_cuda_ndarray(src):
            dst.copy_to_device(src)
        else:
            dst.copy_to_device(np.ascontiguousarray(np.asarray(src, dtype=dst.dtype)))

    def kernel(self, node):
        factory = _KERNELS.get(node.op)
        return factory(node) if factory else None

    def fused(self, pattern, **attrs):
        if pattern == "dense" and set(attrs) <= {"act"} and attrs.get("act", "linear") in _ACTIVATIONS:
            return _fused_dense(attrs.get("act", "linear"))
        return None

    def optimizer_kernels(self):
        return {"sgd": sgd_update, "adam": adam_update}
