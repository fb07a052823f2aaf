"""The worker service: registers with the master, receives tasks, and runs the
training loop on its data shard (pull, compute with the kernels, push).

May import: ``pstrain.transport``, ``protos``, ``pstrain.runtime``, ``pstrain.kernels``,
``graph``. Never ``client``, ``master`` or ``psserver``.
"""
