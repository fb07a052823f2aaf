"""Fuzz raw push frames: ``protos/tensorwire.unpack``, then what a shard does with the
frame (``psserver/service.py`` ``PushRaw`` on an in-process ``Shard``, no network).

Input: one byte choosing the shard's mode (sync, async, ssp by value mod 3), then the
frame. Every input is tried twice: its bytes as a frame, and its bytes as choices
(``atheris.FuzzedDataProvider``) that build a well-framed frame with odd meta values,
tensor specs and contents, which gets past the framing. A fresh shard holding
``corpus.PUSH_VARIABLES`` for workers 0 and 1 serves each frame; its shared-memory
segment (``corpus.PUSH_SHM_NAME``) holds the same frame, so a frame pointing there
reads itself.

A frame must decode or be refused with ValueError, and one ``unpack`` refuses must not
be served. The servicer must answer or abort with a domain status code (INTERNAL means
an unexpected exception: re-raised here). A frame refused as malformed
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION) leaves the shard's parameters and
version as they were; one refused later (its pull timed out) may have applied its push.

Run: ``python tests/fuzz/fuzz_push_frame.py [-max_total_time=N] [corpus_dir]``
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import struct
import sys
import traceback

import atheris
import grpc
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root, for tests.fuzz


def _instrumented():
    """Coverage instrumentation when run as a fuzzer; none when a test imports this file."""
    include = ["protos", "psserver", "pstrain"]
    return atheris.instrument_imports(include=include) if __name__ == "__main__" else contextlib.nullcontext()


with _instrumented():
    from protos import shm, tensorwire
    from psserver.config import PSConfig
    from psserver.service import ParameterServerServicer
    from psserver.shard import Shard

from tests.fuzz.corpus import PUSH_JOB, PUSH_SHM_NAME, PUSH_TRAINABLE, PUSH_VARIABLES  # noqa: E402

MODES = ("sync", "async", "ssp")
# What a servicer may answer a bad frame with; INTERNAL and UNKNOWN mean a crash.
_CRASH_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# A frame refused with these is malformed or unknown here, so nothing of it may apply. (A push
# applied before its pull timed out or was refused, or its reply was too large, may.)
_MALFORMED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


class PullHang(AssertionError):
    """A pull would wait longer than the server's ``pull_timeout`` allows."""


class RefusedButApplied(AssertionError):
    """A frame refused as malformed that changed the shard anyway."""

    def __init__(self, message: str, asks_pull: bool):
        super().__init__(message)
        self.asks_pull = asks_pull


class CheckedServicer(ParameterServerServicer):
    """The servicer, checking what its docstring promises: no pull waits past ``pull_timeout``."""

    def _wait(self, asked: float) -> float:
        wait = super()._wait(asked)
        if not 0 < wait <= self.config.pull_timeout:  # NaN fails too
            raise PullHang(f"a pull asking for timeout {asked!r} would wait {wait!r}s; pull_timeout is "
                           f"{self.config.pull_timeout}s")
        return wait


class Aborted(Exception):
    """What ``RecordingContext.abort`` raises, as gRPC's ``context.abort`` ends the call."""


class RecordingContext:
    """Stands in for a ``grpc.ServicerContext``: records the status of an abort and the
    exception behind it (``rpc.abort`` runs inside the servicer's ``except`` block)."""

    def __init__(self):
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.error: BaseException | None = None

    def abort(self, code: grpc.StatusCode, details: str):
        self.code, self.details, self.error = code, details, sys.exc_info()[1]
        raise Aborted(f"{code.name}: {details}")


def _raised_in(exc: BaseException, path: str, function: str) -> bool:
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return last.filename.endswith(path) and last.name == function


# Findings in code outside tests/fuzz and protos/ not fixed yet: while listed, the fuzzer
# steps over them to look for others, unless PSTRAIN_FUZZ_STRICT=1;
# tests/fuzz/test_regressions.py replays their reproducers (regressions/<harness>/known-*)
# strictly and expects them to fail. None now: psserver/service.py's three are fixed.
KNOWN_UNFIXED: dict = {}


def _known(exc: BaseException) -> bool:
    if os.environ.get("PSTRAIN_FUZZ_STRICT") == "1":
        return False
    return any(matches(exc) for matches in KNOWN_UNFIXED.values())


_servicer: CheckedServicer | None = None
_segment: shm.Segment | None = None


def _setup() -> tuple[CheckedServicer, shm.Segment | None]:
    """One servicer for the whole run (pulls wait at most 1 ms), and a segment if /dev/shm exists."""
    global _servicer, _segment
    if _servicer is None:
        _servicer = CheckedServicer(PSConfig(backend="reference", pull_timeout=0.001))
        if shm.enabled():
            _segment = shm.Segment.create(PUSH_SHM_NAME, request_capacity=1 << 16, reply_capacity=1 << 16)
            # Mapped is enough: without its name nothing is left in /dev/shm when libFuzzer exits
            # (which skips atexit).
            os.unlink(shm.Segment.path(_segment.name))
    return _servicer, _segment


def _fresh_shard(servicer: ParameterServerServicer, segment: shm.Segment | None, mode: str) -> Shard:
    shard = Shard(PUSH_JOB, 0, PUSH_VARIABLES, trainable=set(PUSH_TRAINABLE),
                  optimizer={"name": "sgd", "learning_rate": 0.1}, mode=mode, staleness=1, workers=[0, 1],
                  backend="reference")
    servicer.shards[PUSH_JOB] = shard
    servicer.segments[PUSH_JOB] = {segment.name: segment} if segment is not None else {}
    return shard


def _snapshot(shard: Shard) -> tuple[int, dict[str, np.ndarray]]:
    return shard.pull(worker=-1, step=0, timeout=1.0)  # the master's pull: copies, never waits here


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def _decode(frame: bytes) -> tuple[dict, dict] | None:
    """``unpack``'s result, or None when it refuses the frame (ValueError, as documented)."""
    try:
        return tensorwire.unpack(frame)
    except ValueError:
        return None


# ---- frames built from choices ---------------------------------------------------------
def _json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0):
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return fdp.ConsumeIntInRange(-3, 3)
    if kind == 1:
        return fdp.ConsumeInt(12)  # beyond int64 too
    if kind == 2:
        return fdp.ConsumeFloat()  # NaN and infinities too (json writes NaN, Infinity)
    if kind == 3:
        return fdp.ConsumeBool()
    if kind == 4:
        return None
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(6)
    if kind == 6 and depth < 3:
        return [_json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 7 and depth < 3:
        return {fdp.ConsumeUnicodeNoSurrogates(4): _json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}
    if kind == 8:
        return str(fdp.ConsumeIntInRange(-2, 2))
    # Names the frame uses, strings float() reads as NaN or infinity, ints beyond float and int64.
    return fdp.PickValueInList([PUSH_JOB, PUSH_SHM_NAME, "g:w", "a:steps", "float32", "int64", "nan", "inf", "-inf",
                                10**400, -(10**400), 2**63, 2**64])


_META_KEYS = ["job", "worker", "step", "weight", "pull", "min_version", "timeout", "owner_epoch", "checkpoint", "shm"]


def _meta(fdp: atheris.FuzzedDataProvider) -> object:
    meta = {"job": PUSH_JOB, "worker": 0, "step": 0, "weight": 0.5}
    if not fdp.ConsumeIntInRange(0, 15):
        return _json_value(fdp)  # not even an object
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        key = fdp.PickValueInList(_META_KEYS)
        if key == "shm" and fdp.ConsumeBool():
            meta[key] = {"name": PUSH_SHM_NAME, "size": _json_value(fdp) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 4096)}
        elif fdp.ConsumeIntInRange(0, 3):
            meta[key] = _json_value(fdp)
        else:
            meta.pop(key, None)
    return meta


_ITEMSIZE = {"float16": 2, "float32": 4, "float64": 8, "int32": 4, "int64": 8, "bool": 1, "uint8": 1}


def _nbytes(spec) -> int:
    """The bytes a spec's tensor takes (0 for a spec without a size: the decoder refuses those)."""
    try:
        _, dtype, shape = spec
        return _ITEMSIZE.get(dtype, 4) * math.prod(int(d) for d in shape)
    except (TypeError, ValueError, OverflowError):
        return 0


def _tensors(fdp: atheris.FuzzedDataProvider) -> tuple[list, bytes]:
    """Tensor specs (mostly the shard's variables) and their bytes (mostly the right length)."""
    specs, content = [], b""
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        name = fdp.PickValueInList(["g:w", "g:b", "a:steps", "g:steps", "a:w", "w"])
        dtype, shape = {"w": ("float32", [2, 3]), "b": ("float32", [3]), "steps": ("int64", [])}[name.split(":")[-1]]
        spec = [name, dtype, shape]
        what = fdp.ConsumeIntInRange(0, 7)
        if what == 0:
            spec[fdp.ConsumeIntInRange(0, 2)] = _json_value(fdp)
        elif what == 1:
            spec = _json_value(fdp)
        elif what == 2:
            spec[2] = [fdp.ConsumeIntInRange(-2, 4) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        elif what == 3:
            spec[1] = fdp.PickValueInList(["float64", "float16", "int32", "bool", "uint8", "complex64"])
        specs.append(spec)
        size = max(0, min(_nbytes(spec), 256))
        content += fdp.ConsumeBytes(size) if fdp.ConsumeIntInRange(0, 3) else bytes(size)
    return specs, content


def built_frame(data: bytes) -> bytes:
    """A frame with the right magic and header length from the choices in ``data``."""
    fdp = atheris.FuzzedDataProvider(data)
    specs, content = _tensors(fdp)
    header = json.dumps({"meta": _meta(fdp), "tensors": specs}, separators=(",", ":")).encode()
    extra = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 3))
    return tensorwire.MAGIC + struct.pack("<I", len(header)) + header + content + extra


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode = MODES[data[0] % 3]
    for frame in (data[1:], built_frame(data[1:])):
        try:
            check_frame(mode, frame)
        except Exception as exc:
            if not _known(exc):
                raise


def check_frame(mode: str, frame: bytes) -> None:
    """Decode ``frame`` and push it to a fresh shard in ``mode``; raise on a finding."""
    decoded = _decode(frame)
    if decoded is not None and not isinstance(decoded[0], dict):
        raise AssertionError(f"unpack gave meta {decoded[0]!r}; a frame's meta is a JSON object")

    servicer, segment = _setup()
    if segment is not None:
        segment.request[: min(len(frame), len(segment.request))] = frame[: len(segment.request)]
    shard = _fresh_shard(servicer, segment, mode)
    try:
        version, params = _snapshot(shard)
        context = RecordingContext()
        try:
            reply = servicer.PushRaw(frame, context)
        except Aborted:
            if context.code in _CRASH_CODES:
                raise context.error from None
            reply = None
        if reply is not None:
            if decoded is None:
                raise AssertionError("PushRaw served a frame that tensorwire.unpack refuses")
            tensorwire.unpack(reply)  # the reply frame is well-formed (raises if not)
        after_version, after = _snapshot(shard)
        if not _same(params, after) and after_version == version:
            raise AssertionError(f"{mode}: the parameters changed but the version stayed {version}")
        if context.code in _MALFORMED and (after_version != version or not _same(params, after)):
            raise RefusedButApplied(f"{mode}: a refused frame ({context.code.name}: {context.details}) changed the "
                                    f"shard: version {version} -> {after_version}",
                                    asks_pull=b'"pull"' in frame)  # a frame in shared memory is a prefix of this one
    finally:
        shard.close()


def main() -> None:
    logging.disable(logging.CRITICAL)  # refused pushes log warnings, crashes errors: the fuzzer reports those
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
