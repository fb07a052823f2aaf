"""Fuzz a shard attaching a worker's shared-memory segment (protos/shm.py) and reading
the push in its request area, as ``psserver/service.py`` ``Attach`` and ``PushRaw`` do.

Input layout (see ``corpus.shm_seeds``)::

    flags     uint8     bit 0: the caller's token is wrong; bit 1: a name follows
    capacity  int32 LE  the request capacity the caller claims
    size      int32 LE  the push size in the control frame
    [name]    uint8 length, then latin-1 bytes (only with flag bit 1)
    segment   the rest  the segment file: token (16 bytes), padding to 64, request area

Attaching must either refuse with ``SegmentUnavailable`` or give a segment whose
token is the file's and whose areas follow the documented layout; reading the push
must refuse with ValueError (``tensorwire.unpack``) or decode.

Run: ``python tests/fuzz/fuzz_shm_header.py [-max_total_time=N] [corpus_dir]``
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import struct
import sys
import tempfile

import atheris

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root, for tests.fuzz


def _instrumented():
    """Coverage instrumentation when run as a fuzzer; none when a test imports this file."""
    return atheris.instrument_imports(include=["protos"]) if __name__ == "__main__" else contextlib.nullcontext()


with _instrumented():
    from protos import shm, tensorwire

from tests.fuzz.corpus import SHM_TOKEN  # noqa: E402

NAME = "pstrain-fuzz-shm"
NAME_PATTERN = re.compile(r"pstrain-[A-Za-z0-9_.-]{1,200}")  # the names shm.py's docstring allows
_HEAD = struct.Struct("<Bii")
@contextlib.contextmanager
def _shm_dir(path: str):
    saved, shm.SHM_DIR = shm.SHM_DIR, path
    try:
        yield
    finally:
        shm.SHM_DIR = saved


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


def _check_name(name: str) -> None:
    try:
        path = shm.Segment.path(name)
    except shm.SegmentUnavailable:
        return
    if not NAME_PATTERN.fullmatch(name) or os.path.dirname(path) != shm.SHM_DIR:
        raise AssertionError(f"Segment.path accepted {name!r} as a segment name (path {path!r})")


def _check_layout(seg: shm.Segment, token: bytes, capacity: int, segment: bytes) -> None:
    if segment[:16] != token or len(token) != 16:
        raise AssertionError(f"attached with token {token!r}, but the segment starts with {segment[:16]!r}")
    request_end = 64 + _align(capacity)
    if capacity < 0 or len(seg.request) != _align(capacity) or len(seg.reply) != len(segment) - request_end:
        raise AssertionError(
            f"request_capacity={capacity} on a {len(segment)}-byte segment gave a request area of "
            f"{len(seg.request)} bytes and a reply area of {len(seg.reply)}; the layout puts the request "
            f"area at [64, {request_end}) and the reply after it"
        )


def _read_push(seg: shm.Segment, size: int) -> None:
    if not 0 <= size <= seg.request_capacity:  # PushRaw refuses these with ValueError
        return
    try:
        meta, tensors = tensorwire.unpack(seg.request[:size])
    except ValueError:
        return
    if not isinstance(meta, dict):
        raise AssertionError(f"unpack gave meta {meta!r}; a frame's meta is a JSON object")
    del tensors  # views into the mapping: gone before the segment closes


def TestOneInput(data: bytes) -> None:
    if len(data) < _HEAD.size:
        return
    flags, capacity, size = _HEAD.unpack_from(data)
    segment = data[_HEAD.size:]
    name = NAME
    if flags & 2:
        n = segment[0] if segment else 0
        name, segment = segment[1 : 1 + n].decode("latin-1"), segment[1 + n :]
    token = bytes(reversed(SHM_TOKEN)) if flags & 1 else SHM_TOKEN
    # A directory of its own standing in for /dev/shm, gone after each input (libFuzzer's exit skips atexit).
    with tempfile.TemporaryDirectory(prefix="pstrain-fuzz-shm-") as directory, _shm_dir(directory):
        with open(os.path.join(directory, NAME), "wb") as f:
            f.write(segment)
        _check_name(name)
        try:
            seg = shm.Segment.attach(name, token, capacity)
        except shm.SegmentUnavailable:
            return
        try:
            _check_layout(seg, token, capacity, segment)
            _read_push(seg, size)
        finally:
            seg.close()


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
