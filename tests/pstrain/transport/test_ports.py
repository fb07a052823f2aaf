"""unused_port: ports for services started later, out of the way of outgoing connections."""
from __future__ import annotations

import socket

from pstrain.transport import ports
from pstrain.transport.ports import ephemeral_range, unused_port


def test_ports_are_outside_the_ephemeral_range_distinct_and_bindable_on_every_address():
    low, high = ephemeral_range()
    assert 0 < low <= high < 65536
    got = [unused_port("0.0.0.0") for _ in range(20)] + [unused_port() for _ in range(20)]
    assert len(set(got)) == len(got)
    for port in got:
        assert not low <= port <= high, (port, low, high)
        with socket.socket() as s:
            s.bind(("", port))  # the wildcard, as a compose service binds


def test_a_taken_port_is_never_handed_out(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        busy.listen()
        picks = iter([taken, taken] + list(range(20000, 20200)))
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (65000, 65535))
        monkeypatch.setattr(ports.random.SystemRandom, "randint", lambda self, a, b: next(picks))
        port = unused_port()
    assert port != taken


def test_without_room_below_the_range_the_kernel_chooses(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    port = unused_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_ports_stay_clear_of_rays_default_worker_ports():
    # `ray start --head` refuses a component port inside its worker port range (10002-19999).
    assert all(not 10002 <= unused_port() <= 19999 for _ in range(50))
