"""The client layer (top of the stack): the Keras-style API (``client.nn``), job files
(``client.job``), the ``psctl`` CLI, progress views and plots, and the launchers that
start clusters (local processes today).

May import every layer below it (services, ``pstrain.transport``, ``protos``,
``pstrain.runtime``, ``pstrain.kernels``, ``graph``); nothing imports ``client``.

``from client import datasets`` is the public name of ``pstrain.runtime.datasets``
(datasets by name, shuffling and sharding), which workers use without the client.
"""
from pstrain.runtime import datasets

__all__ = ["datasets"]
