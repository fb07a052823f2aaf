"""The master service: validates and plans jobs (graph passes, backward pass,
placement), tracks them in a durable store (SQLite), registers nodes, detects
failures, and streams progress to clients.

May import: ``pstrain.transport``, ``protos``, ``pstrain.runtime``, ``pstrain.kernels``,
``graph``. Never ``client``, ``psserver`` or ``worker``.
"""
