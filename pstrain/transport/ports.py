"""Ports for a service started later: ``unused_port`` picks one outside the kernel's
ephemeral range.

Asking the kernel for port 0, closing the socket and handing the number to another
process races every outgoing connection on the machine: their source ports come from
the same ephemeral range, and a gRPC client's connect can take the port before the
service binds it ("Address already in use"). A port below that range is only ever
taken by someone who asks for it by number.
"""
from __future__ import annotations

import random
import socket
import threading

_LOCK = threading.Lock()
_GIVEN: set[int] = set()  # handed out by this process (not bound yet, perhaps)
# Below 20000: well-known and registered services people run on purpose, and Ray's
# worker ports (10002-19999 by default; `ray start` refuses a component port among them).
_LOWEST = 20000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatic source ports (Linux's default where unreadable)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def unused_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port free on ``host`` (and on every address, so a service binding the wildcard
    gets it too), outside the ephemeral range and not handed out before by this process.
    Falls back to the kernel's choice when the range leaves no room below it."""
    low, _ = ephemeral_range()
    rng = random.SystemRandom()
    with _LOCK:
        if low - 1 > _LOWEST:
            for _ in range(attempts):
                port = rng.randint(_LOWEST, low - 1)
                if port not in _GIVEN and _bindable(host, port) and (host in ("", "0.0.0.0") or _bindable("", port)):
                    _GIVEN.add(port)
                    return port
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        _GIVEN.add(port)
        return port
