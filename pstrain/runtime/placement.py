"""Variable placement on parameter-server shards, ps-lite style: all variables, in
graph order, form one key space of rows (axis 0), and each of the S shards owns one
contiguous range of it holding about 1/S of the bytes.

Shard k's range ends at the row boundary nearest to the byte offset
``(k + 1) * total / S``. Cutting at cumulative targets, rather than filling each
shard in turn, keeps rounding errors from piling up on the last shard: every shard
holds the target within one row's bytes. A variable is split only between rows; a
0-d variable is one row and never split.

Usage::

    p = place({"dense/kernel": ((784, 256), "float32"), "dense/bias": ((256,), "float32")}, 2)
    for s in p.slices_for(0):
        print(s.key, s.nbytes)              # dense/kernel[0:392] 401408
    parts = split(kernel, p.slices_of("dense/kernel"))        # views, no copies
    assemble(p.slices_of("dense/kernel"), parts, np.empty_like(kernel))
    print(format_placement(p))

A worker rebuilds the master's placement from the slices in its task (``layout``) and
moves whole steps through it: ``p.slice_for_shard(grads, 0)`` gives shard 0's part of
every variable as views keyed by slice key, and ``p.assemble_shard(reply, 0, params)``
writes what shard 0 sent back into the full arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

import numpy as np

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Slice:
    """Rows ``[start, stop)`` of ``variable`` (axis 0), held by ``shard``.

    A 0-d variable is one row: its only slice is ``[0:1]`` and means the whole value.
    """

    variable: str
    shard: int
    start: int
    stop: int
    nbytes: int

    @property
    def key(self) -> str:
        """The name the slice is stored under on its shard."""
        return f"{self.variable}[{self.start}:{self.stop}]"

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Placement:
    """Where every variable's rows live. ``slices`` are in key-space order (by
    variable in the order given to ``place``, then by row), so a variable's
    slices are contiguous and ascending and shard numbers never decrease."""

    num_shards: int
    slices: tuple[Slice, ...]
    shard_bytes: tuple[int, ...]
    variables: Mapping[str, tuple[Shape, np.dtype]]
    warnings: tuple[str, ...] = ()
    _by_shard: dict[int, list[Slice]] = field(init=False, repr=False, compare=False)
    _by_variable: dict[str, list[Slice]] = field(init=False, repr=False, compare=False)
    _cuts: dict[int, tuple[tuple[str, str, int, int, bool], ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Indexes for the lookups the master and workers make per variable and shard.
        by_shard: dict[int, list[Slice]] = {k: [] for k in range(self.num_shards)}
        by_variable: dict[str, list[Slice]] = {name: [] for name in self.variables}
        for s in self.slices:
            by_shard[s.shard].append(s)
            by_variable[s.variable].append(s)
        object.__setattr__(self, "_by_shard", by_shard)
        object.__setattr__(self, "_by_variable", by_variable)
        # Per shard, plain tuples (variable, key, start, stop, 0-d?) for the per-step
        # slicing and assembly: no property calls or shape lookups on the hot path.
        cuts = {k: tuple((s.variable, s.key, s.start, s.stop, not self.variables[s.variable][0]) for s in sl)
                for k, sl in by_shard.items()}
        object.__setattr__(self, "_cuts", cuts)

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_bytes)

    @property
    def target_bytes(self) -> float:
        """The ideal bytes per shard (total / S)."""
        return self.total_bytes / self.num_shards

    def slices_for(self, shard: int) -> list[Slice]:
        """The slices ``shard`` holds, in key order."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard must be in [0, {self.num_shards}), got {shard}")
        return list(self._by_shard[shard])

    def slices_of(self, variable: str) -> list[Slice]:
        """The slices of ``variable``, in row order; together they cover all its rows."""
        if variable not in self.variables:
            raise KeyError(f"variable '{variable}' is not placed; placed: {', '.join(self.variables) or 'none'}")
        return list(self._by_variable[variable])

    def slice_for_shard(self, values: Mapping[str, np.ndarray], shard: int) -> dict[str, np.ndarray]:
        """Shard ``shard``'s part of ``values`` ({variable: full array}), keyed by slice
        key: views, no copies. Variables missing from ``values`` are left out (a step
        has no gradient for a state variable, nor an update for a weight).

        Usage::

            p.slice_for_shard({"dense/bias": bias}, 1)   # {"dense/bias[128:256]": bias[128:256]}
        """
        out = {}
        for variable, key, start, stop, scalar in self._cuts[shard]:
            v = values.get(variable)
            if v is not None:
                out[key] = v if scalar else v[start:stop]
        return out

    def assemble_shard(self, parts: Mapping[str, np.ndarray], shard: int, out: Mapping[str, np.ndarray]) -> None:
        """Write shard ``shard``'s ``parts`` ({slice key: rows}, e.g. a pull reply) into
        the full arrays ``out`` ({variable: array}). Every slice of the shard must be
        there, with the shape of its rows.

        Usage::

            p.assemble_shard(reply_params, 0, params)   # params["dense/bias"][0:128] = reply_params["dense/bias[0:128]"]
        """
        for variable, key, start, stop, scalar in self._cuts[shard]:
            part = parts.get(key)
            if part is None:
                raise KeyError(f"shard {shard} sent no values for slice {key}; it holds "
                               f"{', '.join(k for _, k, *_ in self._cuts[shard])}. Is the shard running another placement?")
            target = out[variable]
            dest = target if scalar else target[start:stop]
            if part.shape != dest.shape:
                raise ValueError(f"shard {shard} sent slice {key} with shape {part.shape}; expected {dest.shape}")
            dest[...] = part


def layout(variables: Mapping[str, tuple[Sequence[int], object]], ranges: Iterable[tuple[str, int, int, int]],
           num_shards: int) -> Placement:
    """The ``Placement`` that slices already decided describe: ``ranges`` are
    ``(variable, shard, start, stop)``, as the master sends them in a worker's task.
    Checked: every variable's ranges cover its rows once, in order, on valid shards.

    Usage::

        p = layout({"w": ((4, 3), "float32")}, [("w", 0, 0, 2), ("w", 1, 2, 4)], num_shards=2)
    """
    specs = {name: _spec(name, shape, dtype) for name, (shape, dtype) in variables.items()}
    slices = []
    shard_bytes = [0] * num_shards
    covered = {name: 0 for name in specs}
    for variable, shard, start, stop in ranges:
        if variable not in specs:
            raise ValueError(f"slice {variable}[{start}:{stop}] names an unknown variable; known: {', '.join(specs) or 'none'}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"slice {variable}[{start}:{stop}] is on shard {shard}; there are {num_shards} shards")
        shape, dtype = specs[variable]
        if start != covered[variable] or not start <= stop <= _rows(shape):
            raise ValueError(f"slice {variable}[{start}:{stop}] does not continue rows [0:{covered[variable]}) of "
                             f"'{variable}' (shape {shape}); slices must cover each variable's rows once, in order")
        covered[variable] = stop
        nbytes = (stop - start) * _row_bytes(shape, dtype)
        slices.append(Slice(variable, int(shard), int(start), int(stop), nbytes))
        shard_bytes[shard] += nbytes
    short = [f"'{n}' ({covered[n]} of {_rows(specs[n][0])} rows)" for n in specs if covered[n] != _rows(specs[n][0])]
    if short:
        raise ValueError(f"the slices do not cover every row of {', '.join(short)}")
    return Placement(int(num_shards), tuple(slices), tuple(shard_bytes), specs)


def place(variables: Mapping[str, tuple[Sequence[int], object]], num_shards: int) -> Placement:
    """Place ``variables`` ({name: (shape, dtype)}, in graph order) on ``num_shards``
    shards, balanced by bytes. Deterministic: the same input gives the same placement.

    With more shards than rows some shards hold nothing; the placement is still
    valid and says so in ``warnings``.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1 (the number of parameter-server shards), got {num_shards!r}")
    num_shards = int(num_shards)
    specs = {name: _spec(name, shape, dtype) for name, (shape, dtype) in variables.items()}

    # The key space: variable v holds global rows [row0[v], row0[v] + rows) and
    # bytes [byte0[v], byte0[v] + rows * row_bytes).
    names = list(specs)
    rows = [_rows(specs[n][0]) for n in names]
    row_bytes = [_row_bytes(*specs[n]) for n in names]
    row0 = [0]
    byte0 = [0]
    for r, b in zip(rows, row_bytes):
        row0.append(row0[-1] + r)
        byte0.append(byte0[-1] + r * b)
    total_rows, total = row0[-1], byte0[-1]

    cuts = [0] + [_cut(Fraction(k * total, num_shards), rows, row_bytes, row0, byte0) for k in range(1, num_shards)]
    cuts.append(total_rows)

    slices: list[Slice] = []
    shard_bytes = [0] * num_shards
    for i, name in enumerate(names):
        lo, hi = row0[i], row0[i + 1]
        if lo == hi:  # no rows: one empty slice, next to the slice before it
            slices.append(Slice(name, slices[-1].shard if slices else 0, 0, 0, 0))
            continue
        for shard in range(num_shards):
            start, stop = max(lo, cuts[shard]), min(hi, cuts[shard + 1])
            if start < stop:
                nbytes = (stop - start) * row_bytes[i]
                slices.append(Slice(name, shard, start - lo, stop - lo, nbytes))
                shard_bytes[shard] += nbytes

    warnings = _warnings(num_shards, shard_bytes, names, row_bytes, total)
    return Placement(num_shards, tuple(slices), tuple(shard_bytes), specs, tuple(warnings))


def _spec(name: str, shape, dtype) -> tuple[Shape, np.dtype]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"variable '{name}': shape must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"variable '{name}': shape {dims} has a negative dimension")
    try:
        return dims, np.dtype(dtype)
    except TypeError:
        raise ValueError(f"variable '{name}': '{dtype}' is not a dtype") from None


def _rows(shape: Shape) -> int:
    return shape[0] if shape else 1


def _row_bytes(shape: Shape, dtype: np.dtype) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize


def _cut(target: Fraction, rows, row_bytes, row0, byte0) -> int:
    """The global row boundary nearest to byte offset ``target`` (ties: the lower)."""
    for i, (r, b) in enumerate(zip(rows, row_bytes)):
        if target < byte0[i + 1]:  # never true for a variable of zero bytes
            within = (target - byte0[i]) / b
            row = int(within) if within - int(within) <= Fraction(1, 2) else int(within) + 1
            return row0[i] + row
    return row0[-1]


def _warnings(num_shards, shard_bytes, names, row_bytes, total) -> list[str]:
    out = []
    empty = [k for k in range(num_shards) if shard_bytes[k] == 0]
    if empty and total == 0:
        out.append("the variables hold no bytes; shard 0 holds them all")
    elif empty:
        out.append(
            f"shards {', '.join(map(str, empty))} hold no bytes: there are too few rows, or too large ones, "
            f"to give each of {num_shards} shards a share; use fewer shards"
        )
    target = total / num_shards
    for name, b in zip(names, row_bytes):
        if b > target > 0:
            out.append(
                f"a row of '{name}' ({b} bytes) is larger than a shard's share ({target:.0f} bytes), "
                "so shards cannot be balanced closer than one such row"
            )
    return out


# ---- moving values between full arrays and slices -------------------------------------------------
def split(array: np.ndarray, slices: Sequence[Slice]) -> list[np.ndarray]:
    """The parts of ``array`` that ``slices`` (one variable's) name: views, no copies."""
    out = []
    for s in slices:
        if array.ndim == 0:
            _check_scalar_slice(s)
            out.append(array[...])
        else:
            if not 0 <= s.start <= s.stop <= array.shape[0]:
                raise ValueError(f"slice {s.key} is out of range for an array of shape {array.shape}")
            out.append(array[s.start : s.stop])
    return out


def assemble(slices: Sequence[Slice], parts: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Write ``parts`` (one per slice) into the full array ``out``; returns ``out``."""
    if len(slices) != len(parts):
        raise ValueError(f"assemble: {len(slices)} slices but {len(parts)} parts")
    for s, part in zip(slices, parts):
        part = np.asarray(part)
        if out.ndim == 0:
            _check_scalar_slice(s)
            want = ()
            dest = out[...]
        else:
            want = (s.stop - s.start,) + out.shape[1:]
            dest = out[s.start : s.stop]
        if part.shape != want or dest.shape != want:
            raise ValueError(
                f"part for {s.key} has shape {part.shape}; expected {want} for an output of shape {out.shape}"
            )
        dest[...] = part
    return out


def _check_scalar_slice(s: Slice) -> None:
    if (s.start, s.stop) != (0, 1):
        raise ValueError(f"slice {s.key} does not fit a 0-d variable; its only slice is [0:1]")


# ---- display -----------------------------------------------------------------------------------
def format_placement(p: Placement) -> str:
    """A table of shards, their bytes, share of the total and slices (for ``psctl plan``)."""
    total = p.total_bytes
    lines = [f"{'shard':>5}  {'bytes':>12}  {'share':>6}  slices"]
    for k in range(p.num_shards):
        share = 100.0 * p.shard_bytes[k] / total if total else 0.0
        keys = [f"{s.key} ({_human(s.nbytes)})" for s in p.slices_for(k)] or ["-"]
        lines.append(f"{k:>5}  {p.shard_bytes[k]:>12,}  {share:>5.1f}%  {keys[0]}")
        lines.extend(f"{'':>5}  {'':>12}  {'':>6}  {key}" for key in keys[1:])
    share = 100.0 if total else 0.0
    lines.append(f"{'total':>5}  {total:>12,}  {share:>5.1f}%  ({_human(total)}, {len(p.variables)} variables)")
    lines.extend(f"warning: {w}" for w in p.warnings)
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
