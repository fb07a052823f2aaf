"""Tests for pstrain.runtime.placement: key-range placement of variables on PS shards.

The invariants, checked for the MNIST MLP and for seeded random variable sets:
every variable's slices cover its rows exactly once and in order, every shard holds
total/S bytes within one row's bytes, shard bytes add up, and the same input gives
the same placement.
"""
from __future__ import annotations

import numpy as np
import pytest

from pstrain.runtime.placement import Placement, Slice, assemble, format_placement, layout, place, split

MNIST_MLP = {
    "dense/kernel": ((784, 256), np.float32),
    "dense/bias": ((256,), np.float32),
    "dense_1/kernel": ((256, 128), np.float32),
    "dense_1/bias": ((128,), np.float32),
    "dense_2/kernel": ((128, 10), np.float32),
    "dense_2/bias": ((10,), np.float32),
}


def rows_of(shape) -> int:
    return shape[0] if shape else 1


def row_bytes_of(shape, dtype) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize if shape else np.dtype(dtype).itemsize


def check_invariants(variables, p: Placement) -> None:
    s = p.num_shards
    total = sum(rows_of(shape) * row_bytes_of(shape, dt) for shape, dt in variables.values())
    assert p.total_bytes == total
    assert len(p.shard_bytes) == s

    # Every variable: slices cover [0, rows) exactly once, in order, with the right bytes.
    for name, (shape, dtype) in variables.items():
        slices = p.slices_of(name)
        assert slices, f"{name} is not placed"
        assert slices[0].start == 0 and slices[-1].stop == rows_of(shape)
        for a, b in zip(slices, slices[1:]):
            assert a.stop == b.start and a.shard < b.shard
        for sl in slices:
            assert 0 <= sl.shard < s
            assert sl.nbytes == (sl.stop - sl.start) * row_bytes_of(shape, dtype)
            assert sl.start < sl.stop or rows_of(shape) == 0
        if shape == ():
            assert [(x.start, x.stop) for x in slices] == [(0, 1)]

    # Key-space order: variables in the given order, shards never decreasing.
    assert [sl.variable for sl in p.slices] == [n for n in variables for _ in p.slices_of(n)]
    assert [sl.shard for sl in p.slices] == sorted(sl.shard for sl in p.slices)

    # Balanced: each shard within one row's bytes of total / S (exact arithmetic).
    max_row = max((row_bytes_of(shape, dt) for shape, dt in variables.values() if rows_of(shape)), default=0)
    for k in range(s):
        assert p.shard_bytes[k] == sum(sl.nbytes for sl in p.slices_for(k))
        assert abs(s * p.shard_bytes[k] - total) <= s * max_row, (k, p.shard_bytes, total / s, max_row)

    assert sorted(p.slices, key=lambda x: (x.shard, list(variables).index(x.variable))) == list(p.slices)
    assert len({sl.key for sl in p.slices}) == len(p.slices)


def random_variables(seed: int, n: int) -> dict:
    rng = np.random.default_rng(seed)
    dtypes = [np.float16, np.float32, np.float64, np.int8, np.int64]
    out = {}
    for i in range(n):
        rank = int(rng.integers(0, 4))
        shape = tuple(int(d) for d in rng.integers(1, 40, rank))
        if rng.random() < 0.1 and rank:
            shape = (0,) + shape[1:]  # a variable with no rows
        out[f"layer_{i}/w"] = (shape, dtypes[int(rng.integers(len(dtypes)))])
    return out


# ---- the MNIST MLP ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_mnist_mlp_is_balanced_within_one_row(num_shards):
    p = place(MNIST_MLP, num_shards)
    check_invariants(MNIST_MLP, p)
    target = p.total_bytes / num_shards
    assert p.total_bytes == 940_584
    for b in p.shard_bytes:
        assert abs(b - target) <= 256 * 4  # one row of dense/kernel
    assert p.warnings == ()


def test_one_shard_holds_every_variable_whole():
    p = place(MNIST_MLP, 1)
    assert [(s.variable, s.shard, s.start, s.stop) for s in p.slices] == [
        (name, 0, 0, shape[0]) for name, (shape, _) in MNIST_MLP.items()
    ]


def test_mnist_mlp_on_two_shards_splits_the_first_kernel_at_the_middle_byte():
    p = place(MNIST_MLP, 2)
    # total/2 = 470,292 bytes lies in row 459.27 of dense/kernel: the nearest boundary is 459.
    assert [(s.key, s.shard) for s in p.slices_of("dense/kernel")] == [
        ("dense/kernel[0:459]", 0),
        ("dense/kernel[459:784]", 1),
    ]
    assert p.shard_bytes == (459 * 1024, 940_584 - 459 * 1024)


# ---- random variable sets ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8, 16])
def test_random_variable_sets_keep_every_invariant(seed, num_shards):
    variables = random_variables(seed, n=1 + seed * 3)
    p = place(variables, num_shards)
    check_invariants(variables, p)
    assert place(variables, num_shards) == p  # deterministic


def test_scalars_are_never_split():
    variables = {f"s{i}": ((), np.float64) for i in range(5)}
    p = place(variables, 3)
    check_invariants(variables, p)
    assert all((s.start, s.stop, s.nbytes) == (0, 1, 8) for s in p.slices)
    assert p.shard_bytes == (16, 8, 16)


def test_more_shards_than_rows_leaves_some_shards_empty_with_a_warning():
    variables = {"a": ((), np.float32), "b": ((2,), np.float32)}
    p = place(variables, 5)
    check_invariants(variables, p)
    empty = [k for k in range(5) if p.shard_bytes[k] == 0]
    assert len(empty) == 2 and all(p.slices_for(k) == [] for k in empty)
    assert any("hold no bytes" in w and "fewer shards" in w for w in p.warnings)


def test_a_row_larger_than_a_share_is_noted():
    variables = {"table": ((2, 1000), np.float32), "bias": ((10,), np.float32)}
    p = place(variables, 4)
    check_invariants(variables, p)
    assert any("'table'" in w and "one such row" in w for w in p.warnings)


def test_variables_without_bytes_are_still_placed():
    variables = {"empty": ((0, 3), np.float32), "w": ((4,), np.float32), "flat": ((3, 0), np.float32)}
    p = place(variables, 2)
    check_invariants(variables, p)
    assert [(s.key, s.nbytes) for s in p.slices_of("empty")] == [("empty[0:0]", 0)]
    assert [(s.key, s.nbytes) for s in p.slices_of("flat")] == [("flat[0:3]", 0)]
    assert place({"e": ((0,), np.float32)}, 3).slices == (Slice("e", 0, 0, 0, 0),)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_num_shards_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_shards must be an int >= 1"):
        place(MNIST_MLP, bad)


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((3, -1), np.float32, "negative dimension"),
        ((None, 3), np.float32, "sequence of ints"),
        ((3,), "nope", "not a dtype"),
    ],
)
def test_bad_variable_specs_name_the_variable(shape, dtype, message):
    with pytest.raises(ValueError, match=f"variable 'v'.*{message}"):
        place({"v": (shape, dtype)}, 2)


def test_lookups():
    p = place(MNIST_MLP, 3)
    with pytest.raises(ValueError, match=r"shard must be in \[0, 3\)"):
        p.slices_for(3)
    with pytest.raises(KeyError, match="'nope'"):
        p.slices_of("nope")
    assert Slice("w", 1, 2, 5, 60).key == "w[2:5]"
    assert Slice("w", 1, 2, 5, 60).rows == 3


# ---- split / assemble ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_split_gives_views_and_assemble_restores_the_array(seed, num_shards):
    variables = random_variables(seed + 100, n=6)
    p = place(variables, num_shards)
    rng = np.random.default_rng(seed)
    for name, (shape, dtype) in variables.items():
        full = np.asarray(rng.standard_normal(shape) * 50).astype(dtype)
        slices = p.slices_of(name)
        parts = split(full, slices)
        assert len(parts) == len(slices)
        for sl, part in zip(slices, parts):
            assert np.shares_memory(part, full) or part.size == 0  # a view, not a copy
            assert part.nbytes == sl.nbytes
        out = np.full(shape, 1, dtype)
        assert assemble(slices, [part.copy() for part in parts], out) is out
        np.testing.assert_array_equal(out, full)


def test_split_and_assemble_a_scalar():
    p = place({"s": ((), np.float32)}, 2)
    full = np.array(3.5, np.float32)
    (part,) = split(full, p.slices_of("s"))
    assert part.shape == () and np.shares_memory(part, full)
    out = np.zeros((), np.float32)
    assemble(p.slices_of("s"), [np.float32(3.5)], out)
    assert out == 3.5


def test_assemble_rejects_parts_of_the_wrong_shape():
    p = place({"w": ((4, 3), np.float32)}, 2)
    slices = p.slices_of("w")
    with pytest.raises(ValueError, match=r"part for w\[0:2\] has shape \(3, 3\)"):
        assemble(slices, [np.zeros((3, 3), np.float32), np.zeros((2, 3), np.float32)], np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="2 slices but 1 parts"):
        assemble(slices, [np.zeros((2, 3))], np.zeros((4, 3)))
    with pytest.raises(ValueError, match="out of range"):
        split(np.zeros((3, 3)), slices)


# ---- a whole step's values per shard -------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_slice_for_shard_and_assemble_shard_round_trip_every_variable(num_shards):
    variables = dict(random_variables(7, n=6), scalar=((), np.float32))
    p = place(variables, num_shards)
    rng = np.random.default_rng(0)
    full = {n: np.asarray(rng.standard_normal(shape) * 50).astype(dtype) for n, (shape, dtype) in variables.items()}
    out = {n: np.zeros(shape, dtype) for n, (shape, dtype) in variables.items()}
    for k in range(num_shards):
        parts = p.slice_for_shard(full, k)
        assert list(parts) == [s.key for s in p.slices_for(k)]
        for s in p.slices_for(k):
            assert parts[s.key].nbytes == s.nbytes
            assert np.shares_memory(parts[s.key], full[s.variable]) or s.nbytes == 0  # views, no copies
        p.assemble_shard({key: part.copy() for key, part in parts.items()}, k, out)
    for n in variables:
        np.testing.assert_array_equal(out[n], full[n])


def test_slice_for_shard_leaves_out_variables_without_values():
    p = place(MNIST_MLP, 2)
    parts = p.slice_for_shard({"dense/bias": np.zeros(256, np.float32)}, 0)
    assert list(parts) == [s.key for s in p.slices_of("dense/bias") if s.shard == 0]


def test_assemble_shard_names_a_missing_or_misshapen_slice():
    p = place({"w": ((4, 3), np.float32)}, 2)
    out = {"w": np.zeros((4, 3), np.float32)}
    with pytest.raises(KeyError, match=r"shard 1 sent no values for slice w\[2:4\]"):
        p.assemble_shard({}, 1, out)
    with pytest.raises(ValueError, match=r"shard 0 sent slice w\[0:2\] with shape \(3,\); expected \(2, 3\)"):
        p.assemble_shard({"w[0:2]": np.zeros(3, np.float32)}, 0, out)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_layout_rebuilds_a_placement_from_its_slices(num_shards):
    p = place(MNIST_MLP, num_shards)
    rebuilt = layout(MNIST_MLP, [(s.variable, s.shard, s.start, s.stop) for s in p.slices], num_shards)
    assert rebuilt.slices == p.slices and rebuilt.shard_bytes == p.shard_bytes
    assert rebuilt.variables == p.variables


def test_layout_rejects_slices_that_do_not_cover_the_variables():
    v = {"w": ((6, 4), np.float32), "b": ((4,), np.float32)}
    with pytest.raises(ValueError, match=r"do not cover every row of 'w' \(3 of 6 rows\)"):
        layout(v, [("w", 0, 0, 3), ("b", 0, 0, 4)], 1)
    with pytest.raises(ValueError, match="does not continue rows"):
        layout(v, [("w", 0, 2, 6)], 1)
    with pytest.raises(ValueError, match="on shard 4; there are 3 shards"):
        layout(v, [("w", 4, 0, 6)], 3)
    with pytest.raises(ValueError, match="unknown variable"):
        layout(v, [("x", 0, 0, 1)], 1)


# ---- display -----------------------------------------------------------------------------------
def test_format_placement_lists_shards_bytes_shares_and_slices():
    p = place(MNIST_MLP, 2)
    text = format_placement(p)
    lines = text.splitlines()
    assert lines[0].split() == ["shard", "bytes", "share", "slices"]
    assert lines[1].split()[:3] == ["0", "470,016", "50.0%"]
    assert "dense/kernel[0:459]" in lines[1]
    for s in p.slices:
        assert s.key in text
    assert lines[-1].split()[:2] == ["total", "940,584"]

    crowded = format_placement(place({"a": ((), np.float32), "b": ((2,), np.float32)}, 5))
    assert "warning: shards" in crowded and " -" in crowded
