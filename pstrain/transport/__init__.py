"""Transport: the client side of pstrain's services, used by the services themselves,
by workers and by the client layer.

- ``ps_client``: ``ShardedParameterClient``, the gRPC implementation of
  ``pstrain.runtime.parameters.ParameterClient`` across a job's shards (slicing,
  shared memory or raw frames, deadlines, retries), over ``ParameterServerClient``
  (one shard: init, pull, push+pull, membership, status, end);
- ``master_client``: ``MasterClient`` (jobs, watch, export, nodes) and job-spec building;
- ``membership``: ``NodeMembership`` (register with the master and heartbeat);
- ``rpc``: the one place gRPC channels and servers are created (TLS and auth plug in
  here) and domain errors become status codes.

May import: ``protos``, ``pstrain.runtime``, ``pstrain.kernels``, ``graph``. Never a
service package (``master``, ``psserver``, ``worker``) or ``client``.
"""
