"""A node's membership in a cluster: register with the master, then heartbeat.

Used by parameter servers and workers alike. The heartbeat thread hands every
response to ``on_response`` (workers receive their tasks that way) and registers
again if the master forgot the node (e.g. after a master restart).

Usage::

    m = NodeMembership("127.0.0.1:50051", "worker", on_response=handle, metrics_address="10.0.0.5:9464")
    m.start(); ...; m.stop()
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc

from pstrain.runtime.spec import SlotRef
from pstrain.transport import rpc
from pstrain.transport.master_client import MasterClient
from pstrain.transport.security import Credentials

log = logging.getLogger(__name__)


class NodeMembership:
    def __init__(self, master: str, role: str, address: str = "", name: str = "", interval: float = 0.5,
                 on_response: Callable | None = None, register_timeout: float = 60.0, metrics_address: str = "",
                 credentials: Credentials | None = None):
        self.client = MasterClient(master, timeout=10.0, connect_timeout=register_timeout, credentials=credentials)
        self.role, self.address, self.name = role, address, name
        self.metrics_address = metrics_address  # where this node serves /metrics ("" = nowhere)
        self.interval = interval
        self.on_response = on_response
        self.node_id: str | None = None
        self.index: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{role}-heartbeat", daemon=True)
        self.running: list[SlotRef] = []  # the worker slots a worker runs: told again on re-registering

    def register(self) -> None:
        r = self.client.register(self.role, self.address, self.name, self.metrics_address, list(self.running))
        self.node_id, self.index = r.node_id, r.index
        self.interval = r.heartbeat_interval or self.interval
        log.info("registered with the master as %s (index %d)", self.node_id, self.index)

    def start(self) -> None:
        self.register()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                resp = self.client.heartbeat(self.node_id)
                if not resp.known:
                    log.warning("the master does not know this node any more; registering again")
                    self.register()
                    continue
                if self.on_response is not None:
                    self.on_response(resp)
            except grpc.RpcError as exc:
                log.warning("heartbeat failed: %s", rpc.describe(exc))
                time.sleep(self.interval)
            except Exception:  # noqa: BLE001 - keep heartbeating
                log.exception("heartbeat handling failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.client.close()
