"""Shared-memory segments: the data path between a worker and a shard on one host.

Over gRPC a step's tensors are copied about four times each way (into the frame,
into gRPC's buffers, through the socket, out into a bytes object) and the transport
costs more CPU than the step's arithmetic on a small machine. When a worker and a
shard share a host (the local cluster), the worker writes its push frame
(protos/tensorwire.py) into a segment of its own under /dev/shm and sends only a
small control frame over gRPC; the shard reads the tensors in place and writes its
reply frame back into the same segment. gRPC still carries every call, its
deadline, its status and its errors, so the protocol is the same either way.

A segment starts with a random token; the shard attaches only to a segment whose
name is a pstrain segment name, that is a regular file owned by its own user, and
whose token matches the one in the call. A shard on another host (or in another
container) cannot open the worker's segment, answers FAILED_PRECONDITION, and the
worker goes back to sending frames over gRPC for that shard.

Layout: token (16 bytes), padding to 64, the request area, then the reply area.

    seg = Segment.create("pstrain-job-1-w0-s0", request_capacity=2**20, reply_capacity=2**20)
    n = tensorwire.pack_into(seg.request, meta, tensors)
    peer = Segment.attach(seg.name, seg.token, seg.request_capacity)   # in the shard's process
    meta, tensors = tensorwire.unpack(peer.request[:n])

``PSTRAIN_SHM=off`` turns the path off (``auto``, the default, uses it where it works).
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import stat

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"pstrain-[A-Za-z0-9_.-]{1,200}")
_HEADER = 64
_TOKEN = 16


class SegmentUnavailable(RuntimeError):
    """This process cannot use the named segment (another host, wrong token, bad name)."""


def enabled() -> bool:
    """Whether to try shared memory at all (``PSTRAIN_SHM``: auto, the default, or off)."""
    value = os.environ.get("PSTRAIN_SHM", "auto").strip().lower()
    if value not in ("auto", "off"):
        raise ValueError(f"PSTRAIN_SHM={value!r} is not a setting; use 'auto' or 'off'")
    return value == "auto" and os.path.isdir(SHM_DIR)


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


class Segment:
    """A mapped segment with a request area and a reply area (see the module docstring)."""

    def __init__(self, name: str, token: bytes, request_capacity: int, fd: int, size: int, owner: bool):
        self.name, self.token, self.request_capacity, self.owner = name, token, request_capacity, owner
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        reply_at = _HEADER + _align(request_capacity)
        self.request = self._view[_HEADER:reply_at]
        self.reply = self._view[reply_at:]

    @staticmethod
    def path(name: str) -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name):  # (match would take a trailing newline)
            raise SegmentUnavailable(f"{name!r} is not a pstrain shared-memory segment name (pstrain-[A-Za-z0-9_.-]+)")
        return os.path.join(SHM_DIR, name)

    @classmethod
    def create(cls, name: str, request_capacity: int, reply_capacity: int) -> Segment:
        """A new segment (readable and writable by this user only), replacing a stale one of the same name."""
        path = cls.path(name)
        size = _HEADER + _align(request_capacity) + _align(reply_capacity)
        try:
            os.unlink(path)  # left behind by a killed process of the same name
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        token = secrets.token_bytes(_TOKEN)
        seg = cls(name, token, request_capacity, fd, size, owner=True)
        seg._view[:_TOKEN] = token
        return seg

    @classmethod
    def attach(cls, name: str, token: bytes, request_capacity: int) -> Segment:
        """Map another process's segment; SegmentUnavailable if it is not the one the caller means."""
        path = cls.path(name)
        if isinstance(request_capacity, bool) or not isinstance(request_capacity, int) or request_capacity < 0:
            # A negative one would put the reply area over the header (see __init__).
            raise SegmentUnavailable(f"request_capacity={request_capacity!r} is not a size in bytes (an integer >= 0)")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise SegmentUnavailable(f"cannot open shared-memory segment {path}: {exc.strerror} (another host?)") from None
        try:
            st = os.fstat(fd)
            size = _HEADER + _align(request_capacity)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < size:
                raise SegmentUnavailable(f"{path} is not a segment of this user holding {request_capacity} request bytes")
        except BaseException:
            os.close(fd)
            raise
        seg = cls(name, bytes(token), request_capacity, fd, st.st_size, owner=False)
        if bytes(seg._view[:_TOKEN]) != seg.token:
            seg.close()
            raise SegmentUnavailable(f"{path} holds a different token: it is not the caller's segment (another host?)")
        return seg

    def close(self, unlink: bool | None = None) -> None:
        """Unmap, and remove the name (by default only the creator does; a shard also
        does at the end of a job, for workers that were killed). Views still handed
        out keep the mapping alive until they go."""
        if self._map.closed:
            return
        try:
            for view in (self.request, self.reply, self._view):
                view.release()
            self._map.close()
        except BufferError:  # an array still looks at it; the mapping goes with the last one
            pass
        if self.owner if unlink is None else unlink:
            try:
                os.unlink(self.path(self.name))
            except FileNotFoundError:
                pass
