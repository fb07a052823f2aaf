"""Raw tensor framing for the hot path (a step's push and the parameters that come
back): a small JSON header, then every tensor's little-endian C-order bytes back to
back. Encoding is one join of the arrays' buffers; decoding wraps slices of the
received bytes with ``np.frombuffer`` — no copy at all, where protobuf ``bytes``
fields cost two copies each way.

    frame = pack({"job": "job-000001", "step": 7}, {"w[0:10]": grad})
    meta, tensors = unpack(frame)        # read-only views into ``frame``

Layout: b"PST1", uint32 header length, UTF-8 JSON header
``{"meta": {...}, "tensors": [[name, dtype, shape], ...]}`` (strict JSON: no NaN or
infinities, integers within int64), then the buffers.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Mapping

import numpy as np

MAGIC = b"PST1"
# The service that carries these frames (bytes in, bytes out); declared in ps.proto.
RAW_SERVICE = "pstrain.ParameterServerRaw"
_LEN = struct.Struct("<I")
_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"}
# Little-endian dtype -> its name, and back. Looked up by dtype because ``dtype.name`` is
# a slow Python property (~4 us), and a step's frames name every tensor twice.
_NAMES = {np.dtype(n).newbyteorder("<"): n for n in _DTYPES}
_BY_NAME = {n: d for d, n in _NAMES.items()}


def pack(meta: Mapping, arrays: Mapping[str, np.ndarray]) -> bytes:
    """Frame ``meta`` (JSON-able) and ``{name: array}`` into one bytes object."""
    head, buffers = _parts(meta, arrays)
    return b"".join([head, *buffers])


def pack_into(buffer: memoryview, meta: Mapping, arrays: Mapping[str, np.ndarray]) -> int:
    """Write the frame ``pack`` would return into ``buffer`` (e.g. shared memory);
    returns its length. ValueError if it does not fit (nothing useful is written)."""
    head, buffers = _parts(meta, arrays)
    size = len(head) + sum(b.nbytes for b in buffers)
    if size > len(buffer):
        raise ValueError(f"tensor frame of {size} bytes does not fit a buffer of {len(buffer)}")
    at = len(head)
    buffer[:at] = head
    for b in buffers:
        buffer[at : at + b.nbytes] = b
        at += b.nbytes
    return size


def _parts(meta: Mapping, arrays: Mapping[str, np.ndarray]) -> tuple[bytes, list]:
    """(magic + length + header, the tensors' bytes as flat memoryviews)."""
    specs, buffers = [], []
    for name, a in arrays.items():
        a = np.asarray(a)
        dtype_name = _NAMES.get(a.dtype)
        if dtype_name is None:
            if a.dtype.newbyteorder("<") not in _NAMES:
                raise ValueError(f"tensor '{name}': dtype {a.dtype} cannot travel; use one of {sorted(_DTYPES)}")
            a = a.astype(a.dtype.newbyteorder("<"))  # big-endian
            dtype_name = _NAMES[a.dtype]
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array 1-d)
            a = a.copy(order="C")
        specs.append([name, dtype_name, list(a.shape)])
        buffers.append(memoryview(a).cast("B") if a.size else memoryview(b""))
    try:
        header = json.dumps({"meta": dict(meta), "tensors": specs}, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:  # unpack refuses NaN and infinities (they are not JSON): fail here, naming them
        raise ValueError(f"tensor frame meta {dict(meta)!r} cannot travel: {exc}") from None
    return MAGIC + _LEN.pack(len(header)) + header, buffers


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"integer {text} is out of the int64 range")
    return value


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Split a frame into (meta, {name: read-only array}); a malformed frame raises
    ValueError saying what is wrong."""
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise ValueError("not a pstrain tensor frame (bad magic); is the peer a different pstrain version?")
    (hlen,) = _LEN.unpack_from(view, 4)
    if 8 + hlen > len(view):
        raise ValueError(f"tensor frame truncated: header of {hlen} bytes, frame of {len(view)}")
    try:
        # Strict JSON, numbers within float and int64: NaN, infinities and huge integers would
        # get past the service's range checks or overflow its conversions.
        header = json.loads(bytes(view[8 : 8 + hlen]), parse_float=_finite, parse_int=_int64, parse_constant=_not_json)
        meta, specs = header["meta"], header["tensors"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ValueError(f"tensor frame header is not valid: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(specs, list):
        raise ValueError(f"tensor frame header is not valid: 'meta' must be a JSON object and 'tensors' a list, "
                         f"got {type(meta).__name__} and {type(specs).__name__}")
    offset, out = 8 + hlen, {}
    for spec in specs:
        try:
            name, dtype_name, shape = spec
            dtype = _BY_NAME.get(dtype_name)
            if not isinstance(name, str) or not isinstance(shape, list):
                raise TypeError("expected [name, dtype, [dims]]")
            if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise TypeError("dimensions must be integers")
            shape = tuple(shape)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"tensor frame: bad tensor spec {spec!r}: {exc}") from None
        if dtype is None or any(d < 0 for d in shape):
            raise ValueError(f"tensor '{name}': unsupported dtype {dtype_name!r} or negative dimension in {shape}")
        if name in out:
            raise ValueError(f"tensor '{name}' appears twice in one frame")
        count = math.prod(shape)
        end = offset + count * dtype.itemsize
        if end > len(view):
            raise ValueError(f"tensor '{name}': frame truncated ({len(view)} bytes, needs {end})")
        out[name] = np.frombuffer(view, dtype, count, offset).reshape(shape)
        offset = end
    if offset != len(view):
        raise ValueError(f"tensor frame has {len(view) - offset} trailing bytes after its tensors")
    return meta, out
