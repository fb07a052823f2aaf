"""The one place where gRPC channels and servers are created, and where domain
errors become gRPC status codes.

Message-size limits are raised on purpose (tensors travel in single messages) and
enforced: a message over the limit fails with RESOURCE_EXHAUSTED naming its size and
the limit (``PSTRAIN_MAX_MESSAGE_BYTES`` raises it). Security plugs in here
(``pstrain.transport.security``): a server checks every call with its
``Authenticator`` and binds with mutual TLS when it has TLS files (plaintext only on
loopback, unless told ``insecure``); a channel presents the process's credentials.

Usage::

    server = make_server(max_workers=16, authenticator=auth)
    add_ParameterServerServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0, tls=None); server.start()
    channel = make_channel(f"127.0.0.1:{port}", "ps")
"""
from __future__ import annotations

import logging
import os
from concurrent import futures
from typing import Callable

import grpc

from pstrain.transport.security import (
    Authenticator,
    AuthInterceptor,
    Credentials,
    SecurityError,
    TLSFiles,
    is_loopback,
    process_credentials,
    secure_channel,
    server_credentials,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def max_message_bytes() -> int:
    value = os.environ.get("PSTRAIN_MAX_MESSAGE_BYTES")
    if value is None:
        return DEFAULT_MAX_MESSAGE_BYTES
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"PSTRAIN_MAX_MESSAGE_BYTES={value!r} is not an integer number of bytes") from None
    if not 1024 <= n <= 2**31 - 1:
        raise ValueError(f"PSTRAIN_MAX_MESSAGE_BYTES={n} is out of range; allowed [1024, {2**31 - 1}]")
    return n


def _options(limit: int | None) -> list[tuple[str, int]]:
    limit = limit or max_message_bytes()
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.so_reuseport", 0),
    ]


def make_server(max_workers: int = 32, max_message: int | None = None,
                authenticator: Authenticator | None = None) -> grpc.Server:
    """A threaded gRPC server with pstrain's message limits; with an ``authenticator``,
    every call is checked before its method runs."""
    interceptors = [AuthInterceptor(authenticator)] if authenticator is not None else []
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_options(max_message),
                       interceptors=interceptors)


def make_channel(address: str, server_role: str = "ps", credentials: Credentials | None = None,
                 max_message: int | None = None) -> grpc.Channel:
    """A channel to the ``server_role`` ("master" or "ps") service at ``address``
    (host:port) with pstrain's message limits, presenting ``credentials`` (default: the
    process's): mutual TLS when they hold TLS files."""
    creds = credentials if credentials is not None else process_credentials()
    return secure_channel(address, server_role, creds, _options(max_message))


def bind(server: grpc.Server, host: str, port: int, tls: TLSFiles | None = None, insecure: bool = False) -> int:
    """Bind ``host:port`` (port 0 picks a free one), with mutual TLS when ``tls`` is
    given; returns the bound port. Plaintext on a non-loopback address is refused
    unless ``insecure``."""
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", server_credentials(tls))
    elif is_loopback(host) or insecure:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        raise SecurityError(f"refusing to serve plaintext on {host}:{port}, which other machines can reach: give "
                            "--tls-dir (psctl certs init makes the files) or, on a network you trust, --insecure")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: the address is in use or not available")
    return bound


class Unreachable(ConnectionError):
    """A channel that did not connect; ``reason`` is "refused" (nothing listens), "tls"
    (the TLS handshake failed), "closed" (the peer hung up: it may speak TLS to a
    plaintext client) or "other"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def wait_ready(channel: grpc.Channel, address: str, timeout: float) -> None:
    """Block until the channel connects; raise Unreachable naming the address and, from
    one probing call, why (nothing listening, a failed TLS handshake, ...)."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        message, reason = _why_unreachable(channel, address)
        raise Unreachable(f"{message} (waited {timeout:.0f}s)", reason) from None


def _why_unreachable(channel: grpc.Channel, address: str) -> tuple[str, str]:
    try:
        channel.unary_unary("/pstrain.Probe/Connect")(b"", timeout=2.0)
    except grpc.RpcError as exc:
        code, details = exc.code(), (exc.details() or "")
    else:  # no service has that method: something answered after all
        code, details = grpc.StatusCode.OK, ""
    text = details.lower()
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"the service at {address} answered only after the wait", "other"
    if "connection refused" in text:
        return f"nothing listens at {address}; is the service running?", "refused"
    if "wrong_version_number" in text:  # a TLS client's hello answered in plaintext
        return (f"the service at {address} does not speak TLS ({_first_line(details)}): start it with --tls-dir, or "
                "call a loopback-only cluster without TLS files", "tls")
    if any(word in text for word in ("handshake", "ssl", "certificate", "verification", "tls")):
        return (f"the TLS handshake with {address} failed ({_first_line(details)}): the service and this client need "
                "certificates of the same cluster CA (--tls-dir / PSTRAIN_TLS_DIR; psctl certs init makes them)",
                "tls")
    if any(word in text for word in ("socket closed", "connection reset", "end of tcp stream", "broken pipe")):
        return (f"{address} closed the connection ({_first_line(details)}): it may be a service that speaks TLS "
                "(give --tls-dir / PSTRAIN_TLS_DIR) or not a pstrain service", "closed")
    return f"no pstrain service answers at {address} ({_first_line(details) or code.name}); is it running?", "other"


def _first_line(text: str, limit: int = 160) -> str:
    """gRPC's reason, without its "failed to connect to all addresses" preamble."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.split("; last error: ", 1)[-1]
    return line if len(line) <= limit else line[:limit] + "..."


# ---- errors -------------------------------------------------------------------------------
# Domain exception type -> status code. Servicers call ``abort(context, exc)``.
_STATUS: list[tuple[type, grpc.StatusCode]] = []


def register_error(exc_type: type, code: grpc.StatusCode) -> None:
    _STATUS.append((exc_type, code))


def status_for(exc: BaseException) -> grpc.StatusCode:
    for exc_type, code in _STATUS:
        if isinstance(exc, exc_type):
            return code
    if isinstance(exc, KeyError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = status_for(exc)
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error in a servicer")
    context.abort(code, message)


def guarded(fn: Callable) -> Callable:
    """Decorate a servicer method: domain errors become status codes (in one place)."""

    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            abort(context, exc)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def describe(err: grpc.RpcError) -> str:
    """A one-line description of a failed call for users."""
    try:
        text = f"{err.code().name}: {err.details()}"
        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in (err.details() or ""):
            text += " (raise the limit with PSTRAIN_MAX_MESSAGE_BYTES on every process)"
        return text
    except Exception:  # noqa: BLE001
        return str(err)


def one_line(exc: BaseException) -> str:
    """Any error as one readable line: a failed call as its status and message, anything
    else as its type and message (for job errors and events)."""
    if isinstance(exc, grpc.RpcError):
        return describe(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
