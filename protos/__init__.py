"""pstrain's wire format: the ``.proto`` sources, their generated ``*_pb2`` modules,
``protos.codec`` (messages to and from graph / NumPy objects), ``protos.jobcodec``
(job messages to and from the plain types of ``pstrain.runtime.spec``), ``tensorwire`` (raw tensor frames), ``shm`` (shared-memory frames),
``settings`` and ``observability`` (what
every service edge shares). Only the codec and the service / transport modules
import ``*_pb2``.

May import: ``pstrain.runtime``, ``pstrain.kernels``, ``graph``.
Regenerate after editing a ``.proto``: ``python -m protos.generate``.
"""
