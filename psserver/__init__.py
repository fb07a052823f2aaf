"""The parameter-server service: shards that hold variables and optimizer state,
aggregate pushes (sync / async / SSP), apply the optimizer, and checkpoint.

May import: ``pstrain.transport``, ``protos``, ``pstrain.runtime``, ``pstrain.kernels``,
``graph``. Never ``client``, ``master`` or ``worker``.
"""
