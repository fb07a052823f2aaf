"""pstrain's wire format: the ``.proto`` sources, their generated ``*_pb2`` modules and
``protos.codec``, the one module that converts between messages and graph / NumPy
objects (only it and the gRPC service modules import ``*_pb2``).

Regenerate after editing a ``.proto``: ``python -m protos.generate``.
"""
